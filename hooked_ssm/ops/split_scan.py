"""Exact additive state edits for any chunked scan whose update is affine in the state.

Adding ``D`` to the state after the update at ``t`` is exact if the scan is split at ``t``: scan
up to ``t``, add ``D`` to the carried state, correct the read at ``t`` (``o_t += D^T q_t``), scan
on. Shared by the Gated DeltaNet and Mamba-2 (SSD) scans.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

StateEdits = Mapping[int, Float[Tensor, "batch head d_k d_v"]]
# chunked(segment, initial_state) -> (o for the segment, state after it)
ChunkedScan = Callable[[slice, Tensor | None], tuple[Tensor, Tensor]]
# recurrent() -> (o, final_state, states at state_positions or None), edits applied
RecurrentScan = Callable[[], tuple[Tensor, Tensor, Tensor | None]]


def scan_split_at_edits(
    chunked: ChunkedScan,
    recurrent: RecurrentScan,
    q: Float[Tensor, "batch pos head d_k"],
    initial_state: Tensor | None,
    edits: StateEdits,
    state_positions: Sequence[int] | None,
    chunk_size: int,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Run ``chunked`` segment by segment, split at the edited positions and the wanted states.

    Each split costs one more chunked call, so when the breakpoints are dense (segments shorter
    than ``chunk_size // 4`` on average) ``recurrent`` runs instead: it is then the cheaper form.
    """
    length = q.shape[1]
    breakpoints = sorted(set(edits) | set(state_positions or ()))
    if len(breakpoints) * max(chunk_size // 4, 1) > length:
        return recurrent()
    state, outputs, states, start = initial_state, [], {}, 0
    for end in [*breakpoints, length - 1]:
        if end < start:  # the last breakpoint was the final position
            continue
        o, state = chunked(slice(start, end + 1), state)
        if end in edits:
            state = state + edits[end]
            # The read at `end` happens after the update, so it sees the edit too.
            o = o.clone()
            o[:, -1] += torch.einsum("bhkv,bhk->bhv", edits[end], q[:, end])
        states[end] = state
        outputs.append(o)
        start = end + 1
    selected = torch.stack([states[t] for t in state_positions], dim=1) if state_positions else None
    return torch.cat(outputs, dim=1), state, selected
