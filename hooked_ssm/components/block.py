"""The residual block, and ``build_blocks``, which builds one per layer from the family table.

``Block``: pre-norm token mixer, then pre-norm MLP (Qwen3.5 / Qwen3-Next, the Mamba-2 hybrids);
without an MLP (``d_mlp == 0`` and no experts, or ``block_mlp=False``) just
``resid + mixer(norm(resid))`` (``Mamba2ForCausalLM``, NemotronH); a layer of kind ``"mlp"`` is
``resid + mlp(norm(resid))`` (NemotronH's MLP and MoE layers). A post-norm kind norms outputs
instead: ``resid + norm(attn(resid))``, ``resid + norm(mlp(resid))`` (OLMo-Hybrid's attention).
``hook_{attn,mixer,mlp}_out`` is always the sublayer's output (scaled by muP / MiniMax factors
when it joins the residual stream). MiniMax adds to the *normed* input instead of the residual
(``cfg.normed_residual``).
A layer kind with a block of its own names it in ``hooked_ssm.families.LAYER_KINDS`` (RWKV-7).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn as nn
from jaxtyping import Float
from torch import Tensor
from transformer_lens.hook_points import HookPoint

from hooked_ssm.components.hyper_connection import HyperConnectionReadout
from hooked_ssm.components.manifold_hyper_connection import ManifoldHyperConnectionReadout
from hooked_ssm.components.mlp import build_mlp
from hooked_ssm.components.norms import LayerNorm, RMSNorm
from hooked_ssm.config import HookedSSMConfig
from hooked_ssm.dtypes import at_least_fp32
from hooked_ssm.families import layer_kind
from hooked_ssm.state import AttentionCache, MixerCache, NoCache


class Block(nn.Module):
    """Recurrent layers hold their mixer at ``.mixer`` and name its output ``hook_mixer_out``;
    full-attention layers hold ``.attn`` and ``hook_attn_out``, as in TransformerLens. Without an MLP
    there is no ``hook_resid_mid`` / ``hook_mlp_out``. With ``cfg.residual_in_fp32`` the residual
    stream is kept in float32 whatever the model dtype, as in transformers and mamba_ssm."""

    def __init__(self, cfg: HookedSSMConfig, layer: int, earlier: Sequence[nn.Module] = ()):
        super().__init__()
        self.layer_type = cfg.layer_types[layer]
        kind = layer_kind(self.layer_type)
        self.slot, self.post_norm = kind.slot, kind.post_norm
        self.residual_in_fp32 = cfg.residual_in_fp32
        self.residual_multiplier, self.normed_residual = cfg.residual_multiplier, cfg.normed_residual
        self.factors = {slot: cfg.residual_factors.get(slot, (1.0, 1.0)) for slot in (self.slot, "mlp")}
        self.ln1 = RMSNorm(cfg.d_model, cfg.eps, cfg.norm_zero_centered)
        setattr(self, self.slot, kind.mixer(cfg, **kind.options) if kind.mixer is not None else build_mlp(cfg, layer))
        setattr(self, f"hook_{self.slot}_out", HookPoint())  # [batch, pos, d_model]
        self.hook_resid_pre = HookPoint()  # [batch, pos, d_model]
        self.has_mlp = self.slot != "mlp" and cfg.block_mlp and (cfg.moe_layers[layer] or cfg.d_mlp > 0)
        if self.has_mlp:
            self.ln2 = RMSNorm(cfg.d_model, cfg.eps, cfg.norm_zero_centered)
            self.mlp = build_mlp(cfg, layer)
            self.hook_resid_mid = HookPoint()  # [batch, pos, d_model]
            self.hook_mlp_out = HookPoint()  # [batch, pos, d_model]
        self.hook_resid_post = HookPoint()  # [batch, pos, d_model]

    def forward(
        self,
        resid: Float[Tensor, "batch pos d_model"],
        cache: MixerCache | AttentionCache | NoCache | None = None,
        attention_mask: Tensor | None = None,
        state_positions: Sequence[int] | None = None,
    ) -> Float[Tensor, "batch pos d_model"]:
        resid = self.hook_resid_pre(resid)
        x = resid if self.post_norm else self.ln1(resid.to(self.ln1.w.dtype))
        if self.slot == "attn":  # attention has no state to materialise
            out = self.attn(x, cache, attention_mask)
        elif self.slot == "mlp":
            out = self.mlp(x)
        else:
            out = self.mixer(x, cache, attention_mask, state_positions)
        out = getattr(self, f"hook_{self.slot}_out")(self.ln1(out) if self.post_norm else out)
        if self.residual_in_fp32:
            resid = at_least_fp32(resid)
        resid = self._join(x if self.normed_residual else resid, out, self.slot)
        if self.has_mlp:
            resid = self.hook_resid_mid(resid)
            x = resid if self.post_norm else self.ln2(resid.to(self.ln2.w.dtype))
            out = self.ln2(self.mlp(x)) if self.post_norm else self.mlp(x)
            resid = self._join(x if self.normed_residual else resid, self.hook_mlp_out(out), "mlp")
        return self.hook_resid_post(resid)

    def _join(self, base: Tensor, out: Tensor, slot: str) -> Float[Tensor, "batch pos d_model"]:
        """``alpha * base + beta * residual_multiplier * out``, multiplying only by factors that are not 1."""
        alpha, beta = self.factors[slot]
        beta = beta * self.residual_multiplier
        return (base if alpha == 1.0 else base * alpha) + (out if beta == 1.0 else out * beta)


class _FinalRMSNorm(RMSNorm):
    """The final norm of a model whose residual stream may be float32 while its weights are not
    (Mamba-2 with ``residual_in_fp32``): returns the weights' dtype, ready for the unembedding."""

    def forward(self, x: Float[Tensor, "... d"]) -> Float[Tensor, "... d"]:
        return super().forward(x).to(self.w.dtype)


def build_blocks(cfg: HookedSSMConfig) -> list[nn.Module]:
    """One block per layer, of the class its layer kind names (``Block`` by default). Each block
    sees the blocks before it, for what layers share (RWKV-7's value residual)."""
    blocks: list[nn.Module] = []
    for layer, name in enumerate(cfg.layer_types):
        blocks.append((layer_kind(name).block or Block)(cfg, layer, blocks))
    return blocks


def build_final_norm(cfg: HookedSSMConfig) -> nn.Module:
    """``ln_final``: a LayerNorm for RWKV-7 (``norm_type="layernorm"``), the read-out of the streams
    with hyper-connections (Qwen4-Exp's, or GLM-5.3's manifold ones), else an RMSNorm."""
    if cfg.hc_count > 1:
        return ManifoldHyperConnectionReadout(cfg) if cfg.hc_type == "manifold" else HyperConnectionReadout(cfg)
    if cfg.norm_type == "layernorm":
        return LayerNorm(cfg.d_model, cfg.eps)
    if cfg.residual_in_fp32:
        return _FinalRMSNorm(cfg.d_model, cfg.eps, cfg.norm_zero_centered)
    return RMSNorm(cfg.d_model, cfg.eps, cfg.norm_zero_centered)
