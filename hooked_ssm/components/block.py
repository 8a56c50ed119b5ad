"""One residual block: pre-norm token mixer (recurrent mixer or full attention), then pre-norm MLP."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn as nn
from jaxtyping import Float
from torch import Tensor
from transformer_lens.hook_points import HookPoint

from hooked_ssm.components.attention import GatedAttention
from hooked_ssm.components.gated_deltanet import GatedDeltaNetMixer
from hooked_ssm.components.mlp import GatedMLP, SparseMoE
from hooked_ssm.components.norms import RMSNorm
from hooked_ssm.config import HookedSSMConfig
from hooked_ssm.state import AttentionCache, MixerCache

MIXERS = {"gated_deltanet": GatedDeltaNetMixer}


class Block(nn.Module):
    """Recurrent layers hold their mixer at ``.mixer`` and name its output ``hook_mixer_out``;
    full-attention layers hold ``.attn`` and ``hook_attn_out``, as in TransformerLens."""

    def __init__(self, cfg: HookedSSMConfig, layer: int):
        super().__init__()
        self.layer_type = cfg.layer_types[layer]
        self.ln1 = RMSNorm(cfg.d_model, cfg.eps, cfg.norm_zero_centered)
        self.ln2 = RMSNorm(cfg.d_model, cfg.eps, cfg.norm_zero_centered)
        if self.layer_type == "full_attention":
            self.attn = GatedAttention(cfg)
            self.hook_attn_out = HookPoint()  # [batch, pos, d_model]
        else:
            self.mixer = MIXERS[self.layer_type](cfg)
            self.hook_mixer_out = HookPoint()  # [batch, pos, d_model]
        if cfg.moe_layers[layer]:
            self.mlp = SparseMoE(
                cfg.d_model, cfg.n_experts, cfg.n_experts_per_tok, cfg.d_expert,
                cfg.d_shared_expert, cfg.act_fn, cfg.norm_topk_prob,
            )
        else:
            self.mlp = GatedMLP(cfg.d_model, cfg.d_mlp, cfg.act_fn)
        self.hook_resid_pre = HookPoint()  # [batch, pos, d_model]
        self.hook_resid_mid = HookPoint()  # [batch, pos, d_model]
        self.hook_mlp_out = HookPoint()  # [batch, pos, d_model]
        self.hook_resid_post = HookPoint()  # [batch, pos, d_model]

    def forward(
        self,
        resid: Float[Tensor, "batch pos d_model"],
        cache: MixerCache | AttentionCache | None = None,
        attention_mask: Tensor | None = None,
        state_positions: Sequence[int] | None = None,
    ) -> Float[Tensor, "batch pos d_model"]:
        resid = self.hook_resid_pre(resid)
        if self.layer_type == "full_attention":
            mixed = self.hook_attn_out(self.attn(self.ln1(resid), cache, attention_mask))
        else:
            mixed = self.hook_mixer_out(self.mixer(self.ln1(resid), cache, attention_mask, state_positions))
        resid = self.hook_resid_mid(resid + mixed)
        resid = resid + self.hook_mlp_out(self.mlp(self.ln2(resid)))
        return self.hook_resid_post(resid)
