"""Kimi Delta Attention (KDA: ``KimiLinearForCausalLM``, ``BailingHybridForCausalLM``), with every quantity
of the recurrence hooked. The gated delta rule with a decay per key channel instead of per head; run
by the Gated DeltaNet scan (``hooked_ssm.ops.gated_delta_rule`` takes either decay). Per head
(key-major state ``S`` ``[d_k, d_v]``, ``A_t = diag(a_t)``, ``a_t`` in ``(0, 1]^{d_k}``)::

    S_t = (I - b_t k_t k_t^T) A_t S_{t-1} + b_t k_t v_t^T        hook_write = b_t k_t v_t^T
        = A_t S_{t-1} + k_t u_t^T,  u_t = b_t (v_t - (A_t S_{t-1})^T k_t)   hook_delta_v = u_t
    o_t = S_t^T q_t                                              hook_read = o_t
    y_t = w * o_t / rms(o_t) * sigmoid(z_t)                      hook_z = y_t

with ``q, k, v = silu(conv(W_q x | W_k x | W_v x))``, ``q, k`` L2-normalised (``q`` times
``d_k ** -0.5``), ``b_t = sigmoid(W_b x)``, the log decay ``log a_t = -exp(A_log_h) softplus(W_f x +
dt_bias)`` or, bounded, ``L sigmoid(exp(A_log_h) (W_f x + dt_bias))`` (``cfg.kda_gate_lower_bound =
L``: BailingHybrid, GLM-5.3's safe gate); ``W_f`` and the output gate's ``W_g`` are low rank
(``W_b W_a``, rank ``cfg.kda_gate_rank``: Kimi Linear) or full (BailingHybrid).
The write is rank 1 as in Gated DeltaNet, and its edits and ``hook_state`` edits are exact in the
same way (``recurrent_mixer``); ``hook_decay`` is the per-channel ``a_t`` ``[batch, pos, head, d_k]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor
from transformer_lens.hook_points import HookPoint

from hooked_ssm.components.gated_deltanet import scan_delta_rule_with_hooks
from hooked_ssm.components.norms import GatedRMSNorm
from hooked_ssm.components.padding import fill_pads, real_tokens
from hooked_ssm.components.recurrent_mixer import log_decay_through_hook, observe_write_factors
from hooked_ssm.config import HookedSSMConfig
from hooked_ssm.hook_names import MATRIX_STATE_HOOK_DIMS, HookDims
from hooked_ssm.ops.causal_conv import causal_depthwise_conv
from hooked_ssm.ops.gated_delta_rule import l2_normalize
from hooked_ssm.state import MixerCache


def _projection(d_model: int, width: int, rank: int) -> nn.Module:
    """``x -> W x``, low rank (``W_b W_a``, the checkpoint's ``*_a_proj`` / ``*_b_proj``) when ``rank > 0``."""
    if rank <= 0:
        return nn.Linear(d_model, width, bias=False)
    return nn.Sequential(nn.Linear(d_model, rank, bias=False), nn.Linear(rank, width, bias=False))


class KimiDeltaAttentionMixer(nn.Module):
    HOOK_DIMS: HookDims = {**MATRIX_STATE_HOOK_DIMS, "hook_decay": ("d_k",), "hook_delta_v": ("d_v",),
                           "hook_gate": ("d_v",)}

    def __init__(self, cfg: HookedSSMConfig):
        super().__init__()
        self.n_heads, self.d_k, self.d_v = cfg.n_heads, cfg.d_k, cfg.d_v
        self.chunk_size, self.execution = cfg.chunk_size, cfg.execution
        key_dim, value_dim = self.n_heads * self.d_k, self.n_heads * self.d_v
        self.q_proj = nn.Linear(cfg.d_model, key_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, key_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, value_dim, bias=False)
        self.conv_weight = nn.Parameter(torch.empty(2 * key_dim + value_dim, cfg.conv_kernel))  # q | k | v channels
        nn.init.normal_(self.conv_weight, std=cfg.conv_kernel**-0.5)
        self.f_proj = _projection(cfg.d_model, key_dim, cfg.kda_gate_rank)  # forget gate, one per key channel
        self.dt_bias = nn.Parameter(torch.zeros(key_dim))
        self.A_log = nn.Parameter(torch.zeros(self.n_heads))
        self.gate_lower_bound = cfg.kda_gate_lower_bound
        self.b_proj = nn.Linear(cfg.d_model, self.n_heads, bias=False)
        self.g_proj = _projection(cfg.d_model, value_dim, cfg.kda_gate_rank)  # output gate
        self.norm = GatedRMSNorm(self.d_v, cfg.eps if cfg.gdn_norm_eps is None else cfg.gdn_norm_eps, "sigmoid")
        self.out_proj = nn.Linear(value_dim, cfg.d_model, bias=False)

        self.hook_q = HookPoint()  # [batch, pos, head, d_k]: L2-normalised, scaled by d_k**-0.5
        self.hook_k = HookPoint()  # [batch, pos, head, d_k]: L2-normalised write/erase key
        self.hook_v = HookPoint()  # [batch, pos, head, d_v]
        self.hook_beta = HookPoint()  # [batch, pos, head]: write strength b_t in (0, 1)
        self.hook_decay = HookPoint()  # [batch, pos, head, d_k]: per-channel forget gate a_t = exp(g_t) in (0, 1]
        self.hook_gate = HookPoint()  # [batch, pos, head, d_v]: output gate logits z_t
        self.hook_write = HookPoint()  # [batch, pos, head, d_k*d_v]: b_t k_t v_t^T, key-major
        self.hook_write_factors = HookPoint()  # [batch, pos, head, d_k+d_v]: [k_t | b_t v_t], observation only
        self.hook_delta_v = HookPoint()  # [batch, pos, head, d_v]: u_t = b_t (v_t - (A_t S_{t-1})^T k_t)
        self.hook_state = HookPoint()  # [batch, pos or selected pos, head, d_k*d_v]: S_t after the update
        # hook_state edits replace: position t reads exactly the returned state (recurrent_mixer).
        self.hook_read = HookPoint()  # [batch, pos, head, d_v]: o_t = S_t^T q_t
        self.hook_z = HookPoint()  # [batch, pos, head, d_v]: gated-normed output entering out_proj

    @property
    def W_O(self) -> Float[Tensor, "head d_v d_model"]:
        return self.out_proj.weight.T.reshape(self.n_heads, self.d_v, -1)

    def forward(
        self,
        x: Float[Tensor, "batch pos d_model"],
        cache: MixerCache | None = None,
        attention_mask: Tensor | None = None,
        state_positions: Sequence[int] | None = None,
    ) -> Float[Tensor, "batch pos d_model"]:
        # Pads feed zeros to the conv window (as in transformers) and are identity steps of the
        # recurrence (beta = 0: no write or erase; g = 0: no decay), on either side of the row.
        real = real_tokens(attention_mask, x.shape[1])
        x = fill_pads(x, real)
        batch, length, _ = x.shape
        qkv = torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)
        conv_out, conv_state = causal_depthwise_conv(
            qkv, self.conv_weight, conv_state=None if cache is None else cache.conv_state
        )
        key_dim = self.n_heads * self.d_k
        q, k, v = F.silu(conv_out).float().split([key_dim, key_dim, self.n_heads * self.d_v], dim=-1)
        q = self.hook_q(l2_normalize(q.view(batch, length, self.n_heads, self.d_k)) * self.d_k**-0.5)
        k = self.hook_k(l2_normalize(k.view(batch, length, self.n_heads, self.d_k)))
        v = self.hook_v(v.view(batch, length, self.n_heads, self.d_v))
        beta = self.hook_beta(fill_pads(torch.sigmoid(self.b_proj(x)).float(), real))
        g = self._log_decay(x, real)
        z = self.hook_gate(self.g_proj(x).view(batch, length, self.n_heads, self.d_v))

        observe_write_factors(self.hook_write_factors, lambda: (k, beta[..., None] * v))
        initial_state = None if cache is None else cache.ssm_state
        o, final_state = scan_delta_rule_with_hooks(self, q, k, v, beta, g, initial_state, state_positions)
        if cache is not None:
            cache.conv_state, cache.ssm_state = conv_state, final_state

        o = self.hook_read(o.to(x.dtype))
        y = self.hook_z(self.norm(o, z))
        return self.out_proj(y.reshape(batch, length, -1))

    def _log_decay(self, x: Tensor, real: Tensor | None) -> Float[Tensor, "batch pos head d_k"]:
        gate = (self.f_proj(x).float() + self.dt_bias.float()).view(*x.shape[:2], self.n_heads, self.d_k)
        rate = self.A_log.float().exp()[:, None]
        if self.gate_lower_bound is None:
            g = -rate * F.softplus(gate)
        else:
            g = self.gate_lower_bound * torch.sigmoid(rate * gate)
        return log_decay_through_hook(self.hook_decay, fill_pads(g, real))
