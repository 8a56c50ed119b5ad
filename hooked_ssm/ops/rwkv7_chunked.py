"""A chunked (matmul) form of the RWKV-7 recurrence: HookedSSM's default for RWKV-7 forwards.

It computes exactly what :func:`hooked_ssm.ops.rwkv7.recurrent_rwkv7` computes (same orientation,
same inputs), but replaces the per-token loop by one small loop over chunks of ``chunk_size``
tokens: on CPU the per-token loop is bound by memory traffic on the ``[d_k, d_v]`` state (read and
written several times per token, and kept for autograd), while this form touches the state once
per chunk and does the rest with batched matmuls (a whole toy-model forward at T=512 is 2.6x the
recurrent form on CPU). It takes no edits itself: the mixer splits it at edited positions.

Derivation, per head and per chunk with start state ``S_0`` (positions ``t = 1..L``). With the
update ``S_t = diag(w_t) S_{t-1} - b_t e_t + k_t v_t^T``, where ``b_t = a_t * kappa_t`` and
``e_t = kappa_t^T S_{t-1}`` (a row of length d_v), and the cumulative decay
``gamma_t = prod_{s <= t} w_s``::

    S_t   = diag(gamma_t) S_0 + sum_{s <= t} diag(gamma_t / gamma_s) (-b_s e_s + k_s v_s^T)
    e_s   = (kappa_s * gamma_{s-1})^T S_0 - sum_{j < s} P[s, j] e_j + sum_{j < s} Q[s, j] v_j^T
    P[s, j] = (kappa_s * gamma_{s-1})^T (b_j / gamma_j),   Q[s, j] = (kappa_s * gamma_{s-1})^T (k_j / gamma_j)

so ``E = (I + P)^{-1} (Kd S_0 + Q V)`` (a unit lower-triangular solve) and
``O = Rd S_0 - Rb E + Rk V`` with ``Rd = r * gamma`` and ``Rb``, ``Rk`` built like ``P``, ``Q`` from
``r_t * gamma_t`` (diagonal included). The factors ``gamma`` and ``1/gamma`` are safe because
RWKV-7's decay is bounded below (``w >= exp(-e^-0.5) ~ 0.545``): over 16 tokens
``1/gamma <= 1.6e4``, far from float32's range, and each product ``gamma_s / gamma_j`` keeps full
relative precision.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from hooked_ssm.ops.causality import all_finite
from hooked_ssm.ops.rwkv7 import recurrent_rwkv7

DEFAULT_CHUNK_SIZE = 16


def _to_chunks(x: Float[Tensor, "batch pos head d"], pad: int, chunk: int) -> Float[Tensor, "batch head n chunk d"]:
    """``[batch, pos, head, d] -> [batch, head, n_chunks, chunk, d]``, zero-padded at the end."""
    x = x.transpose(1, 2)
    if pad:
        x = F.pad(x, (0, 0, 0, pad))
    return x.unflatten(2, (-1, chunk))


def chunked_rwkv7(
    r: Float[Tensor, "batch pos head d_k"],
    w: Float[Tensor, "batch pos head d_k"],
    k: Float[Tensor, "batch pos head d_k"],
    v: Float[Tensor, "batch pos head d_v"],
    kappa: Float[Tensor, "batch pos head d_k"],
    a: Float[Tensor, "batch pos head d_k"],
    initial_state: Float[Tensor, "batch head d_k d_v"] | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[Float[Tensor, "batch pos head d_v"], Float[Tensor, "batch head d_k d_v"]]:
    """``(o, final_state)`` of the RWKV-7 recurrence, computed chunk by chunk (differentiable)."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}.")
    if not all_finite(r, w, k, v, kappa, a, initial_state) or not bool((w > 0).all()):  # see ops.causality
        return recurrent_rwkv7(r, w, k, v, kappa, a, initial_state)[:2]
    # At least float32 (float64 inputs stay float64, for tests); under CUDA autocast the matmuls
    # would otherwise run in bf16, too coarse for the 1/gamma factors.
    dtype = torch.promote_types(r.dtype, torch.float32)
    with torch.autocast(r.device.type, enabled=False):
        inputs = (x.to(dtype) for x in (r, w, k, v, kappa, a))
        state = None if initial_state is None else initial_state.to(dtype)
        return _chunked(*inputs, state, chunk_size)


def _chunked(r, w, k, v, kappa, a, initial_state, chunk):
    batch, length, heads, d_k = k.shape
    pad = (-length) % chunk
    # Padded tokens have w = 1 (log 0) and zero r, k, v, kappa, a: they leave the state alone.
    log_w = _to_chunks(w.log(), pad, chunk)
    r_, k_, v_, kappa_, b_ = (_to_chunks(x, pad, chunk) for x in (r, k, v, kappa, a * kappa))
    cum = log_w.cumsum(dim=-2)  # log gamma_t (inclusive)
    gamma, gamma_prev, inv_gamma = cum.exp(), (cum - log_w).exp(), (-cum).exp()

    kappa_dec = kappa_ * gamma_prev  # kappa_s * gamma_{s-1}
    r_dec = r_ * gamma  # r_t * gamma_t
    b_inv, k_inv = b_ * inv_gamma, k_ * inv_gamma
    strict = torch.ones(chunk, chunk, dtype=torch.bool, device=r.device).tril(-1)
    incl = torch.ones(chunk, chunk, dtype=torch.bool, device=r.device).tril()
    P = (kappa_dec @ b_inv.mT).masked_fill(~strict, 0.0)
    Q = (kappa_dec @ k_inv.mT).masked_fill(~strict, 0.0)
    Rb = (r_dec @ b_inv.mT).masked_fill(~incl, 0.0)
    Rk = (r_dec @ k_inv.mT).masked_fill(~incl, 0.0)

    # Everything that does not depend on the chunk's start state, for all chunks at once.
    eye = torch.eye(chunk, dtype=r.dtype, device=r.device)
    lower = eye + P
    e_from_state = torch.linalg.solve_triangular(lower, kappa_dec, upper=False, unitriangular=True)
    e_from_values = torch.linalg.solve_triangular(lower, Q @ v_, upper=False, unitriangular=True)
    o_from_values = Rk @ v_
    to_end = (cum[..., -1:, :] - cum).exp()  # gamma_L / gamma_s, all <= 1
    gamma_end = gamma[..., -1:, :].mT  # [.., d_k, 1]
    b_end, k_end = b_ * to_end, k_ * to_end

    state = k.new_zeros(batch, heads, d_k, v.shape[-1]) if initial_state is None else initial_state
    outputs = []
    for i in range(log_w.shape[2]):  # the only sequential part: one step per chunk
        e = e_from_state[:, :, i] @ state + e_from_values[:, :, i]
        outputs.append(r_dec[:, :, i] @ state - Rb[:, :, i] @ e + o_from_values[:, :, i])
        state = gamma_end[:, :, i] * state - b_end[:, :, i].mT @ e + k_end[:, :, i].mT @ v_[:, :, i]
    o = torch.cat(outputs, dim=2)[:, :, :length].transpose(1, 2)
    return o, state
