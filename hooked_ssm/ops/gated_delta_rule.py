"""The gated delta rule as pure functions: a recurrent (reference) form, a chunked form, and a
form that applies exact additive edits to the state at chosen positions.

Orientation is key-major throughout: per head the state ``S`` is ``[d_k, d_v]`` and

    S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T        (the update)
    o_t = S_t^T q_t                                                        (the read, after the update)

with ``alpha_t = exp(g_t)``. Inputs are expected already normalised and scaled (``q`` carries the
``d_k ** -0.5`` factor), already expanded to one key per value head, and in float32.

The decay is per head (``g`` ``[batch, pos, head]``: Gated DeltaNet) or per key channel (``g``
``[batch, pos, head, d_k]``: Kimi Delta Attention), where ``alpha_t`` is the diagonal matrix
``diag(exp(g_t))`` applied to the rows of ``S`` before the erase reads it::

    S_t = (I - beta_t k_t k_t^T) diag(alpha_t) S_{t-1} + beta_t k_t v_t^T

(for a per-head decay the two orders coincide). Per head is the special case of a decay broadcast
over d_k; every form below takes either.

The update is affine in ``S``: the transition ``alpha_t (I - beta_t k_t k_t^T)`` does not depend on
the state. So adding a matrix ``D`` to ``S_t`` (a write edit, a state edit) is exact if the scan is
split at ``t``: scan up to ``t``, add ``D`` to the carried state, correct the read at ``t``, scan on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from hooked_ssm.ops.causality import all_finite
from hooked_ssm.ops.split_scan import scan_split_at_edits, states_inside_chunks

# Per-position additive edits of the state after the update at that position: {t: [batch, head, d_k, d_v]}.
StateEdits = Mapping[int, Float[Tensor, "batch head d_k d_v"]]


def l2_normalize(x: Float[Tensor, "... d"], eps: float = 1e-6) -> Float[Tensor, "... d"]:
    """``x / sqrt(sum(x^2) + eps)``: the eps sits inside the root (the FLA / transformers convention)."""
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


# The log decay: per head, or per key channel (Kimi Delta Attention).
LogDecay = Float[Tensor, "batch pos head"] | Float[Tensor, "batch pos head d_k"]


def _zero_state(k: Tensor, v: Tensor) -> Tensor:
    batch, _, heads, d_k = k.shape
    return k.new_zeros(batch, heads, d_k, v.shape[-1])


def _per_channel(g: LogDecay) -> Float[Tensor, "batch pos head d_k_or_1"]:
    """The log decay with a key-channel axis: size d_k (per channel) or 1 (per head, broadcast)."""
    return g if g.dim() == 4 else g[..., None]


def _pair_decay(cum_g: Float[Tensor, "... chunk d_k_or_1"], causal: Tensor) -> Tensor:
    """``exp(cum_i - cum_j)`` for ``j <= i``, 0 above the diagonal: ``[.., chunk, chunk]`` for a
    per-head decay (``cum_g`` ``[.., chunk, 1]``), ``[.., chunk, chunk, d_k]`` per channel. Exponents
    are masked before ``exp``: only ``cum_i - cum_j <= 0`` is exponentiated, however strong the decay."""
    if cum_g.shape[-1] == 1:
        cum = cum_g[..., 0]
        return (cum[..., :, None] - cum[..., None, :]).masked_fill(~causal, float("-inf")).exp()
    diff = cum_g[..., :, None, :] - cum_g[..., None, :, :]
    return diff.masked_fill(~causal[..., None], float("-inf")).exp()


def _intra_chunk_products(
    k_beta: Float[Tensor, "batch head n chunk d_k"],
    k: Float[Tensor, "batch head n chunk d_k"],
    q: Float[Tensor, "batch head n chunk d_k"],
    cum_g: Float[Tensor, "batch head n chunk d_k_or_1"],
    causal: Tensor,
) -> tuple[Float[Tensor, "batch head n chunk chunk"], Float[Tensor, "batch head n chunk chunk"], Tensor | None]:
    """``(system, intra, decay)``: ``M[i, j] = sum_c a_ic k_jc exp(cum_ic - cum_jc)`` for ``j <= i`` (0
    above), with ``a = k_beta`` and ``a = q``.

    A per-head decay factors out of the dot products: two matmuls times the pair decay, which is
    returned for the in-chunk states. A per-channel one does not, so each pair is weighted per
    channel (``[chunk, chunk, d_k]``, as transformers' ``chunk_kimi_delta_attention`` does), one
    chunk at a time to keep that tensor to one chunk's size; no pair decay is returned.
    """
    if cum_g.shape[-1] == 1:
        decay = _pair_decay(cum_g, causal)
        return (k_beta @ k.transpose(-1, -2)) * decay, (q @ k.transpose(-1, -2)) * decay, decay
    system, intra = [], []
    for i in range(cum_g.shape[2]):
        decay = _pair_decay(cum_g[:, :, i], causal)
        system.append(torch.einsum("...ic,...jc,...ijc->...ij", k_beta[:, :, i], k[:, :, i], decay))
        intra.append(torch.einsum("...ic,...jc,...ijc->...ij", q[:, :, i], k[:, :, i], decay))
    return torch.stack(system, dim=2), torch.stack(intra, dim=2), None


def recurrent_gated_delta_rule(
    q: Float[Tensor, "batch pos head d_k"],
    k: Float[Tensor, "batch pos head d_k"],
    v: Float[Tensor, "batch pos head d_v"],
    beta: Float[Tensor, "batch pos head"],
    g: LogDecay,
    initial_state: Float[Tensor, "batch head d_k d_v"] | None = None,
    edits: StateEdits | None = None,
    state_positions: Sequence[int] | None = None,
    return_delta_v: bool = False,
) -> tuple[
    Float[Tensor, "batch pos head d_v"],
    Float[Tensor, "batch head d_k d_v"],
    Float[Tensor, "batch n_sel head d_k d_v"] | None,
    Float[Tensor, "batch pos head d_v"] | None,
]:
    """Token-by-token gated delta rule, the reference every faster form is tested against.

    Returns ``(o, final_state, states, delta_v)``: ``states`` holds ``S_t`` (after any edit at ``t``)
    for each position in ``state_positions``; ``delta_v`` holds the delta-form value
    ``u_t = beta_t (v_t - alpha_t S_{t-1}^T k_t)``, the value actually written (``S_t = alpha_t S_{t-1} + k_t u_t^T``).
    """
    state = _zero_state(k, v) if initial_state is None else initial_state
    edits = edits or {}
    wanted = set(state_positions or ())
    row_decay = _per_channel(g).exp()[..., None]  # [batch, pos, head, d_k or 1, 1]: scales the state's rows
    outputs, states, delta_vs = [], {}, []
    for t in range(q.shape[1]):
        state = state * row_decay[:, t]
        predicted = torch.einsum("bhkv,bhk->bhv", state, k[:, t])
        delta_v = beta[:, t, :, None] * (v[:, t] - predicted)
        state = state + k[:, t, :, :, None] * delta_v[:, :, None, :]
        if t in edits:
            state = state + edits[t]
        outputs.append(torch.einsum("bhkv,bhk->bhv", state, q[:, t]))
        if t in wanted:
            states[t] = state
        if return_delta_v:
            delta_vs.append(delta_v)
    o = torch.stack(outputs, dim=1) if outputs else v.new_zeros(v.shape)
    selected = torch.stack([states[t] for t in state_positions], dim=1) if state_positions else None
    return o, state, selected, torch.stack(delta_vs, dim=1) if return_delta_v else None


def chunked_gated_delta_rule(
    q: Float[Tensor, "batch pos head d_k"],
    k: Float[Tensor, "batch pos head d_k"],
    v: Float[Tensor, "batch pos head d_v"],
    beta: Float[Tensor, "batch pos head"],
    g: LogDecay,
    initial_state: Float[Tensor, "batch head d_k d_v"] | None = None,
    chunk_size: int = 64,
    state_positions: Sequence[int] | None = None,
) -> tuple[
    Float[Tensor, "batch pos head d_v"],
    Float[Tensor, "batch head d_k d_v"],
    Float[Tensor, "batch n_sel head d_k d_v"] | None,
]:
    """Chunkwise-parallel gated delta rule (the WY / UT-transform algorithm of Yang et al.).

    Inside a chunk the ``c`` delta-rule updates collapse into one triangular solve; chunks are then
    scanned sequentially. Padding to a multiple of ``chunk_size`` uses ``g = 0, beta = 0`` tokens,
    which leave the state untouched. Returns ``(o, final_state, states)``, ``states`` holding ``S_t``
    for each position in ``state_positions`` (None when none is asked for).
    """
    batch, length, heads, d_k = k.shape
    if not all_finite(q, k, v, beta, g, initial_state):  # see hooked_ssm.ops.causality
        return recurrent_gated_delta_rule(q, k, v, beta, g, initial_state, None, state_positions)[:3]
    state = _zero_state(k, v) if initial_state is None else initial_state
    if length == 0:
        return v.new_zeros(v.shape), state, None
    # A sequence shorter than a chunk needs no padding up to a full chunk (decoding steps, short prompts).
    chunk_size = min(chunk_size, 1 << (length - 1).bit_length())
    pad = (-length) % chunk_size
    # [batch, head, n_chunks, chunk, ...]
    def to_chunks(x: Tensor) -> Tensor:
        x = x.transpose(1, 2)
        x = F.pad(x, (0, 0, 0, pad)) if x.dim() == 4 else F.pad(x, (0, pad))
        return x.reshape(batch, heads, -1, chunk_size, *x.shape[3:])

    q_c, k_c, v_c, beta_c, g_c = map(to_chunks, (q, k, v, beta, _per_channel(g)))
    # Log of the decay from the chunk start to each position, per key channel (or 1: per head).
    cum_g = g_c.cumsum(dim=-2)
    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).tril()
    k_beta = k_c * beta_c[..., None]
    # decay[i, j] = exp(cum_g_i - cum_g_j) for j <= i (per channel: one per key channel), 0 above the diagonal.
    # UT transform: (I + strictly-lower(k_beta k^T * decay)) [u | w] = [v_beta | k_beta * exp(cum_g)]
    # Only the strictly lower triangle is read: decay is 0 above the diagonal and
    # unitriangular=True takes the diagonal as 1 without looking at it.
    system, intra, decay = _intra_chunk_products(k_beta, k_c, q_c, cum_g, causal)
    pseudo_values = torch.linalg.solve_triangular(system, v_c * beta_c[..., None], upper=False, unitriangular=True)
    state_readers = torch.linalg.solve_triangular(system, k_beta * cum_g.exp(), upper=False, unitriangular=True)
    q_decayed = q_c * cum_g.exp()
    k_to_end = k_c * (cum_g[..., -1:, :] - cum_g).exp()
    chunk_decay = cum_g[..., -1, :].exp()[..., None]  # scales the rows of the state: [.., d_k or 1, 1]

    outputs, entering, written = [], [], []
    for i in range(q_c.shape[2]):
        values = pseudo_values[:, :, i] - state_readers[:, :, i] @ state  # the delta-rule values u_t
        outputs.append(q_decayed[:, :, i] @ state + intra[:, :, i] @ values)
        if state_positions:
            entering.append(state)
            written.append(values)
        state = state * chunk_decay[:, :, i] + k_to_end[:, :, i].transpose(-1, -2) @ values
    o = torch.stack(outputs, dim=2).reshape(batch, heads, -1, v.shape[-1])[:, :, :length]
    states = None
    if state_positions:
        cum = cum_g[..., 0] if cum_g.shape[-1] == 1 else cum_g  # per head: [.., chunk]; per channel: [.., chunk, d_k]
        states = states_inside_chunks(
            torch.stack(entering, dim=2), k_c, torch.stack(written, dim=2), decay, cum, state_positions, chunk_size
        )
    return o.transpose(1, 2), state, states


def gated_delta_rule_with_edits(
    q: Float[Tensor, "batch pos head d_k"],
    k: Float[Tensor, "batch pos head d_k"],
    v: Float[Tensor, "batch pos head d_v"],
    beta: Float[Tensor, "batch pos head"],
    g: LogDecay,
    initial_state: Float[Tensor, "batch head d_k d_v"] | None = None,
    edits: StateEdits | None = None,
    state_positions: Sequence[int] | None = None,
    chunk_size: int = 64,
) -> tuple[
    Float[Tensor, "batch pos head d_v"],
    Float[Tensor, "batch head d_k d_v"],
    Float[Tensor, "batch n_sel head d_k d_v"] | None,
]:
    """Chunked scan split at the edited positions and the positions whose state is wanted.

    Exact for additive edits of the state (see the module docstring). Each split costs one more
    chunked call, so when the breakpoints are dense (segments shorter than ``chunk_size // 4``
    on average) the recurrent form is used instead: it is then the cheaper of the two.
    """
    edits = edits or {}
    return scan_split_at_edits(
        lambda seg, state, positions: chunked_gated_delta_rule(
            q[:, seg], k[:, seg], v[:, seg], beta[:, seg], g[:, seg], state, chunk_size, positions
        ),
        lambda: recurrent_gated_delta_rule(q, k, v, beta, g, initial_state, edits, state_positions)[:3],
        q, initial_state, edits, state_positions, chunk_size,
    )
