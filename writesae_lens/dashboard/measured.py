"""Per-atom substitution results, from the rows of a substitution run (``writesae substitute --out``).

A row is one firing: ``atom``, ``prompt``, ``position`` and the KL of the final distribution after
replacing the native write there by the atom (``kl_atom``), by nothing (``kl_delete``) and by a
matched random rank-1 matrix (``kl_random``); ``layer`` / ``head`` when present select the site.
The atom **wins** a firing when ``kl_atom < kl_delete`` (METHOD.md section 4).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from writesae_lens.analysis.report import read_jsonl
from writesae_lens.analysis.stats import wilson_interval

REQUIRED = ("atom", "prompt", "position", "kl_atom", "kl_delete")
CONDITIONS = ("atom", "delete", "random")


def load_substitution_rows(source: str | Path | Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Rows from a JSONL file or an iterable of dicts, checked for the keys the dashboard reads."""
    rows = read_jsonl(source) if isinstance(source, (str, Path)) else [dict(r) for r in source]
    for i, row in enumerate(rows):
        missing = [k for k in REQUIRED if k not in row]
        if missing:
            raise ValueError(
                f"Substitution row {i} lacks {missing}: the dashboard needs rows of `writesae substitute --out` "
                f"(keys {list(REQUIRED)}, optionally kl_random, layer, head)."
            )
    return rows


def substitution_by_atom(
    rows: Iterable[Mapping[str, Any]], layer: int | None = None, head: int | None = None, max_points: int = 300
) -> dict[int, dict[str, Any]]:
    """Per atom: ``n``, ``wins``, ``win_rate`` and its Wilson 95% ``win_ci``, the median KL of each
    condition (``median_kl``), and up to ``max_points`` per-firing KLs per condition (``kl``, for
    plots). Rows of another ``layer`` / ``head`` (when the rows name one) are skipped."""
    grouped: dict[int, list[Mapping[str, Any]]] = {}
    for row in rows:
        if layer is not None and "layer" in row and int(row["layer"]) != layer:
            continue
        if head is not None and "head" in row and int(row["head"]) != head:
            continue
        grouped.setdefault(int(row["atom"]), []).append(row)
    out: dict[int, dict[str, Any]] = {}
    for atom, group in sorted(grouped.items()):
        conditions = [c for c in CONDITIONS if all(f"kl_{c}" in r for r in group)]
        kl = {c: np.array([float(r[f"kl_{c}"]) for r in group]) for c in conditions}
        wins = int((kl["atom"] < kl["delete"]).sum())
        out[atom] = dict(
            n=len(group), wins=wins, win_rate=wins / len(group), win_ci=list(wilson_interval(wins, len(group))),
            median_kl={c: float(np.median(v)) for c, v in kl.items()},
            kl={c: [float(f"{x:.6g}") for x in v[:max_points]] for c, v in kl.items()},  # 6 significant digits
        )
    return out


__all__ = ["load_substitution_rows", "substitution_by_atom"]
