"""Exact additive state edits for any chunked scan whose update is affine in the state, and the
states at chosen positions from inside the chunks.

Adding ``D`` to the state after the update at ``t`` is exact if the scan is split at ``t``: scan
up to ``t``, add ``D`` to the carried state, correct the read at ``t`` (``o_t += D^T q_t``), scan
on. Shared by the Gated DeltaNet, Mamba-2 (SSD) and RWKV-7 scans (RWKV-7 without in-chunk states).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

StateEdits = Mapping[int, Float[Tensor, "batch head d_k d_v"]]
# chunked(segment, initial_state, positions in the segment) -> (o, state after it, states at those positions)
ChunkedScan = Callable[[slice, Tensor | None, Sequence[int] | None], tuple[Tensor, Tensor, Tensor | None]]
# recurrent() -> (o, final_state, states at state_positions or None), edits applied
RecurrentScan = Callable[[], tuple[Tensor, Tensor, Tensor | None]]


def states_inside_chunks(
    entering: Float[Tensor, "batch head n_chunks d_k d_v"],
    keys: Float[Tensor, "batch head n_chunks chunk d_k"],
    values: Float[Tensor, "batch head n_chunks chunk d_v"],
    pair_decay: Float[Tensor, "batch head n_chunks chunk chunk"] | None,
    cum_log_decay: Float[Tensor, "batch head n_chunks chunk"] | Float[Tensor, "batch head n_chunks chunk d_k"],
    positions: Sequence[int],
    chunk_size: int,
) -> Float[Tensor, "batch n_sel head d_k d_v"]:
    """The states after the updates at ``positions``, from the chunk scan's own quantities.

    Inside a chunk the state after position ``t`` (offset ``r``) is
    ``S_t = exp(cum_r) S_enter + sum_{j <= r} pair_decay[r, j] k_j values_j^T``: the entering state
    decayed, plus the chunk's writes so far, each decayed to ``t`` (``values`` are what was actually
    written: the delta-rule values for Gated DeltaNet, ``dt x`` for SSD; ``cum_log_decay`` is the
    in-chunk cumulative log decay, ``pair_decay`` zero above the diagonal; where the decay is per
    key channel (Kimi Delta Attention) ``cum_log_decay`` has a trailing d_k axis and ``pair_decay``
    is None: the states are walked). Computed for whole chunks (those holding a wanted position),
    all chunks in parallel, never token by token.
    """
    index = torch.as_tensor(list(positions), device=keys.device)
    chunk, offset = index // chunk_size, index % chunk_size
    needed, slot = torch.unique(chunk, return_inverse=True)
    if len(needed) < keys.shape[2]:  # only the chunks holding a wanted position
        entering, keys, values, pair_decay, cum_log_decay = (
            None if x is None else x.index_select(2, needed)
            for x in (entering, keys, values, pair_decay, cum_log_decay)
        )
    form = _states_by_matmul if keys.is_cuda and pair_decay is not None else _states_by_walk
    states = form(entering, keys, values, pair_decay, cum_log_decay).flatten(-2)  # [b, h, n, c, d_k*d_v]
    if index.tolist() == list(range(len(index))):  # a prefix of the positions (e.g. all): a view, no gather
        selected = states.flatten(2, 3)[:, :, : len(index)]
    else:
        selected = states[:, :, slot, offset]
    return selected.transpose(1, 2).unflatten(-1, entering.shape[-2:])


def _states_by_matmul(entering, keys, values, pair_decay, cum_log_decay):
    """GPU form: one matmul of the decay matrix with the chunk's writes (few large kernels; it
    does ``chunk`` times the arithmetic of the walk, which launch-bound GPUs do not notice)."""
    writes = (keys[..., :, None] * values[..., None, :]).flatten(-2)
    states = pair_decay @ writes
    states.addcmul_(cum_log_decay.exp()[..., None], entering.flatten(-2)[:, :, :, None])
    return states.unflatten(-1, entering.shape[-2:])


def _states_by_walk(entering, keys, values, pair_decay, cum_log_decay):
    """CPU form: ``S_r = exp(a_r) S_{r-1} + k_r values_r^T`` over the positions of a chunk, every
    chunk at once (``chunk`` batched steps, not one per token; arithmetic-bound CPUs prefer it)."""
    per_channel = cum_log_decay.dim() == keys.dim()  # [.., chunk, d_k], else [.., chunk]
    cum = cum_log_decay if per_channel else cum_log_decay[..., None]
    step_log_decay = torch.diff(cum, dim=-2, prepend=torch.zeros_like(cum[..., :1, :]))
    step_decay = step_log_decay.exp()[..., None]  # scales the rows of the state: [.., chunk, d_k or 1, 1]
    state, walked = entering, []
    for r in range(keys.shape[3]):
        state = torch.addcmul(keys[:, :, :, r, :, None] * values[:, :, :, r, None, :], step_decay[:, :, :, r], state)
        walked.append(state)
    return torch.stack(walked, dim=3)


def scan_split_at_edits(
    chunked: ChunkedScan,
    recurrent: RecurrentScan,
    q: Float[Tensor, "batch pos head d_k"],
    initial_state: Tensor | None,
    edits: StateEdits,
    state_positions: Sequence[int] | None,
    chunk_size: int,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Run ``chunked`` segment by segment, split at the edited positions.

    Wanted states come from inside each segment's chunks (``states_inside_chunks``), so they cost
    no splits. Each edit costs one more chunked call, so when edits are dense (segments shorter
    than ``chunk_size // 4`` on average) ``recurrent`` runs instead: it is then the cheaper form.
    """
    length = q.shape[1]
    breakpoints = sorted(edits)
    if len(breakpoints) * max(chunk_size // 4, 1) > length:
        return recurrent()
    wanted = sorted(set(state_positions or ()))
    state, outputs, states, start = initial_state, [], {}, 0
    for end in [*breakpoints, length - 1]:
        if end < start:  # the last breakpoint was the final position
            continue
        inside = [t for t in wanted if start <= t <= end]
        o, state, found = chunked(slice(start, end + 1), state, [t - start for t in inside] or None)
        states.update(zip(inside, found.unbind(dim=1) if inside else ()))
        if end in edits:
            state = state + edits[end]
            # The read at `end` happens after the update, so it sees the edit too; so does its state.
            o = o.clone()
            o[:, -1] += torch.einsum("bhkv,bhk->bhv", edits[end], q[:, end])
            if end in states:
                states[end] = state
        outputs.append(o)
        start = end + 1
    if len(outputs) == 1 and list(state_positions or ()) == wanted and not edits:
        return outputs[0], state, found  # one segment, positions in order: no re-stacking
    selected = torch.stack([states[t] for t in state_positions], dim=1) if state_positions else None
    return torch.cat(outputs, dim=1), state, selected
