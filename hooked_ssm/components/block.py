"""Residual blocks, one class per block structure:

- ``Block``: pre-norm token mixer (Gated DeltaNet or full attention), then pre-norm MLP (Qwen3.5 / Qwen3-Next).
- ``Mamba2Block``: pre-norm Mamba-2 mixer only, no MLP; optionally an fp32 residual stream.
- ``RWKV7Block``: LayerNorms with bias, the RWKV-7 time mix at ``.mixer`` and its channel mix at
  ``.mlp``; layer 0 first applies ``ln0`` to the embedding.

``build_blocks`` picks the class per layer from ``cfg.layer_types``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn as nn
from jaxtyping import Float
from torch import Tensor
from transformer_lens.hook_points import HookPoint

from hooked_ssm.components.attention import GatedAttention
from hooked_ssm.components.gated_deltanet import GatedDeltaNetMixer
from hooked_ssm.components.mamba2 import Mamba2Mixer
from hooked_ssm.components.mlp import GatedMLP, SparseMoE
from hooked_ssm.components.norms import LayerNorm, RMSNorm
from hooked_ssm.components.rwkv7 import RWKV7ChannelMix, RWKV7Mixer, ValueResidual
from hooked_ssm.config import HookedSSMConfig
from hooked_ssm.state import AttentionCache, MixerCache, RWKV7Cache

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


class Mamba2Block(nn.Module):
    """``resid + mixer(norm(resid))`` (``Mamba2Block`` of transformers): no MLP, so no
    ``hook_resid_mid`` / ``hook_mlp_out``. With ``cfg.residual_in_fp32`` the residual stream is
    kept in float32 whatever the model dtype, as in transformers and mamba_ssm."""

    def __init__(self, cfg: HookedSSMConfig, layer: int):
        super().__init__()
        self.layer_type = cfg.layer_types[layer]
        self.residual_in_fp32 = cfg.residual_in_fp32
        self.ln1 = RMSNorm(cfg.d_model, cfg.eps, cfg.norm_zero_centered)
        self.mixer = Mamba2Mixer(cfg)
        self.hook_resid_pre = HookPoint()  # [batch, pos, d_model]
        self.hook_mixer_out = HookPoint()  # [batch, pos, d_model]
        self.hook_resid_post = HookPoint()  # [batch, pos, d_model]

    def forward(
        self,
        resid: Float[Tensor, "batch pos d_model"],
        cache: MixerCache | None = None,
        attention_mask: Tensor | None = None,
        state_positions: Sequence[int] | None = None,
    ) -> Float[Tensor, "batch pos d_model"]:
        resid = self.hook_resid_pre(resid)
        normed = self.ln1(resid.to(self.ln1.w.dtype))
        mixed = self.hook_mixer_out(self.mixer(normed, cache, attention_mask, state_positions))
        if self.residual_in_fp32:
            resid = resid.float()
        return self.hook_resid_post(resid + mixed)


class RWKV7Block(nn.Module):
    """RWKV-7 block: ``x += time_mix(ln1(x))``, ``x += channel_mix(ln2(x))``; layer 0 applies ``ln0``
    to the embedding first, so ``blocks.0.hook_resid_pre`` is ``ln0(embed)``."""

    def __init__(self, cfg: HookedSSMConfig, layer: int, value_residual: ValueResidual):
        super().__init__()
        self.layer_type = cfg.layer_types[layer]
        if layer == 0:
            self.ln0 = LayerNorm(cfg.d_model, cfg.eps)
        self.ln1 = LayerNorm(cfg.d_model, cfg.eps)
        self.ln2 = LayerNorm(cfg.d_model, cfg.eps)
        self.mixer = RWKV7Mixer(cfg, layer, value_residual)
        self.mlp = RWKV7ChannelMix(cfg)
        self.hook_resid_pre = HookPoint()  # [batch, pos, d_model]
        self.hook_mixer_out = HookPoint()  # [batch, pos, d_model]
        self.hook_resid_mid = HookPoint()  # [batch, pos, d_model]
        self.hook_mlp_out = HookPoint()  # [batch, pos, d_model]
        self.hook_resid_post = HookPoint()  # [batch, pos, d_model]

    def forward(
        self,
        resid: Float[Tensor, "batch pos d_model"],
        cache: RWKV7Cache | None = None,
        attention_mask: Tensor | None = None,
        state_positions: Sequence[int] | None = None,
    ) -> Float[Tensor, "batch pos d_model"]:
        if hasattr(self, "ln0"):
            resid = self.ln0(resid)
        resid = self.hook_resid_pre(resid)
        mixed = self.hook_mixer_out(self.mixer(self.ln1(resid), cache, attention_mask, state_positions))
        resid = self.hook_resid_mid(resid + mixed)
        resid = resid + self.hook_mlp_out(self.mlp(self.ln2(resid), cache, attention_mask))
        return self.hook_resid_post(resid)


class _FinalRMSNorm(RMSNorm):
    """The final norm of a model whose residual stream may be float32 while its weights are not
    (Mamba-2 with ``residual_in_fp32``): returns the weights' dtype, ready for the unembedding."""

    def forward(self, x: Float[Tensor, "... d"]) -> Float[Tensor, "... d"]:
        return super().forward(x).to(self.w.dtype)


def build_blocks(cfg: HookedSSMConfig) -> list[nn.Module]:
    """One block per layer, of the class that ``cfg.layer_types[layer]`` needs."""
    kinds = set(cfg.layer_types)
    if "rwkv7" in kinds and kinds != {"rwkv7"}:
        raise ValueError(f"RWKV-7 layers cannot be mixed with other layer types; got {sorted(kinds)}.")
    value_residual = ValueResidual()  # shared by the RWKV-7 layers of this model
    blocks: list[nn.Module] = []
    for layer, kind in enumerate(cfg.layer_types):
        if kind == "mamba2":
            blocks.append(Mamba2Block(cfg, layer))
        elif kind == "rwkv7":
            blocks.append(RWKV7Block(cfg, layer, value_residual))
        else:
            blocks.append(Block(cfg, layer))
    return blocks


def build_final_norm(cfg: HookedSSMConfig) -> nn.Module:
    """``ln_final``: a LayerNorm for RWKV-7 (``norm_type="layernorm"``), else an RMSNorm."""
    if cfg.norm_type == "layernorm":
        return LayerNorm(cfg.d_model, cfg.eps)
    if cfg.residual_in_fp32:
        return _FinalRMSNorm(cfg.d_model, cfg.eps, cfg.norm_zero_centered)
    return RMSNorm(cfg.d_model, cfg.eps, cfg.norm_zero_centered)
