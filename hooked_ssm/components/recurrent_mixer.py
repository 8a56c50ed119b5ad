"""Machinery shared by the recurrent mixers (Gated DeltaNet, Mamba-2, RWKV-7): turning edits made
through ``hook_write`` / ``hook_state`` into exact additive edits of the state.

Every supported recurrence is affine in its state: the transition (decay, erase) at token ``t``
does not depend on the state. So replacing the write at ``t`` by ``W'``, or the state after ``t`` by
``S'``, is the same as adding ``D = W' - W`` (or ``S' - S``) to the state after the update at ``t``
and continuing the scan from there. Each mixer supplies a scan that accepts such edits
(``{t: [batch, head, d_k, d_v]}``) and this module computes them from the hooks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.autograd.forward_ad as fwAD
from jaxtyping import Float
from torch import Tensor
from transformer_lens.hook_points import HookPoint

# Per-position additive edits of the state after the update at that position.
StateEdits = dict[int, Float[Tensor, "batch head d_k d_v"]]
# run(edits, state_positions) -> (o, final_state, states at state_positions or None)
ScanFn = Callable[[StateEdits, Sequence[int] | None], tuple[Tensor, Tensor, Tensor | None]]


# Calls shorter than this many tokens run the token-by-token scan even under execution="chunked":
# a chunked call costs about the same whatever its length (one padded chunk), so decoding steps and
# short continuations are cheaper recurrent. On a GPU a call is bound by kernel launches (about 10
# per token per layer recurrent, about 35 per chunk chunked), hence the lower threshold there.
RECURRENT_BELOW = {"cpu": 16, "cuda": 4}


def runs_recurrent(execution: str, length: int, device: torch.device) -> bool:
    """Whether a mixer set to ``execution`` scans ``length`` tokens with the recurrent form."""
    return execution == "recurrent" or length < RECURRENT_BELOW.get(device.type, 4)


def run_hook(hook: HookPoint, x: Tensor) -> Tensor | None:
    """Call ``hook`` on ``x``; return the edited tensor, or None if no hook changed it.

    Catches both styles of edit: returning a new tensor and modifying ``x`` in place (the
    tensor's version counter moves).
    """
    version = x._version
    out = hook(x)
    return None if (out is x and x._version == version) else out


def changed_positions(delta: Float[Tensor, "batch pos ..."]) -> list[int]:
    """Positions (dim 1) where ``delta`` (or its forward-mode tangent, for a jvp through an edit)
    is non-zero for some batch element or feature."""
    changed = delta.flatten(2).ne(0).any(dim=(0, 2))
    tangent = fwAD.unpack_dual(delta).tangent
    if tangent is not None:
        changed |= tangent.flatten(2).ne(0).any(dim=(0, 2))
    return torch.nonzero(changed).flatten().tolist()


def log_decay_through_hook(hook: HookPoint, log_decay: Tensor) -> Tensor:
    """Show ``hook`` the multiplicative decay ``exp(log_decay)``; return the log of what it leaves.

    Where the hook left a value alone the exact log is kept (an exp/log round trip loses bits).
    """
    if not hook.has_hooks():
        return log_decay
    native = log_decay.exp()
    hooked = run_hook(hook, native.clone())
    return log_decay if hooked is None else torch.where(hooked == native, log_decay, hooked.log())


def observe_write_factors(
    hook: HookPoint,
    factors: Callable[[], tuple[Float[Tensor, "batch pos head d_k"], Float[Tensor, "batch pos head d_v"]]],
) -> None:
    """Show ``hook_write_factors`` the write's factors ``[k_w | v_w]`` (``hook_write == k_w v_w^T``).

    Observation only (cached by SAELens's activation store for factored WriteSAE training, O(d_k + d_v)
    per head instead of O(d_k d_v)). ``factors()`` runs only when the hook has hooks, so unhooked
    forwards pay nothing. An edit raises: a change of the factors has no single meaning here (it
    would move the write, but not what ``hook_k`` / ``hook_v`` feed elsewhere, e.g. the delta
    rule's erase or RWKV-7's bonus).
    """
    if not hook.has_hooks():
        return
    if run_hook(hook, torch.cat(factors(), dim=-1)) is not None:
        raise ValueError(
            f"{hook.name} is observation-only: a hook changed its value, and that edit cannot be applied. To "
            f"change the write, edit {str(hook.name).removesuffix('_factors')} (an exact state edit) or hook_k / "
            f"hook_v (inputs of the recurrence). SAEs trained on the factors are spliced on hook_write after "
            f"sae.to_write_site()."
        )


def write_edits(
    hook: HookPoint, native_write: Callable[[], Float[Tensor, "batch pos head dk_dv"]], d_k: int, d_v: int
) -> StateEdits:
    """Run ``hook_write`` on the native flattened write; return its changes as state edits.

    ``native_write`` is called again to diff against, so in-place edits of the hooked tensor are
    caught without keeping a second copy alive during the hook.
    """
    hooked = run_hook(hook, native_write())
    if hooked is None:
        return {}
    diff = hooked - native_write()
    diff = diff.view(*diff.shape[:3], d_k, d_v)
    return {t: diff[:, t] for t in changed_positions(diff)}


def state_hook_edits(
    hook: HookPoint,
    states: Float[Tensor, "batch n_sel head d_k d_v"],
    positions: Sequence[int],
    native_states: Callable[[], Float[Tensor, "batch n_sel head d_k d_v"]],
) -> StateEdits:
    """Run ``hook_state`` on the (selected) states; return its changes as edits at those positions."""
    hooked = run_hook(hook, states.flatten(-2))
    if hooked is None:
        return {}
    native = native_states()
    diff = (hooked - native.flatten(-2)).view(native.shape)
    edits: StateEdits = {}
    for i in changed_positions(diff):
        edits[positions[i]] = edits.get(positions[i], 0) + diff[:, i]
    return edits


def merge_edits(edits: StateEdits, more: StateEdits) -> StateEdits:
    merged = dict(edits)
    for t, delta in more.items():
        merged[t] = merged[t] + delta if t in merged else delta
    return merged


def scan_with_state_hooks(
    hook_write: HookPoint,
    hook_state: HookPoint,
    native_write: Callable[[], Tensor],
    d_k: int,
    d_v: int,
    run: ScanFn,
    length: int,
    state_positions: Sequence[int] | None,
) -> tuple[Tensor, Tensor] | None:
    """Honour ``hook_write`` and ``hook_state`` for a mixer whose scan accepts state edits.

    Returns None when neither hook is active (the caller then runs its fast path), else
    ``(o, final_state)`` with every edit applied exactly.
    """
    want_states = hook_state.has_hooks()
    edits = write_edits(hook_write, native_write, d_k, d_v) if hook_write.has_hooks() else {}
    if not (edits or want_states):
        return None
    positions = list(range(length)) if state_positions is None else list(state_positions)
    o, state, states = run(edits, positions if want_states else None)
    if want_states and states is not None:
        later = state_hook_edits(hook_state, states, positions, lambda: run(edits, positions)[2])
        if later:
            o, state, _ = run(merge_edits(edits, later), None)
    return o, state
