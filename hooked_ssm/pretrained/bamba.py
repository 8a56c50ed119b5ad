"""Bamba (``BambaForCausalLM``, ``ibm-ai-platform/Bamba-9B-*``): Mamba-2 layers and a few full
attention layers, each followed by a SwiGLU MLP -> HookedSSMConfig fields and state dict.

The mixer is transformers' Mamba-2 mixer (``Mamba2Mixer`` here, same tensors); the attention has
no q/k norms and no output gate, and rotates half of each head (``partial_rotary_factor`` 0.5,
which ``BambaConfig`` hard-codes); every norm is a plain RMSNorm.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor
from transformers import AutoConfig, PretrainedConfig

from hooked_ssm.config import HookedSSMConfig
from hooked_ssm.pretrained.checkpoint import CheckpointError, ensure_consumed, take, take_embeddings, transformers_fields
from hooked_ssm.pretrained.mamba2 import mixer_weights
from hooked_ssm.pretrained.torch_files import read_weights

_LAYER_TYPES = {"linear_attention": "mamba2", "full_attention": "full_attention"}


def read_checkpoint(
    source: Path, raw_config: dict, architecture: str, defaults: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    return config_from_hf(AutoConfig.from_pretrained(source)), read_weights(source)


def rope_fields(hf: PretrainedConfig, head_dim: int) -> dict[str, Any]:
    """Rotary fields of a transformers config with default (unscaled) RoPE."""
    rope = dict(getattr(hf, "rope_parameters", None) or {})
    if rope.get("rope_type", "default") != "default":
        raise CheckpointError(f"RoPE scaling {rope['rope_type']!r} is not supported (only the default RoPE).")
    partial = rope.get("partial_rotary_factor", getattr(hf, "partial_rotary_factor", 1.0))
    return dict(rotary_dim=int(head_dim * partial), rope_theta=float(rope.get("rope_theta", 10_000.0)))


def mamba_fields(hf: PretrainedConfig) -> dict[str, Any]:
    """The Mamba-2 mixer's fields, from configs that name them ``mamba_*`` (Bamba, Granite 4.0-H, Falcon-H1)."""
    return dict(
        n_heads=hf.mamba_n_heads,
        n_key_heads=hf.mamba_n_groups,
        d_k=hf.mamba_d_state,
        d_v=hf.mamba_d_head,
        conv_kernel=hf.mamba_d_conv,
        chunk_size=hf.mamba_chunk_size,
        conv_bias=bool(hf.mamba_conv_bias),
        proj_bias=bool(hf.mamba_proj_bias),
        time_step_limit=tuple(hf.time_step_limit),
    )


def plain_attention_fields(hf: PretrainedConfig, head_dim: int) -> dict[str, Any]:
    """The attention layers' fields of hybrids whose attention is plain (no output gate, no q/k norm):
    Bamba, Granite 4.0-H, Falcon-H1, NemotronH, Zamba2 (whose config names no ``attention_bias``: it
    has none). RoPE comes separately (``rope_fields``)."""
    return dict(
        n_attn_heads=hf.num_attention_heads,
        n_kv_heads=hf.num_key_value_heads,
        d_head=head_dim,
        attn_output_gate=False,
        attn_qk_norm="none",
        attn_bias=bool(getattr(hf, "attention_bias", False)),
    )


def config_from_hf(hf: PretrainedConfig) -> dict[str, Any]:
    if hf.hidden_act != "silu":  # also the mixer's conv activation
        raise CheckpointError(f"Bamba with hidden_act={hf.hidden_act!r} is not supported (only 'silu').")
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    return dict(
        **transformers_fields(hf, "BambaForCausalLM"),
        layer_types=[_LAYER_TYPES[kind] for kind in hf.layers_block_type],
        **mamba_fields(hf),
        **plain_attention_fields(hf, head_dim),
        **rope_fields(hf, head_dim),
        d_mlp=hf.intermediate_size,
        act_fn=hf.hidden_act,
        mlp_bias=bool(hf.mlp_bias),
        eps=hf.rms_norm_eps,
        norm_zero_centered=False,
    )


def attention_weights(state: dict[str, Tensor], prefix: str, cfg: HookedSSMConfig) -> dict[str, Tensor]:
    """One attention layer's q/k/v/o projections (and biases) under ``prefix``."""
    suffixes = ("weight", "bias") if cfg.attn_bias else ("weight",)
    return {f"{p}.{s}": take(state, f"{prefix}{p}.{s}") for p in ("q_proj", "k_proj", "v_proj", "o_proj") for s in suffixes}


def mlp_weights(state: dict[str, Tensor], prefix: str, cfg: HookedSSMConfig) -> dict[str, Tensor]:
    suffixes = ("weight", "bias") if cfg.mlp_bias else ("weight",)
    return {f"{p}.{s}": take(state, f"{prefix}{p}.{s}") for p in ("gate_proj", "up_proj", "down_proj") for s in suffixes}


def mamba2_or_attention(state: dict[str, Tensor], src: str, kind: str, cfg: HookedSSMConfig) -> dict[str, Tensor]:
    """The token mixer of a layer of the Bamba layout (``mamba.*`` or ``self_attn.*`` under ``src``),
    named as the block's ``mixer.*`` / ``attn.*`` parameters."""
    if kind == "full_attention":
        return {f"attn.{k}": v for k, v in attention_weights(state, f"{src}self_attn.", cfg).items()}
    return {f"mixer.{k}": v for k, v in mixer_weights(state, f"{src}mamba.", cfg).items()}


def convert_state_dict(state: dict[str, Tensor], cfg: HookedSSMConfig) -> dict[str, Tensor]:
    """Map a ``BambaForCausalLM`` state dict to HookedSSM's names, consuming every tensor."""
    state = dict(state)
    out = take_embeddings(state, cfg.tie_word_embeddings, "model.embed_tokens.weight", "model.final_layernorm.weight")
    for layer, kind in enumerate(cfg.layer_types):
        src, dst = f"model.layers.{layer}.", f"blocks.{layer}."
        out[f"{dst}ln1.w"] = take(state, f"{src}input_layernorm.weight")
        out[f"{dst}ln2.w"] = take(state, f"{src}pre_ff_layernorm.weight")
        out.update({f"{dst}{k}": v for k, v in mamba2_or_attention(state, src, kind, cfg).items()})
        out.update({f"{dst}mlp.{k}": v for k, v in mlp_weights(state, f"{src}feed_forward.", cfg).items()})
    ensure_consumed(state)
    return out
