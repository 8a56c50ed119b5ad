"""The Mamba-2 state-space recurrence (SSD, scalar decay per head) as pure functions: a recurrent
(reference) form, a chunked form, and a form that applies exact additive state edits.

Orientation is key-major, like every recurrence in hooked_ssm: per head the state ``h`` is
``[d_state, headdim]`` (the transpose of the ``[headdim, d_state]`` that transformers and mamba_ssm
store) and, with ``k_t = B_t``, ``q_t = C_t``, ``v_t = dt_t x_t``, ``log_decay_t = dt_t A``::

    h_t = exp(log_decay_t) h_{t-1} + k_t v_t^T          (the update; the write is k_t v_t^T)
    o_t = h_t^T q_t                                    (the read, after the update)

The D skip (``D x_t``), the gate and the norm live outside, in the mixer. Inputs are float32 and
already expanded from groups to heads.

The update is affine in ``h`` (the transition ``exp(log_decay_t)`` does not depend on the state), so
an additive edit of the state after position ``t`` is exact when the chunked scan is split at ``t``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from hooked_ssm.ops.causality import all_finite
from hooked_ssm.ops.split_scan import scan_split_at_edits, states_inside_chunks

StateEdits = Mapping[int, Float[Tensor, "batch head d_state headdim"]]


def _zero_state(k: Tensor, v: Tensor) -> Tensor:
    batch, _, heads, d_state = k.shape
    return k.new_zeros(batch, heads, d_state, v.shape[-1])


def segment_sum(x: Float[Tensor, "... c"]) -> Float[Tensor, "... c c"]:
    """``out[..., i, j] = sum_{j < s <= i} x[..., s]`` for ``j <= i`` and ``-inf`` above the diagonal.

    Computed as a masked cumulative sum (not a difference of cumulative sums), which keeps
    long chunks of strong decay accurate.
    """
    size = x.shape[-1]
    expanded = x[..., None].expand(*x.shape, size)  # [..., i, j] = x_i
    strictly_lower = torch.ones(size, size, dtype=torch.bool, device=x.device).tril(-1)
    summed = expanded.masked_fill(~strictly_lower, 0.0).cumsum(dim=-2)
    lower = torch.ones(size, size, dtype=torch.bool, device=x.device).tril()
    return summed.masked_fill(~lower, float("-inf"))


def recurrent_ssd(
    q: Float[Tensor, "batch pos head d_state"],
    k: Float[Tensor, "batch pos head d_state"],
    v: Float[Tensor, "batch pos head headdim"],
    log_decay: Float[Tensor, "batch pos head"],
    initial_state: Float[Tensor, "batch head d_state headdim"] | None = None,
    edits: StateEdits | None = None,
    state_positions: Sequence[int] | None = None,
) -> tuple[
    Float[Tensor, "batch pos head headdim"],
    Float[Tensor, "batch head d_state headdim"],
    Float[Tensor, "batch n_sel head d_state headdim"] | None,
]:
    """Token-by-token SSD, the reference the chunked form is tested against.

    Returns ``(o, final_state, states)``; ``states`` holds ``h_t`` (after any edit at ``t``) for each
    position in ``state_positions`` (None when none is asked for).
    """
    state = _zero_state(k, v) if initial_state is None else initial_state
    edits = edits or {}
    wanted = set(state_positions or ())
    decay = log_decay.exp()
    outputs, states = [], {}
    for t in range(q.shape[1]):
        state = state * decay[:, t, :, None, None] + k[:, t, :, :, None] * v[:, t, :, None, :]
        if t in edits:
            state = state + edits[t]
        outputs.append(torch.einsum("bhkv,bhk->bhv", state, q[:, t]))
        if t in wanted:
            states[t] = state
    o = torch.stack(outputs, dim=1) if outputs else v.new_zeros(v.shape)
    selected = torch.stack([states[t] for t in state_positions], dim=1) if state_positions else None
    return o, state, selected


def chunked_ssd(
    q: Float[Tensor, "batch pos head d_state"],
    k: Float[Tensor, "batch pos head d_state"],
    v: Float[Tensor, "batch pos head headdim"],
    log_decay: Float[Tensor, "batch pos head"],
    initial_state: Float[Tensor, "batch head d_state headdim"] | None = None,
    chunk_size: int = 64,
    state_positions: Sequence[int] | None = None,
) -> tuple[
    Float[Tensor, "batch pos head headdim"],
    Float[Tensor, "batch head d_state headdim"],
    Float[Tensor, "batch n_sel head d_state headdim"] | None,
]:
    """Chunkwise SSD (the "state space duality" algorithm of Mamba-2).

    Inside a chunk the output is a masked, decay-weighted attention ``(q k^T * L) v`` with
    ``L[i, j] = exp(sum_{j<s<=i} log_decay_s)``; the chunk's effect on the state is carried to the
    next chunk. Padding to a multiple of ``chunk_size`` uses ``k = v = 0``, ``log_decay = 0``
    tokens, which leave the state untouched. Returns ``(o, final_state, states)``, ``states`` holding
    ``h_t`` for each position in ``state_positions`` (None when none is asked for).
    """
    batch, length, heads, _ = k.shape
    if not all_finite(q, k, v, log_decay, initial_state):  # see hooked_ssm.ops.causality
        return recurrent_ssd(q, k, v, log_decay, initial_state, None, state_positions)
    state = _zero_state(k, v) if initial_state is None else initial_state
    if length == 0:
        return v.new_zeros(v.shape), state, None
    pad = (-length) % chunk_size

    def to_chunks(x: Tensor) -> Tensor:  # [batch, head, n_chunks, chunk, ...]
        x = x.transpose(1, 2)
        x = F.pad(x, (0, 0, 0, pad)) if x.dim() == 4 else F.pad(x, (0, pad))
        return x.reshape(batch, heads, -1, chunk_size, *x.shape[3:])

    q_c, k_c, v_c, a_c = map(to_chunks, (q, k, v, log_decay))
    pair_decay = segment_sum(a_c).exp()  # [b, h, n, c, c]
    intra = ((q_c @ k_c.transpose(-1, -2)) * pair_decay) @ v_c  # [b, h, n, c, headdim]
    cum = a_c.cumsum(dim=-1)
    q_decayed = q_c * cum.exp()[..., None]  # reads of the state entering the chunk
    k_to_end = k_c * pair_decay[..., -1, :, None]  # each write, decayed to the chunk end
    chunk_decay = cum[..., -1].exp()[..., None, None]

    outputs, entering = [], []
    for i in range(q_c.shape[2]):
        outputs.append(q_decayed[:, :, i] @ state + intra[:, :, i])
        if state_positions:
            entering.append(state)
        state = state * chunk_decay[:, :, i] + k_to_end[:, :, i].transpose(-1, -2) @ v_c[:, :, i]
    o = torch.stack(outputs, dim=2).reshape(batch, heads, -1, v.shape[-1])[:, :, :length]
    states = None
    if state_positions:
        states = states_inside_chunks(torch.stack(entering, dim=2), k_c, v_c, pair_decay, cum, state_positions, chunk_size)
    return o.transpose(1, 2), state, states


def ssd_with_edits(
    q: Float[Tensor, "batch pos head d_state"],
    k: Float[Tensor, "batch pos head d_state"],
    v: Float[Tensor, "batch pos head headdim"],
    log_decay: Float[Tensor, "batch pos head"],
    initial_state: Float[Tensor, "batch head d_state headdim"] | None = None,
    edits: StateEdits | None = None,
    state_positions: Sequence[int] | None = None,
    chunk_size: int = 64,
) -> tuple[
    Float[Tensor, "batch pos head headdim"],
    Float[Tensor, "batch head d_state headdim"],
    Float[Tensor, "batch n_sel head d_state headdim"] | None,
]:
    """Chunked SSD split at the edited positions and at the positions whose state is wanted.

    Exact for additive edits of the state (see the module docstring). Each split costs one more
    chunked call, so when the breakpoints are dense (segments shorter than ``chunk_size // 4``
    on average) the recurrent form is used instead.
    """
    edits = edits or {}
    return scan_split_at_edits(
        lambda seg, state, positions: chunked_ssd(
            q[:, seg], k[:, seg], v[:, seg], log_decay[:, seg], state, chunk_size, positions
        ),
        lambda: recurrent_ssd(q, k, v, log_decay, initial_state, edits, state_positions),
        q, initial_state, edits, state_positions, chunk_size,
    )
