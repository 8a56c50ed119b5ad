"""Results files that say what made them, so two runs can never be mixed in one.

The first line of a results file (JSONL) is ``{"_run": record}``: the protocol and its settings,
the model, the SAE (its identity and a SHA-256 of its weights), the site, the seed, a hash of the
token windows and the library versions. ``--resume`` continues a file only when the record of the
new run equals the file's; otherwise it refuses, naming every setting that differs. Each row is
written whole (``append_jsonl``: one ``write`` call per line on a file opened for appending), so a
killed run leaves complete rows; a torn last line (e.g. from a full disk) is cut off on resume.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from writesae_lens.analysis.report import RUN_RECORD_KEY, _jsonable, append_jsonl


class ResumeMismatchError(ValueError):
    """``resume=True`` on a results file made with other settings (or with no record at all)."""


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "unknown"


def tensors_sha256(tensors: Mapping[str, Tensor]) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of ``tensors`` (in name order)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def describe_model(model: Any) -> dict[str, Any]:
    cfg = model.cfg
    return {
        "name": cfg.model_name,
        "architecture": getattr(cfg, "original_architecture", None),
        "n_layers": cfg.n_layers,
        "d_model": cfg.d_model,
        "dtype": str(cfg.dtype).removeprefix("torch."),
    }


def describe_sae(sae: Any) -> dict[str, Any] | None:
    """The SAE's identity: architecture, sizes, what its metadata says it was trained on, and a
    hash of its weights (two SAEs with the same config but other weights differ here)."""
    if sae is None:
        return None
    meta = sae.cfg.metadata
    return {
        "architecture": sae.cfg.architecture(),
        "d_in": sae.cfg.d_in,
        "d_sae": sae.cfg.d_sae,
        "model_name": getattr(meta, "model_name", None),
        "hook_name": getattr(meta, "hook_name", None),
        "hook_head_index": getattr(meta, "hook_head_index", None),
        "weights_sha256": tensors_sha256(sae.state_dict()),
    }


def tokens_sha256(tokens: Tensor | Iterable[Tensor]) -> str:
    """A hash of the token windows a run reads (their ids and shapes)."""
    windows = [tokens] if isinstance(tokens, Tensor) else list(tokens)
    return tensors_sha256({f"{i:08d}": window.long() for i, window in enumerate(windows)})


def run_record(
    protocol: str,
    settings: Mapping[str, Any],
    *,
    model: Any,
    sae: Any = None,
    site: Mapping[str, Any] | None = None,
    seed: int | None = None,
    tokens: Tensor | Iterable[Tensor] | None = None,
) -> dict[str, Any]:
    """Everything that decides a run's rows (see the module docstring)."""
    return _jsonable({
        "protocol": protocol,
        "settings": dict(settings),
        "model": describe_model(model),
        "sae": describe_sae(sae),
        "site": None if site is None else dict(site),
        "seed": seed,
        "tokens_sha256": None if tokens is None else tokens_sha256(tokens),
        "versions": {"writesae_lens": _version("writesae-lens"), "sae_lens": _version("sae-lens"),
                     "torch": torch.__version__.split("+")[0]},
    })


def _flatten(record: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in record.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def record_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """``"key: file has X, this run has Y"`` for every setting that differs."""
    old, new = _flatten(saved), _flatten(_jsonable(current))
    return [f"{key}: file has {_short(old.get(key))}, this run has {_short(new.get(key))}"
            for key in sorted(old.keys() | new.keys()) if old.get(key) != new.get(key)]


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class ResultsFile:
    """A JSONL results file headed by its run record.

    ``ResultsFile(path, record)`` starts the file afresh; ``resume=True`` keeps the rows of an
    existing file made by the same record (``previous_rows``) and raises ``ResumeMismatchError``
    naming the differing settings otherwise.
    """

    def __init__(self, path: str | Path, record: Mapping[str, Any], resume: bool = False):
        self.path = Path(path)
        self.record = _jsonable(dict(record))
        self.previous_rows: list[dict[str, Any]] = []
        if resume and self.path.exists() and self.path.stat().st_size:
            self.previous_rows = self._resume()
        else:
            self._start()

    def _start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps({RUN_RECORD_KEY: self.record}) + "\n", encoding="utf-8")
        os.replace(tmp, self.path)  # never a half-written header under the final name

    def _resume(self) -> list[dict[str, Any]]:
        self._drop_torn_last_line()
        lines = self.path.read_text(encoding="utf-8").splitlines()
        header = json.loads(lines[0]) if lines else {}
        if not isinstance(header, dict) or RUN_RECORD_KEY not in header:
            raise ResumeMismatchError(
                f"{self.path} has no run record (it was written by an older version or another tool), so it cannot "
                f"be told apart from another run. Use another --out file, or run without --resume to start over."
            )
        differences = record_differences(header[RUN_RECORD_KEY], self.record)
        if differences:
            raise ResumeMismatchError(
                f"Cannot resume {self.path}: it was made with other settings, and resuming would mix two runs. "
                f"Differences: {'; '.join(differences)}. Use another --out file, or run without --resume to start over."
            )
        return [json.loads(line) for line in lines[1:] if line.strip()]

    def _drop_torn_last_line(self) -> None:
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end != len(data):
            with open(self.path, "r+b") as handle:
                handle.truncate(end)

    def append(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Append ``rows``, each written whole (see ``append_jsonl``)."""
        append_jsonl(self.path, rows)
