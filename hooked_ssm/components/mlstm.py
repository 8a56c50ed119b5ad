"""xLSTM's mLSTM matrix memory (``xLSTMForCausalLM``, ``NX-AI/xLSTM-7b``), with every quantity of the
recurrence hooked.

Per head (key-major memory ``C`` ``[d_k, d_v]``, normaliser ``n`` ``[d_k]``), with the soft-capped gate
pre-activations ``i~_t = cap(W_i x + b_i)`` (exponential input gate ``exp(i~_t)``) and
``f~_t = cap(W_f x + b_f)`` (forget gate ``sigmoid(f~_t)``), transformers' recurrence is::

    m_t = max(m_{t-1} + log sigmoid(f~_t), i~_t)                    the stabiliser (m_0 = 0)
    a_t = exp(log sigmoid(f~_t) + m_{t-1} - m_t)                     hook_decay, in (0, 1]
    s_t = exp(i~_t - m_t)                                            the stabilised input gate, in (0, 1]
    C_t = a_t C_{t-1} + k_t (s_t v_t)^T                              hook_write = k_t (s_t v_t)^T, hook_state = C_t
    n_t = a_t n_{t-1} + s_t k_t
    D_t = max(|n_t . q_t| / sqrt(d_k), exp(-m_t)) + eps              hook_normalizer
    o_t = C_t^T q^_t,  q^_t = q_t / (sqrt(d_k) D_t)                  hook_q = q^_t, hook_read = o_t
    z_t = sigmoid(W_o x) * w * layernorm_per_head(o_t)               hook_gate = W_o x, hook_z = z_t

**The stabiliser.** ``C_t``, ``n_t`` are transformers' states (what its ``xLSTMCache`` holds):
``exp(-m_t)`` times the unstabilised ``sum_s exp(i~_s + sum_{s<r<=t} log sigmoid(f~_r)) k_s v_s^T``.
``m_t`` depends on the gates only, never on the memory, so with it folded into ``a_t`` and ``s_t``
the memory update is affine with state-independent coefficients, a gated linear attention with a
scalar decay per head: the SSD recurrence of Mamba-2, run by the same scan
(``mamba2.scan_ssd_with_hooks``), the normaliser being the same scan with a value of 1. Hence:

- ``hook_write`` and ``hook_state`` live in the stabilised units of their position (bounded by
  ``|k| |v|``: ``s_t <= 1``, ``a_t <= 1``), exactly what transformers' cache stores at ``t``. A write
  edit ``W'`` at ``t`` adds ``W' - W`` to ``C_t`` and reaches ``t' > t`` as ``prod a`` times it: in
  unstabilised units the same edit times ``exp(m_t)``, carried by the true forget gates.
- Write and state edits move the memory ``C`` only. The normaliser ``n_t`` (gated keys, not a
  function of ``v``) and the stabiliser keep their unedited values, so the read of an edited memory
  divides by the unedited ``D_t``; it is folded into ``hook_q`` (``o_t = C_t^T q^_t`` exactly), so
  the read is linear in the state, as in every mixer, and the closed-form tools of ``writesae_lens``
  (``hook_decay``, ``hook_q``) apply unchanged.
- Edits of ``hook_igate`` / ``hook_fgate`` are inputs: ``m``, ``a``, ``s``, ``n`` and ``D`` follow.
  An edit of ``hook_decay`` changes the decay of both ``C`` and ``n`` (``m`` stays); an edit of
  ``hook_normalizer`` rescales the read (``hook_q``); an edit of ``hook_q`` moves the read only.

``hook_write_factors`` is ``[k_t | s_t v_t]``. Pads are identity steps: no write (``s = 0``), no
decay, ``m`` unchanged. ``m`` is computed in float64 as ``L_t + max(m_0, cummax(i~ - L))`` with
``L`` the cumulative log forget gate, the closed form of its max-plus recurrence.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor
from transformer_lens.hook_points import HookPoint
from transformer_lens.utilities import apply_softcap

from hooked_ssm.components.mamba2 import scan_ssd_with_hooks
from hooked_ssm.components.padding import fill_pads, real_tokens
from hooked_ssm.components.recurrent_mixer import log_decay_through_hook, observe_write_factors, runs_recurrent
from hooked_ssm.config import HookedSSMConfig
from hooked_ssm.hook_names import MATRIX_STATE_HOOK_DIMS, HookDims
from hooked_ssm.ops.ssd import chunked_ssd, recurrent_ssd


@dataclass
class MLSTMCache:
    """An mLSTM layer's decoding cache: transformers' ``(C, n, m)`` (key-major ``C``)."""

    ssm_state: Float[Tensor, "batch head d_k d_v"] | None = None  # float32, stabilised memory C
    normalizer: Float[Tensor, "batch head d_k"] | None = None  # float32, stabilised normaliser n
    max_state: Float[Tensor, "batch head"] | None = None  # float32, stabiliser m


def stabilizer(
    log_forget: Float[Tensor, "batch pos head"], log_input: Float[Tensor, "batch pos head"], initial: Float[Tensor, "batch head"]
) -> Float[Tensor, "batch pos head"]:
    """``m_t = max(m_{t-1} + log_forget_t, log_input_t)`` from ``m_0 = initial``, without a loop:
    ``m_t = L_t + max(m_0, max_{s<=t} (log_input_s - L_s))``, ``L`` the cumulative ``log_forget``
    (float64, so that long sums lose nothing against the per-token recurrence)."""
    cumulative = log_forget.double().cumsum(dim=1)
    best = torch.cummax(log_input.double() - cumulative, dim=1).values
    return cumulative + torch.maximum(best, initial.double()[:, None])


class MLSTMMixer(nn.Module):
    HOOK_DIMS: HookDims = {**MATRIX_STATE_HOOK_DIMS, "hook_gate": ("d_v",)}

    def __init__(self, cfg: HookedSSMConfig):
        super().__init__()
        self.n_heads, self.d_k, self.d_v = cfg.n_heads, cfg.d_k, cfg.d_v
        self.chunk_size, self.execution = cfg.chunk_size, cfg.execution
        self.gate_soft_cap, self.eps, self.norm_eps = cfg.mlstm_gate_soft_cap, cfg.mlstm_eps, cfg.eps
        self.q_proj = nn.Linear(cfg.d_model, self.n_heads * self.d_k, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, self.n_heads * self.d_k, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, self.n_heads * self.d_v, bias=False)
        self.output_gate = nn.Linear(cfg.d_model, self.n_heads * self.d_v, bias=False)
        self.input_gate = nn.Linear(cfg.d_model, self.n_heads)
        self.forget_gate = nn.Linear(cfg.d_model, self.n_heads)
        self.norm_w = nn.Parameter(torch.ones(self.n_heads * self.d_v))  # weight of the per-head LayerNorm
        self.out_proj = nn.Linear(self.n_heads * self.d_v, cfg.d_model, bias=False)

        self.hook_k = HookPoint()  # [batch, pos, head, d_k]: W_k x
        self.hook_v = HookPoint()  # [batch, pos, head, d_v]: W_v x
        self.hook_igate = HookPoint()  # [batch, pos, head]: i~_t, soft-capped log input gate
        self.hook_fgate = HookPoint()  # [batch, pos, head]: f~_t, soft-capped forget-gate logit
        self.hook_decay = HookPoint()  # [batch, pos, head]: a_t = exp(log sigmoid(f~_t) + m_{t-1} - m_t), 1 at pads
        self.hook_normalizer = HookPoint()  # [batch, pos, head]: D_t = max(|n_t.q_t|/sqrt(d_k), exp(-m_t)) + eps
        self.hook_q = HookPoint()  # [batch, pos, head, d_k]: read query q_t / (sqrt(d_k) D_t)
        self.hook_gate = HookPoint()  # [batch, pos, head, d_v]: output-gate logits W_o x
        self.hook_write = HookPoint()  # [batch, pos, head, d_k*d_v]: k_t (s_t v_t)^T, key-major, stabilised
        self.hook_write_factors = HookPoint()  # [batch, pos, head, d_k+d_v]: [k_t | s_t v_t], observation only
        self.hook_state = HookPoint()  # [batch, pos or selected pos, head, d_k*d_v]: stabilised memory C_t
        self.hook_read = HookPoint()  # [batch, pos, head, d_v]: C_t^T q^_t, transformers' h_t
        self.hook_z = HookPoint()  # [batch, pos, head, d_v]: gated, normed output entering out_proj

    @property
    def W_O(self) -> Float[Tensor, "head d_v d_model"]:
        return self.out_proj.weight.T.reshape(self.n_heads, self.d_v, -1)

    def forward(
        self,
        x: Float[Tensor, "batch pos d_model"],
        cache: MLSTMCache | None = None,
        attention_mask: Tensor | None = None,
        state_positions: Sequence[int] | None = None,
    ) -> Float[Tensor, "batch pos d_model"]:
        batch, length, _ = x.shape
        real = real_tokens(attention_mask, length)
        heads = lambda y, d: y.float().view(batch, length, self.n_heads, d)  # noqa: E731
        q = heads(self.q_proj(x), self.d_k)
        k, v = self.hook_k(heads(self.k_proj(x), self.d_k)), self.hook_v(heads(self.v_proj(x), self.d_v))
        log_input = self.hook_igate(apply_softcap(self.input_gate(x).float(), self.gate_soft_cap))
        forget = self.hook_fgate(apply_softcap(self.forget_gate(x).float(), self.gate_soft_cap))
        gate = self.hook_gate(self.output_gate(x).view(batch, length, self.n_heads, self.d_v))

        # Pads: log forget 0 and log input -inf, so m_t = m_{t-1}, a_t = 1, s_t = 0 (identity steps).
        log_forget = fill_pads(F.logsigmoid(forget), real)
        log_input = fill_pads(log_input, real, float("-inf"))
        continuing = cache is not None and cache.max_state is not None
        initial_max = cache.max_state if continuing else x.new_zeros(batch, self.n_heads, dtype=torch.float32)
        m = stabilizer(log_forget, log_input, initial_max)
        previous = torch.cat([initial_max.double()[:, None], m[:, :-1]], dim=1)
        log_decay = log_decay_through_hook(self.hook_decay, (log_forget + previous - m).float())
        strength = (log_input - m).exp().float()  # s_t
        m = m.float()

        initial_n = cache.normalizer[..., None] if continuing else None
        # The normaliser is the same recurrence with the value 1: its read is n_t . q_t.
        if runs_recurrent(self.execution, length, x.device):
            n_dot_q, final_n, _ = recurrent_ssd(q, k, strength[..., None], log_decay, initial_n)
        else:
            n_dot_q, final_n, _ = chunked_ssd(q, k, strength[..., None], log_decay, initial_n, self.chunk_size)
        normalizer = torch.maximum(n_dot_q.squeeze(-1).abs() * self.d_k**-0.5, (-m).exp()) + self.eps
        normalizer = self.hook_normalizer(normalizer)
        q = self.hook_q(q * (self.d_k**-0.5 / normalizer)[..., None])

        written = strength[..., None] * v
        observe_write_factors(self.hook_write_factors, lambda: (k, written))
        initial_state = None if cache is None else cache.ssm_state
        o, final_state = scan_ssd_with_hooks(self, q, k, written, log_decay, initial_state, state_positions)
        if cache is not None:
            cache.ssm_state, cache.normalizer = final_state, final_n.squeeze(-1)
            cache.max_state = m[:, -1] if length else initial_max

        read = self.hook_read(o)
        normed = F.layer_norm(read, (self.d_v,), eps=self.norm_eps).to(x.dtype) * self.norm_w.view(self.n_heads, self.d_v)
        z = self.hook_z(torch.sigmoid(gate) * normed)
        return self.out_proj(z.flatten(-2))
