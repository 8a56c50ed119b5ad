"""Machinery shared by the recurrent mixers (Gated DeltaNet, Mamba-2, RWKV-7): honouring edits made
through ``hook_write`` and ``hook_state``.

Every supported recurrence is affine in its state: the transition (decay, erase) at token ``t``
does not depend on the state. The two matrix hooks mean different things:

- ``hook_write`` (and Gated DeltaNet's ``hook_delta_v``) edits are *persistent*: replacing the write
  at ``t`` by ``W'`` adds ``D = W' - W`` to the state after the update at ``t``, and the recurrence
  carries (decays, erases) ``D`` into every later state. Each mixer's scan accepts such additive
  edits (``{t: [batch, head, d_k, d_v]}``) and splits its chunked form at them.
- ``hook_state`` edits are *replacements*: the hook sees the states of the selected positions (on
  the trajectory that already holds the write edits) and the state that position ``t`` reads is
  exactly what it returned for ``t``; after a selected position the recurrence continues from the
  returned state. So an SAE spliced on ``hook_state`` (which returns ``S_t + E_t`` at every
  position) moves the read at ``t`` by the read of ``E_t`` only, not by the sum of all earlier errors.

A mixer supplies a :data:`SegmentScan` (its scan of any stretch of the sequence, from any state,
with additive edits) and a read (``o_t = S_t^T q_t`` for all three families); this module does the
rest, without a per-token loop.
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
# scan(segment, state entering it, additive edits, state positions) -> (o, state after it, states at
# those positions or None). Positions in ``edits`` and ``state positions`` count from the segment start.
SegmentScan = Callable[
    [slice, Tensor | None, StateEdits, Sequence[int] | None],
    tuple[Float[Tensor, "batch seg head d_v"], Float[Tensor, "batch head d_k d_v"], Tensor | None],
]
# read(states, queries) -> outputs: what position t reads from its state.
StateRead = Callable[
    [Float[Tensor, "batch n head d_k d_v"], Float[Tensor, "batch n head d_k"]], Float[Tensor, "batch n head d_v"]
]


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
    if not hook.has_hooks():
        return {}
    hooked = run_hook(hook, native_write())
    if hooked is None:
        return {}
    diff = hooked - native_write()
    diff = diff.view(*diff.shape[:3], d_k, d_v)
    return {t: diff[:, t] for t in changed_positions(diff)}


def merge_edits(edits: StateEdits, more: StateEdits) -> StateEdits:
    merged = dict(edits)
    for t, delta in more.items():
        merged[t] = merged[t] + delta if t in merged else delta
    return merged


def read_state(
    states: Float[Tensor, "batch n head d_k d_v"], queries: Float[Tensor, "batch n head d_k"]
) -> Float[Tensor, "batch n head d_v"]:
    """``o_t = S_t^T q_t``: the read of Gated DeltaNet (q), Mamba-2 (C) and RWKV-7 (r)."""
    return (queries.to(states.dtype)[..., None, :] @ states).squeeze(-2)  # batched matmul: no permuted copies


def scan_with_state_hooks(
    hook_state: HookPoint,
    scan: SegmentScan,
    q: Float[Tensor, "batch pos head d_k"],
    initial_state: Tensor | None,
    edits: StateEdits,
    state_positions: Sequence[int] | None,
    read: StateRead = read_state,
) -> tuple[Float[Tensor, "batch pos head d_v"], Float[Tensor, "batch head d_k d_v"]]:
    """``(o, final_state)`` of the whole call: the additive ``edits`` applied, ``hook_state`` run on
    the selected states (all positions when ``state_positions`` is None) and what it returned
    installed as replacements (:func:`replace_states`)."""
    length = q.shape[1]
    whole = slice(0, length)
    if not hook_state.has_hooks():
        return scan(whole, initial_state, edits, None)[:2]
    positions = list(range(length)) if state_positions is None else list(state_positions)
    o, final_state, states = scan(whole, initial_state, edits, positions)
    if states is None:  # no position selected
        return o, final_state
    flat = states.flatten(-2)
    version = states._version
    hooked = run_hook(hook_state, flat)
    if hooked is None:
        return o, final_state
    if hooked is flat or states._version != version:  # edited in place: the unedited states are gone
        states = scan(whole, initial_state, edits, positions)[2]
    returned = hooked.to(states.dtype).view(states.shape)
    changed = returned.ne(states).flatten(3).any(dim=3).any(dim=0)  # [n_sel, head]
    if not changed.any():  # an identity (a clone, an in-place no-op): nothing to replace
        return o, final_state
    first = min(positions[i] for i in torch.nonzero(changed.any(dim=1)).flatten().tolist())
    # From the first change on, every selected position is a replacement point: one that the hook
    # left alone is set back to its unedited state (what the hook returned for it).
    replacements = {t: i for i, t in enumerate(positions) if t >= first}  # a repeated position: its last value
    # Heads are independent recurrences: a head the hook never changed keeps its unedited reads.
    heads = torch.nonzero(changed.any(dim=0)).flatten().tolist()
    return replace_states(scan, read, q, o, edits, returned, replacements, slice(heads[0], heads[-1] + 1))


def replace_states(
    scan: SegmentScan,
    read: StateRead,
    q: Float[Tensor, "batch pos head d_k"],
    o: Float[Tensor, "batch pos head d_v"],
    edits: StateEdits,
    returned: Float[Tensor, "batch n_sel head d_k d_v"],
    replacements: dict[int, int],
    heads: slice = slice(None),
) -> tuple[Float[Tensor, "batch pos head d_v"], Float[Tensor, "batch head d_k d_v"]]:
    """Install ``returned[:, replacements[t]]`` as the state at each position ``t`` of ``replacements``.

    ``o`` is the unedited run's output, kept before the first replacement. Replaced positions read
    their returned state: one batched read for all of them, of the ``heads`` whose returned states
    differ from the unedited ones (the other heads' reads are already right). Only the stretches
    between replaced positions are scanned again, each from the last returned state (none at all
    when every position from the first replaced one to the end is replaced). The final state is the last returned one
    when the last position is replaced, else the state after the last stretch.
    """
    length = q.shape[1]
    times = sorted(replacements)
    index = [replacements[t] for t in times]
    o = o.clone()
    at, index = _as_slice(times), _as_slice(index)
    o[:, at, heads] = read(returned[:, index, heads], q[:, at, heads]).to(o.dtype)
    stretches = [(a + 1, b) for a, b in zip(times, [*times[1:], length]) if b > a + 1]
    final_state = returned[:, replacements[times[-1]]]
    for start, stop in stretches:
        inside = {t - start: delta for t, delta in edits.items() if start <= t < stop}
        o[:, start:stop], state, _ = scan(slice(start, stop), returned[:, replacements[start - 1]], inside, None)
        if stop == length:
            final_state = state
    return o, final_state


def _as_slice(index: list[int]) -> slice | list[int]:
    """A run of consecutive indices as a slice (a view, where a list would copy), else the list."""
    return slice(index[0], index[-1] + 1) if index == list(range(index[0], index[-1] + 1)) else index
