"""Hook-name resolution: TransformerLens 4 SSM aliases, and errors that suggest the right name."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

import torch
from jaxtyping import Float
from torch import Tensor

# TransformerLens 4's SSM vocabulary (TransformerBridge's SSMStateHookMixin) -> our names, where the
# tensor is the same.
ALIASES = {
    "hook_ssm_state": "hook_state",
    "hook_ssm_B": "hook_k",
    "hook_ssm_C": "hook_q",
}


def resolve_hook_name(name: str, valid: Iterable[str]) -> str:
    """Map an alias to its canonical name; raise a KeyError listing close matches for unknown names."""
    valid = list(valid)
    if name in valid:
        return name
    prefix, _, leaf = name.rpartition(".")
    here = lambda hook: f"{prefix}.{hook}" if prefix else hook  # noqa: E731
    if leaf in ALIASES and here(ALIASES[leaf]) in valid:
        return here(ALIASES[leaf])
    if leaf == "hook_ssm_write":
        if here("hook_beta") in valid:  # a delta rule: TransformerLens 4 means the write strength beta
            return here("hook_beta")
        if here("hook_write") in valid:
            raise KeyError(
                f"{name!r}: TransformerLens 4's hook_ssm_write is the write dt*(x outer B) as [batch, pos, head, "
                f"head_dim, d_state] (beta for a delta rule); this mixer has no such hook. Its write is "
                f"{here('hook_write')!r}, [batch, pos, head, d_k*d_v] key-major: as_matrix(act, d_k, d_v).mT "
                f"gives TransformerLens 4's layout."
            )
    if leaf == "hook_ssm_decay" and here("hook_decay") in valid:
        raise KeyError(
            f"{name!r}: TransformerLens 4's hook_ssm_decay is the log decay g_t; this model has no hook for "
            f"it. {here('hook_decay')!r} holds the decay itself, exp(g_t) in (0, 1]: take its log to read "
            f"g_t, and edit it there."
        )
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
