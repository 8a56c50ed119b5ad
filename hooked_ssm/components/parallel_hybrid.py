"""A block that runs a Mamba-2 mixer and softmax attention side by side on the same normed input
and adds their outputs (Falcon-H1), then a pre-norm MLP::

    h     = ln1(resid)
    resid = resid + mixer(h) + attn(h)          hook_mixer_out, hook_attn_out
    resid = resid + mlp(ln2(resid))             hook_mlp_out

The mixer at ``.mixer`` and the attention at ``.attn`` keep the hook vocabulary of their own kinds;
the layer's decoding cache serves both (``ParallelCache``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn as nn
from jaxtyping import Float
from torch import Tensor
from transformer_lens.hook_points import HookPoint

from hooked_ssm.components.attention import GatedAttention
from hooked_ssm.components.mamba2 import Mamba2Mixer
from hooked_ssm.components.mlp import build_mlp
from hooked_ssm.components.norms import RMSNorm
from hooked_ssm.config import HookedSSMConfig
from hooked_ssm.state import ParallelCache


class ParallelHybridBlock(nn.Module):
    def __init__(self, cfg: HookedSSMConfig, layer: int, earlier: Sequence[nn.Module] = ()):
        super().__init__()
        self.layer_type = cfg.layer_types[layer]
        self.ln1 = RMSNorm(cfg.d_model, cfg.eps, cfg.norm_zero_centered)
        self.ln2 = RMSNorm(cfg.d_model, cfg.eps, cfg.norm_zero_centered)
        self.mixer = Mamba2Mixer(cfg)
        self.attn = GatedAttention(cfg)
        self.mlp = build_mlp(cfg, layer)
        self.hook_resid_pre = HookPoint()  # [batch, pos, d_model]
        self.hook_mixer_out = HookPoint()  # [batch, pos, d_model]
        self.hook_attn_out = HookPoint()  # [batch, pos, d_model]
        self.hook_resid_mid = HookPoint()  # [batch, pos, d_model]
        self.hook_mlp_out = HookPoint()  # [batch, pos, d_model]
        self.hook_resid_post = HookPoint()  # [batch, pos, d_model]

    def forward(
        self,
        resid: Float[Tensor, "batch pos d_model"],
        cache: ParallelCache | None = None,
        attention_mask: Tensor | None = None,
        state_positions: Sequence[int] | None = None,
    ) -> Float[Tensor, "batch pos d_model"]:
        resid = self.hook_resid_pre(resid)
        normed = self.ln1(resid)
        mixed = self.hook_mixer_out(self.mixer(normed, cache, attention_mask, state_positions))
        attended = self.hook_attn_out(self.attn(normed, cache, attention_mask))
        resid = self.hook_resid_mid(resid + (mixed + attended))
        resid = resid + self.hook_mlp_out(self.mlp(self.ln2(resid)))
        return self.hook_resid_post(resid)
