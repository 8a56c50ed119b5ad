"""MiniMax's lightning attention (``MiniMaxForCausalLM``, MiniMax-Text-01): linear attention with a
constant decay per head, the SSD recurrence of Mamba-2 with ``log_decay = -slope_h`` at every token,
run by the same ops (``hooked_ssm.ops.ssd``). Per head (key-major state ``S`` ``[d_head, d_head]``)::

    q, k, v = silu(W_qkv x)                             hook_q, hook_k, hook_v
    S_t = exp(-slope) S_{t-1} + k_t v_t^T                hook_decay = exp(-slope), hook_write = k_t v_t^T
    o_t = S_t^T q_t                                      hook_read (no 1/sqrt(d) scaling)
    z   = sigmoid(W_g x) * rmsnorm_all_heads(o)          hook_gate = W_g x, hook_z = z

``slope`` is a fixed per-head, per-layer rate (ALiBi-like), loaded with the checkpoint. Write and
state edits go through ``recurrent_mixer.scan_with_state_hooks`` as in every mixer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor
from transformer_lens.hook_points import HookPoint

from hooked_ssm.components.norms import RMSNorm
from hooked_ssm.components.padding import fill_pads, real_tokens
from hooked_ssm.components.mamba2 import scan_ssd_with_hooks
from hooked_ssm.components.recurrent_mixer import log_decay_through_hook, observe_write_factors
from hooked_ssm.config import HookedSSMConfig
from hooked_ssm.dtypes import at_least_fp32
from hooked_ssm.hook_names import MATRIX_STATE_HOOK_DIMS, HookDims
from hooked_ssm.state import MixerCache

OUTPUT_NORM_EPS = 1e-6  # MiniMaxLightningAttention's norm, whatever rms_norm_eps says


class LightningAttentionMixer(nn.Module):
    HOOK_DIMS: HookDims = {**MATRIX_STATE_HOOK_DIMS, "hook_gate": ("d_v",)}

    def __init__(self, cfg: HookedSSMConfig):
        super().__init__()
        self.n_heads, self.d_k, self.d_v = cfg.n_heads, cfg.d_k, cfg.d_v
        if self.d_k != self.d_v:
            raise ValueError(f"Lightning attention has d_k == d_v (one head size); got {self.d_k} and {self.d_v}.")
        self.chunk_size, self.execution = cfg.chunk_size, cfg.execution
        width = self.n_heads * self.d_v
        self.qkv_proj = nn.Linear(cfg.d_model, 3 * width, bias=False)
        self.output_gate = nn.Linear(cfg.d_model, width, bias=False)
        self.norm = RMSNorm(width, OUTPUT_NORM_EPS, zero_centered=False)
        self.out_proj = nn.Linear(width, cfg.d_model, bias=False)
        self.slope = nn.Parameter(torch.zeros(self.n_heads), requires_grad=False)  # decay rate per head

        self.hook_q = HookPoint()  # [batch, pos, head, d_k]: silu(W_q x), no scaling
        self.hook_k = HookPoint()  # [batch, pos, head, d_k]
        self.hook_v = HookPoint()  # [batch, pos, head, d_v]
        self.hook_decay = HookPoint()  # [batch, pos, head]: exp(-slope), the same at every real position (1 at pads)
        self.hook_gate = HookPoint()  # [batch, pos, head, d_v]: output gate logits W_g x
        self.hook_write = HookPoint()  # [batch, pos, head, d_k*d_v]: k_t v_t^T, key-major
        self.hook_write_factors = HookPoint()  # [batch, pos, head, d_k+d_v]: [k_t | v_t], observation only
        self.hook_state = HookPoint()  # [batch, pos or selected pos, head, d_k*d_v]: S_t
        self.hook_read = HookPoint()  # [batch, pos, head, d_v]: S_t^T q_t
        self.hook_z = HookPoint()  # [batch, pos, head, d_v]: gated, normed output entering out_proj

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
        batch, length, _ = x.shape
        # Pads write nothing (k = v = 0, as in transformers) and are identity steps of the recurrence
        # (log decay 0: no decay), on either side of the row (hooked_ssm.components.padding).
        real = real_tokens(attention_mask, length)
        qkv = fill_pads(F.silu(self.qkv_proj(x)), real)
        q, k, v = at_least_fp32(qkv.view(batch, length, self.n_heads, 3 * self.d_v)).split(self.d_v, dim=-1)
        q, k, v = self.hook_q(q), self.hook_k(k), self.hook_v(v)
        log_decay = fill_pads((-at_least_fp32(self.slope)).expand(batch, length, -1), real)
        log_decay = log_decay_through_hook(self.hook_decay, log_decay)
        gate = self.hook_gate(self.output_gate(x).view(batch, length, self.n_heads, self.d_v))

        observe_write_factors(self.hook_write_factors, lambda: (k, v))
        initial_state = None if cache is None else cache.ssm_state
        o, final_state = self._scan(q, k, v, log_decay, initial_state, state_positions)
        if cache is not None:
            cache.ssm_state = final_state

        read = self.hook_read(o.to(x.dtype))
        z = torch.sigmoid(gate) * self.norm(read.flatten(-2)).view_as(read)
        z = self.hook_z(z)
        return self.out_proj(z.flatten(-2))

    def _scan(self, q, k, v, log_decay, initial_state, state_positions):
        return scan_ssd_with_hooks(self, q, k, v, log_decay, initial_state, state_positions)
