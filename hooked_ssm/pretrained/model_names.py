"""Real release names that ``HookedSSM.from_pretrained`` resolves, with what their own files leave
unsaid.

- ``state-spaces/mamba2-*`` ship a mamba_ssm ``config.json`` whose ``ssm_cfg`` is usually just
  ``{"layer": "Mamba2"}``: the mixer dims are mamba_ssm's defaults (``d_state`` 128, ``headdim``
  64, ``ngroups`` 1, ``expand`` 2, ``d_conv`` 4), recorded here, and the tokenizer
  (GPT-NeoX) lives in another repository.
- BlinkDL RWKV-7 releases are a bare ``.pth`` state dict in a repository of many files: the table
  names the file. Every dim is read from the tensor shapes (head size from ``r_k``, LoRA ranks
  from ``w1``/``a1``/``v1``/``g1``); the table's ``expect`` dims are checked after download.
  The RWKV "world" tokenizer is not a transformers tokenizer, so these load without one: encode
  with ``rwkv.rwkv_tokenizer.TRIE_TOKENIZER`` (``rwkv`` package) and pass token ids, or pass a
  transformers-compatible tokenizer with ``tokenizer=``.

File names were taken from BlinkDL's published release lists; check them against the Hub if a
download fails (``from_pretrained`` also accepts the local path of any downloaded ``.pth``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Release:
    family: str  # "mamba2" or "rwkv7"
    repo_id: str
    filename: str | None = None  # a single weights file inside the repository (BlinkDL .pth)
    defaults: dict[str, Any] = field(default_factory=dict)  # fills what the checkpoint leaves unsaid
    expect: dict[str, int] = field(default_factory=dict)  # dims the loaded checkpoint must have
    tokenizer: str | None = None  # a transformers tokenizer to load alongside (Hub id)


_MAMBA_SSM_DEFAULTS = {"d_state": 128, "headdim": 64, "ngroups": 1, "expand": 2, "d_conv": 4, "chunk_size": 256}
_MAMBA2_SIZES = {"130m": (768, 24), "370m": (1024, 48), "780m": (1536, 48), "1.3b": (2048, 48), "2.7b": (2560, 64)}

RELEASES: dict[str, Release] = {
    f"state-spaces/mamba2-{size}": Release(
        family="mamba2",
        repo_id=f"state-spaces/mamba2-{size}",
        defaults=_MAMBA_SSM_DEFAULTS,
        expect={"d_model": d_model, "n_layers": n_layers, "d_vocab": 50288},
        tokenizer="EleutherAI/gpt-neox-20b",
    )
    for size, (d_model, n_layers) in _MAMBA2_SIZES.items()
}

_RWKV7_SIZES = {"0.1b": (768, 12), "0.4b": (1024, 24), "1.5b": (2048, 24), "2.9b": (2560, 32)}
_RWKV7_G1_FILES = {
    "0.1b": "rwkv7-g1-0.1b-20250307-ctx4096.pth",
    "0.4b": "rwkv7-g1-0.4b-20250324-ctx4096.pth",
    "1.5b": "rwkv7-g1-1.5b-20250429-ctx4096.pth",
    "2.9b": "rwkv7-g1-2.9b-20250519-ctx4096.pth",
}
_RWKV7_WORLD_FILES = {
    "0.1b": "RWKV-x070-World-0.1B-v2.8-20241210-ctx4096.pth",
    "0.4b": "RWKV-x070-World-0.4B-v2.9-20250107-ctx4096.pth",
    "1.5b": "RWKV-x070-World-1.5B-v3-20250127-ctx4096.pth",
    "2.9b": "RWKV-x070-World-2.9B-v3-20250211-ctx4096.pth",
}
_RWKV7_DEFAULTS = {"n_ctx": 4096, "eos_token_id": 0}
for _size, (_d_model, _n_layers) in _RWKV7_SIZES.items():
    _expect = {"d_model": _d_model, "n_layers": _n_layers, "d_vocab": 65536, "d_k": 64}
    RELEASES[f"rwkv7-g1-{_size}"] = Release(
        "rwkv7", "BlinkDL/rwkv7-g1", _RWKV7_G1_FILES[_size], _RWKV7_DEFAULTS, _expect
    )
    RELEASES[f"rwkv7-world-{_size}"] = Release(
        "rwkv7", "BlinkDL/rwkv-7-world", _RWKV7_WORLD_FILES[_size], _RWKV7_DEFAULTS, _expect
    )

# Alternative spellings people use for the same releases.
ALIASES: dict[str, str] = {}
for _size in _RWKV7_SIZES:
    ALIASES[f"BlinkDL/rwkv7-g1-{_size}"] = f"rwkv7-g1-{_size}"
    ALIASES[f"BlinkDL/rwkv-7-world-{_size}"] = f"rwkv7-world-{_size}"
    ALIASES[f"rwkv-7-world-{_size}"] = f"rwkv7-world-{_size}"


def find_release(name: str) -> tuple[str, Release] | None:
    """The release a name refers to (case-insensitive), or None."""
    lowered = {key.lower(): key for key in RELEASES}
    aliases = {key.lower(): value for key, value in ALIASES.items()}
    key = str(name).lower()
    canonical = lowered.get(key) or aliases.get(key)
    return (canonical, RELEASES[canonical]) if canonical else None


def release_names() -> list[str]:
    return sorted(RELEASES)
