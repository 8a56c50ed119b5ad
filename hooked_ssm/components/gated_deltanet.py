"""The Gated DeltaNet mixer of Qwen3.5 / Qwen3-Next, with every quantity of the recurrence hooked.

Per value head ``h`` (key-major state ``S`` of shape ``[d_k, d_v]``)::

    S_t = a_t (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T        hook_write = b_t k_t v_t^T
        = a_t S_{t-1} + k_t u_t^T,  u_t = b_t (v_t - a_t S_{t-1}^T k_t)   hook_delta_v = u_t
    o_t = S_t^T q_t                                               hook_read = o_t
    y_t = w * o_t / rms(o_t) * silu(z_t)  (sigmoid: Qwen4-Exp)    hook_z = y_t

with ``log a_t = -exp(A_log) softplus(W_a x + dt_bias)``. Its variants are parameters: the range of
``b`` (OLMo-Hybrid's (0, 2)), and Kimi Delta Attention's (``kimi_delta_attention``): a decay per
key channel (``a_t`` a vector, ``A_t = diag(a_t)`` applied before the erase:
``S_t = (I - b_t k_t k_t^T) A_t S_{t-1} + b_t k_t v_t^T``), low-rank decay and output-gate
projections, the bounded gate ``log a_t = L sigmoid(exp(A_log) (W_a x + dt_bias))`` and a sigmoid
gate in the output norm.

``hook_write`` is the input-determined rank-1 write (the paper's native write), and
``hook_write_factors`` its factors ``[k_t | b_t v_t]`` (observation only); ``hook_delta_v``
is the state-dependent delta-form value. An edit of either becomes an additive change of the
state at that position and persists: it reaches every later read exactly. An edit of ``hook_state``
replaces: the state that position ``t`` reads is exactly what the hook returned for ``t``, and the
recurrence continues from it (``recurrent_mixer``). Edits of
``hook_q/k/v/beta/decay`` flow into the scan as inputs (an edit of ``k`` also changes what the
delta rule erases). Hooks are per value head, after grouped keys are expanded.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor
from transformer_lens.hook_points import HookPoint

from hooked_ssm.components.norms import GatedRMSNorm
from hooked_ssm.components.padding import fill_pads, real_tokens
from hooked_ssm.components.recurrent_mixer import (
    changed_positions,
    log_decay_through_hook,
    merge_edits,
    observe_write_factors,
    run_hook,
    runs_recurrent,
    scan_with_state_hooks,
    write_edits,
)
from hooked_ssm.config import HookedSSMConfig
from hooked_ssm.dtypes import at_least_fp32
from hooked_ssm.hook_names import MATRIX_STATE_HOOK_DIMS, HookDims
from hooked_ssm.ops.causal_conv import causal_depthwise_conv
from hooked_ssm.ops.gated_delta_rule import (
    LogDecay,
    chunked_gated_delta_rule,
    gated_delta_rule_with_edits,
    l2_normalize,
    recurrent_gated_delta_rule,
)
from hooked_ssm.state import MixerCache


def _projection(d_model: int, width: int, rank: int) -> nn.Module:
    """``x -> W x``, low rank (``W = W_b W_a``: ``.0`` then ``.1``) when ``rank > 0``."""
    if rank <= 0:
        return nn.Linear(d_model, width, bias=False)
    return nn.Sequential(nn.Linear(d_model, rank, bias=False), nn.Linear(rank, width, bias=False))


class GatedDeltaNetMixer(nn.Module):
    HOOK_DIMS: HookDims = {**MATRIX_STATE_HOOK_DIMS, "hook_delta_v": ("d_v",), "hook_gate": ("d_v",)}

    def __init__(
        self,
        cfg: HookedSSMConfig,
        per_channel_decay: bool = False,
        gate_rank: int = 0,
        gate_lower_bound: float | None = None,
        norm_gate: Literal["silu", "sigmoid"] | None = None,
    ):
        """``per_channel_decay``: one decay per key channel; ``gate_rank`` > 0: the decay's and the output
        gate's projections are low rank; ``gate_lower_bound`` L: the bounded decay; ``norm_gate``: the
        output norm's gate activation, default ``cfg.gdn_gate_act`` (Kimi Delta Attention sets them)."""
        super().__init__()
        self.n_heads, self.n_key_heads, self.d_k, self.d_v = cfg.n_heads, cfg.n_key_heads, cfg.d_k, cfg.d_v
        self.chunk_size, self.execution = cfg.chunk_size, cfg.execution
        key_dim, value_dim = self.n_key_heads * self.d_k, self.n_heads * self.d_v
        self.per_channel_decay, self.gate_lower_bound = per_channel_decay, gate_lower_bound
        decay_dim = self.n_heads * self.d_k if per_channel_decay else self.n_heads
        self.in_proj_qkv = nn.Linear(cfg.d_model, 2 * key_dim + value_dim, bias=False)
        self.in_proj_z = _projection(cfg.d_model, value_dim, gate_rank)
        self.in_proj_b = nn.Linear(cfg.d_model, self.n_heads, bias=False)
        self.in_proj_a = _projection(cfg.d_model, decay_dim, gate_rank)
        self.conv_weight = nn.Parameter(torch.empty(2 * key_dim + value_dim, cfg.conv_kernel))
        nn.init.normal_(self.conv_weight, std=cfg.conv_kernel**-0.5)
        self.A_log = nn.Parameter(torch.zeros(self.n_heads))
        self.dt_bias = nn.Parameter(torch.ones(decay_dim))
        eps = cfg.eps if cfg.gdn_norm_eps is None else cfg.gdn_norm_eps
        self.norm = GatedRMSNorm(self.d_v, eps, norm_gate or cfg.gdn_gate_act)
        self.beta_scale = cfg.gdn_beta_scale
        self.out_proj = nn.Linear(value_dim, cfg.d_model, bias=False)

        self.hook_q = HookPoint()  # [batch, pos, head, d_k]: L2-normalised, scaled by d_k**-0.5
        self.hook_k = HookPoint()  # [batch, pos, head, d_k]: L2-normalised write/erase key
        self.hook_v = HookPoint()  # [batch, pos, head, d_v]
        self.hook_beta = HookPoint()  # [batch, pos, head]: write strength b_t in (0, beta_scale): (0, 1) or (0, 2)
        # [batch, pos, head] (per channel: [batch, pos, head, d_k]): forget gate a_t = exp(g_t) in (0, 1]
        self.hook_decay = HookPoint()
        self.hook_gate = HookPoint()  # [batch, pos, head, d_v]: output gate logits z_t
        self.hook_write = HookPoint()  # [batch, pos, head, d_k*d_v]: b_t k_t v_t^T, key-major
        self.hook_write_factors = HookPoint()  # [batch, pos, head, d_k+d_v]: [k_t | b_t v_t], observation only
        self.hook_delta_v = HookPoint()  # [batch, pos, head, d_v]: u_t = b_t (v_t - (A_t S_{t-1})^T k_t)
        self.hook_state = HookPoint()  # [batch, pos or selected pos, head, d_k*d_v]: S_t after the update
        # hook_state edits replace: position t reads exactly the returned state and the recurrence goes on
        # from it (a returned S_t + E moves only t's read by E^T q_t). To make an edit persist, edit hook_write.
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
        key_dim = self.n_key_heads * self.d_k
        conv_out, conv_state = causal_depthwise_conv(
            self.in_proj_qkv(x), self.conv_weight, conv_state=None if cache is None else cache.conv_state
        )
        q, k, v = F.silu(conv_out).split([key_dim, key_dim, self.n_heads * self.d_v], dim=-1)
        q = self._per_value_head(l2_normalize(at_least_fp32(q).view(batch, length, -1, self.d_k)))
        k = self._per_value_head(l2_normalize(at_least_fp32(k).view(batch, length, -1, self.d_k)))
        q = self.hook_q(q * self.d_k**-0.5)
        k = self.hook_k(k)
        v = self.hook_v(at_least_fp32(v).view(batch, length, self.n_heads, self.d_v))
        beta = fill_pads(at_least_fp32(torch.sigmoid(self.in_proj_b(x))), real)
        beta = self.hook_beta(beta if self.beta_scale == 1.0 else beta * self.beta_scale)
        g = self._log_decay(x, real)
        z = self.hook_gate(self.in_proj_z(x).view(batch, length, self.n_heads, self.d_v))

        observe_write_factors(self.hook_write_factors, lambda: (k, beta[..., None] * v))
        initial_state = None if cache is None else cache.ssm_state
        o, final_state = self._scan(q, k, v, beta, g, initial_state, state_positions)
        if cache is not None:
            cache.conv_state, cache.ssm_state = conv_state, final_state

        o = self.hook_read(o.to(x.dtype))
        y = self.hook_z(self.norm(o, z))
        return self.out_proj(y.reshape(batch, length, -1))

    def _per_value_head(self, x: Float[Tensor, "batch pos key_head d_k"]) -> Float[Tensor, "batch pos head d_k"]:
        """Expand grouped keys/queries to one per value head (a no-op, not a copy, without grouping)."""
        group = self.n_heads // self.n_key_heads
        return x if group == 1 else x.repeat_interleave(group, dim=2)

    def _log_decay(self, x: Tensor, real: Tensor | None) -> LogDecay:
        a, rate = at_least_fp32(self.in_proj_a(x)) + self.dt_bias, at_least_fp32(self.A_log).exp()
        if self.per_channel_decay:
            a, rate = a.view(*x.shape[:2], self.n_heads, self.d_k), rate[:, None]
        if self.gate_lower_bound is None:
            g = -rate * F.softplus(a)
        else:
            g = self.gate_lower_bound * torch.sigmoid(rate * a)
        return log_decay_through_hook(self.hook_decay, fill_pads(g, real))

    def _scan(self, q, k, v, beta, g, initial_state, state_positions):
        """Run the recurrence: hook_write / hook_delta_v edits persist, hook_state returns replace."""
        native_write = lambda: (beta[..., None, None] * k[..., :, None] * v[..., None, :]).flatten(-2)  # noqa: E731
        edits = write_edits(self.hook_write, native_write, self.d_k, self.d_v)
        if self.hook_delta_v.has_hooks():
            edits = merge_edits(edits, self._delta_v_edits(q, k, v, beta, g, initial_state, edits))
        if not (edits or self.hook_state.has_hooks()):
            if runs_recurrent(self.execution, q.shape[1], q.device):
                return recurrent_gated_delta_rule(q, k, v, beta, g, initial_state)[:2]
            return chunked_gated_delta_rule(q, k, v, beta, g, initial_state, self.chunk_size)[:2]

        def scan(segment, state, edits, positions):
            inputs = (q[:, segment], k[:, segment], v[:, segment], beta[:, segment], g[:, segment], state, edits, positions)
            if runs_recurrent(self.execution, segment.stop - segment.start, q.device):
                return recurrent_gated_delta_rule(*inputs)[:3]
            return gated_delta_rule_with_edits(*inputs, self.chunk_size)

        return scan_with_state_hooks(self.hook_state, scan, q, initial_state, edits, state_positions)

    def _delta_v_edits(self, q, k, v, beta, g, initial_state, edits) -> dict[int, Tensor]:
        """Run ``hook_delta_v`` on ``u_t`` (the trajectory with the write edits); a change ``du`` at ``t``
        is the additive state edit ``k_t du^T`` there (it persists, like a write edit)."""
        delta_v = lambda: recurrent_gated_delta_rule(q, k, v, beta, g, initial_state, edits, None, True)[3]  # noqa: E731
        hooked = run_hook(self.hook_delta_v, delta_v())
        if hooked is None:
            return {}
        diff = hooked - delta_v()  # recomputed: the hook may have edited its input in place
        return {t: k[:, t, :, :, None] * diff[:, t, :, None, :] for t in changed_positions(diff)}
