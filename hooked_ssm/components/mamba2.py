"""The Mamba-2 mixer (``Mamba2ForCausalLM`` / ``state-spaces/mamba2-*``), with every quantity of the
recurrence hooked.

Per head ``h`` (key-major state ``H`` of shape ``[d_state, headdim]``, the transpose of what
transformers and mamba_ssm store), with ``x_t`` the post-conv input of the head and ``B_t``/``C_t``
its group's key and query::

    dt_t = clamp(softplus(dt_raw_t + dt_bias), *time_step_limit)     hook_dt
    H_t  = exp(dt_t A) H_{t-1} + B_t (dt_t x_t)^T                    hook_decay = exp(dt_t A)
                                                                     hook_k = B_t, hook_v = dt_t x_t
                                                                     hook_write = B_t (dt_t x_t)^T
                                                                     hook_write_factors = [B_t | dt_t x_t]
    r_t  = H_t^T C_t                                                  hook_q = C_t, hook_read = r_t
    y_t  = r_t + D x_t                                                (D skip, uses hook_x's value)
    z    = w * rmsnorm_groups(y * silu(gate))                         hook_gate = gate, hook_z = z

so Mamba-2 speaks the same vocabulary as Gated DeltaNet: ``k`` = B (d_state), ``v`` = dt x
(headdim), ``q`` = C. The gated norm multiplies by the gate *before* normalising (the opposite of
the Gated DeltaNet norm) and normalises over groups of ``d_inner / n_groups`` channels. Falcon-H1
varies it (``cfg.ssm_norm``): gate after the norm, or no norm at all (``z = y * silu(gate)``).

Edit semantics:

- ``hook_x`` edits move both the write (``v = dt * x``) and the D skip (``D`` uses ``hook_x``'s
  value); ``hook_v`` edits move only the write, the D skip keeps the unedited ``x``.
- ``hook_dt`` edits move both the write and the decay; ``hook_decay`` edits only the decay.
- ``hook_write`` edits persist: an additive state edit at their position, applied exactly (the
  chunked scan is split there) and carried, decayed, into every later state.
- ``hook_state`` edits replace: the state that position ``t`` reads is exactly what the hook
  returned for ``t``, and the recurrence continues from it (``recurrent_mixer``). The D skip and
  the gate are outside the state and unchanged.

``execution="chunked"`` (default) runs the chunked SSD scan; ``"recurrent"`` runs the per-token
loop. Both give the same answer (to float rounding). Short calls (decoding steps with a
``RecurrentState``) take the recurrent form either way (``recurrent_mixer.runs_recurrent``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor
from transformer_lens.hook_points import HookPoint

from hooked_ssm.components.padding import fill_pads, real_tokens
from hooked_ssm.components.recurrent_mixer import (
    log_decay_through_hook,
    observe_write_factors,
    runs_recurrent,
    scan_with_state_hooks,
    write_edits,
)
from hooked_ssm.config import HookedSSMConfig
from hooked_ssm.dtypes import at_least_fp32
from hooked_ssm.hook_names import MATRIX_STATE_HOOK_DIMS, HookDims
from hooked_ssm.ops.causal_conv import causal_depthwise_conv
from hooked_ssm.ops.ssd import chunked_ssd, recurrent_ssd, ssd_with_edits
from hooked_ssm.state import MixerCache


class GroupedGatedRMSNorm(nn.Module):
    """Mamba-2's gated norm: ``w * rmsnorm(y * silu(gate))`` with the RMS taken over groups of
    ``group_size`` channels (gate *before* norm), computed in float32 like ``MambaRMSNormGated``;
    with ``gate_first=False``, ``w * rmsnorm(y) * silu(gate)`` (Falcon-H1's ``norm_before_gate``)."""

    def __init__(self, d: int, group_size: int, eps: float, gate_first: bool = True):
        super().__init__()
        self.eps, self.group_size, self.gate_first = eps, group_size, gate_first
        self.w = nn.Parameter(torch.ones(d))

    def forward(self, y: Float[Tensor, "... d"], gate: Float[Tensor, "... d"]) -> Float[Tensor, "... d"]:
        dtype = y.dtype
        x = at_least_fp32(y) * F.silu(at_least_fp32(gate)) if self.gate_first else at_least_fp32(y)
        groups = x.unflatten(-1, (-1, self.group_size))
        normed = (groups * torch.rsqrt(groups.pow(2).mean(-1, keepdim=True) + self.eps)).flatten(-2)
        if self.gate_first:
            return self.w * normed.to(dtype)
        return (at_least_fp32(self.w) * normed * F.silu(at_least_fp32(gate))).to(dtype)


class Mamba2Mixer(nn.Module):
    HOOK_DIMS: HookDims = {**MATRIX_STATE_HOOK_DIMS, "hook_x": ("d_v",), "hook_gate": ("d_v",)}

    def __init__(self, cfg: HookedSSMConfig):
        super().__init__()
        self.n_heads, self.n_groups = cfg.n_heads, cfg.n_key_heads
        self.d_state, self.headdim = cfg.d_k, cfg.d_v
        self.d_k, self.d_v = cfg.d_k, cfg.d_v
        self.d_inner = self.n_heads * self.headdim
        self.conv_dim = self.d_inner + 2 * self.n_groups * self.d_state
        self.chunk_size, self.execution = cfg.chunk_size, cfg.execution
        self.time_step_limit = cfg.time_step_limit
        self.in_proj = nn.Linear(cfg.d_model, self.d_inner + self.conv_dim + self.n_heads, bias=cfg.proj_bias)
        self.conv_weight = nn.Parameter(torch.empty(self.conv_dim, cfg.conv_kernel))
        nn.init.normal_(self.conv_weight, std=cfg.conv_kernel**-0.5)
        self.conv_bias = nn.Parameter(torch.zeros(self.conv_dim)) if cfg.conv_bias else None
        self.dt_bias = nn.Parameter(torch.zeros(self.n_heads))
        self.A_log = nn.Parameter(torch.zeros(self.n_heads))
        self.D = nn.Parameter(torch.ones(self.n_heads))
        if cfg.ssm_norm != "none":
            gate_first = cfg.ssm_norm == "gate_then_norm"
            eps = cfg.eps if cfg.ssm_norm_eps is None else cfg.ssm_norm_eps
            self.norm = GroupedGatedRMSNorm(self.d_inner, self.d_inner // self.n_groups, eps, gate_first)
        self.out_proj = nn.Linear(self.d_inner, cfg.d_model, bias=cfg.proj_bias)

        self.hook_x = HookPoint()  # [batch, pos, head, headdim]: post-conv, post-SiLU input x_t
        self.hook_dt = HookPoint()  # [batch, pos, head]: time step dt_t (after softplus and clamp)
        self.hook_q = HookPoint()  # [batch, pos, head, d_state]: C_t (read query), per head
        self.hook_k = HookPoint()  # [batch, pos, head, d_state]: B_t (write key), per head
        self.hook_v = HookPoint()  # [batch, pos, head, headdim]: dt_t * x_t (write value)
        self.hook_decay = HookPoint()  # [batch, pos, head]: exp(dt_t * A) in (0, 1]
        self.hook_gate = HookPoint()  # [batch, pos, head, headdim]: gate logits z_t
        self.hook_write = HookPoint()  # [batch, pos, head, d_state*headdim]: B_t (dt_t x_t)^T, key-major
        self.hook_write_factors = HookPoint()  # [batch, pos, head, d_state+headdim]: [B_t | dt_t x_t], observation only
        self.hook_state = HookPoint()  # [batch, pos or selected pos, head, d_state*headdim]: H_t
        # hook_state edits replace: position t reads exactly the returned state and the recurrence goes on
        # from it (a returned S_t + E moves only t's read by E^T q_t). To make an edit persist, edit hook_write.
        self.hook_read = HookPoint()  # [batch, pos, head, headdim]: H_t^T C_t (before D skip and gate)
        self.hook_z = HookPoint()  # [batch, pos, head, headdim]: gated-normed output entering out_proj

    @property
    def W_O(self) -> Float[Tensor, "head headdim d_model"]:
        return self.out_proj.weight.T.reshape(self.n_heads, self.headdim, -1)

    def forward(
        self,
        x: Float[Tensor, "batch pos d_model"],
        cache: MixerCache | None = None,
        attention_mask: Tensor | None = None,
        state_positions: Sequence[int] | None = None,
    ) -> Float[Tensor, "batch pos d_model"]:
        # Pads feed zeros to the conv window (even with an in_proj bias, as in transformers) and are
        # identity steps of the recurrence (dt = 0: no write, decay 1), on either side of the row.
        real = real_tokens(attention_mask, x.shape[1])
        x = fill_pads(x, real)
        batch, length, _ = x.shape
        gate, xBC, dt = self.in_proj(x).split([self.d_inner, self.conv_dim, self.n_heads], dim=-1)
        conv_out, conv_state = causal_depthwise_conv(
            fill_pads(xBC, real), self.conv_weight, self.conv_bias, conv_state=None if cache is None else cache.conv_state
        )
        xBC = fill_pads(F.silu(conv_out), real)
        group_dim = self.n_groups * self.d_state
        xs, B, C = xBC.split([self.d_inner, group_dim, group_dim], dim=-1)
        per_group = self.n_heads // self.n_groups
        xs = self.hook_x(xs.view(batch, length, self.n_heads, self.headdim))
        k = self.hook_k(at_least_fp32(B).view(batch, length, self.n_groups, self.d_state).repeat_interleave(per_group, dim=2))
        q = self.hook_q(at_least_fp32(C).view(batch, length, self.n_groups, self.d_state).repeat_interleave(per_group, dim=2))
        dt = F.softplus(dt + self.dt_bias.to(dt.dtype)).clamp(*self.time_step_limit)
        dt = self.hook_dt(fill_pads(at_least_fp32(dt), real))
        v = self.hook_v(at_least_fp32(xs) * dt[..., None])
        log_decay = log_decay_through_hook(self.hook_decay, dt * -at_least_fp32(self.A_log).exp())
        gate = self.hook_gate(gate.view(batch, length, self.n_heads, self.headdim))

        observe_write_factors(self.hook_write_factors, lambda: (k, v))
        initial_state = None if cache is None else cache.ssm_state
        o, final_state = self._scan(q, k, v, log_decay, initial_state, state_positions)
        if cache is not None:
            cache.conv_state, cache.ssm_state = conv_state, final_state

        read = self.hook_read(o)
        y = read + at_least_fp32(self.D)[:, None] * at_least_fp32(xs)
        y, gate = y.reshape(batch, length, self.d_inner), gate.reshape(batch, length, self.d_inner)
        z = self.norm(y, gate) if hasattr(self, "norm") else y * F.silu(at_least_fp32(gate))
        z = self.hook_z(z.view(batch, length, self.n_heads, self.headdim))
        return self.out_proj(z.reshape(batch, length, self.d_inner).to(x.dtype))

    def _scan(self, q, k, v, log_decay, initial_state, state_positions):
        return scan_ssd_with_hooks(self, q, k, v, log_decay, initial_state, state_positions)


def scan_ssd_with_hooks(mixer: nn.Module, q, k, v, log_decay, initial_state, state_positions):
    """The SSD recurrence of ``mixer`` (Mamba-2, or any mixer on the SSD ops: MiniMax's lightning
    attention), honouring its hooks: hook_write edits persist, hook_state returns replace
    (recurrent_mixer). ``mixer`` supplies hook_write, hook_state, execution and chunk_size."""
    d_k, d_v = k.shape[-1], v.shape[-1]
    native_write = lambda: (k[..., :, None] * v[..., None, :]).flatten(-2)  # noqa: E731
    edits = write_edits(mixer.hook_write, native_write, d_k, d_v)
    if not (edits or mixer.hook_state.has_hooks()):
        if runs_recurrent(mixer.execution, q.shape[1], q.device):
            return recurrent_ssd(q, k, v, log_decay, initial_state)[:2]
        return chunked_ssd(q, k, v, log_decay, initial_state, mixer.chunk_size)[:2]

    def scan(segment, state, edits, positions):
        inputs = (q[:, segment], k[:, segment], v[:, segment], log_decay[:, segment], state, edits, positions)
        if runs_recurrent(mixer.execution, segment.stop - segment.start, q.device):
            return recurrent_ssd(*inputs)
        return ssd_with_edits(*inputs, mixer.chunk_size)

    return scan_with_state_hooks(mixer.hook_state, scan, q, initial_state, edits, state_positions)
