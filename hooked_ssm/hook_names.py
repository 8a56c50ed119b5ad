"""Hook-name resolution: TransformerLens 4 SSM aliases, and errors that suggest the right name."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

import torch
from jaxtyping import Float
from torch import Tensor

# TransformerLens 4's SSM vocabulary -> our names (same tensors).
ALIASES = {
    "hook_ssm_state": "hook_state",
    "hook_ssm_write": "hook_write",
    "hook_ssm_B": "hook_k",
    "hook_ssm_C": "hook_q",
    "hook_ssm_decay": "hook_decay",
}


def resolve_hook_name(name: str, valid: Iterable[str]) -> str:
    """Map an alias to its canonical name; raise a KeyError listing close matches for unknown names."""
    valid = list(valid)
    if name in valid:
        return name
    prefix, _, leaf = name.rpartition(".")
    if leaf in ALIASES:
        canonical = f"{prefix}.{ALIASES[leaf]}" if prefix else ALIASES[leaf]
        if canonical in valid:
            return canonical
    close = difflib.get_close_matches(name, valid, n=5, cutoff=0.6)
    hint = f" Did you mean one of: {', '.join(close)}?" if close else ""
    raise KeyError(
        f"Unknown hook name {name!r}.{hint} `model.hook_dict.keys()` lists every hook point of this model."
    )


def as_matrix(
    flat: Float[Tensor, "... dk_dv"], d_k: int, d_v: int
) -> Float[Tensor, "... d_k d_v"]:
    """View a flattened ``hook_write`` / ``hook_state`` activation as key-major ``[..., d_k, d_v]`` matrices."""
    if flat.shape[-1] != d_k * d_v:
        raise ValueError(f"Last dim is {flat.shape[-1]}, expected d_k*d_v = {d_k}*{d_v} = {d_k * d_v}.")
    return flat.unflatten(-1, (d_k, d_v))


def as_flat(matrix: Float[Tensor, "... d_k d_v"]) -> Float[Tensor, "... dk_dv"]:
    """Inverse of :func:`as_matrix`: entry ``i*d_v + j`` is ``matrix[..., i, j]``."""
    return torch.flatten(matrix, start_dim=-2)
