"""BailingHybrid (``BailingHybridForCausalLM``, inclusionAI Ling 3: ``inclusionAI/Ling-3.0-Flash``): Kimi
Delta Attention layers with full-rank gates and the bounded ("safe") forget gate, and multi-head latent
attention with RoPE on the shared key part and a sigmoid gate per head, each followed by a dense SwiGLU
MLP or group-routed SwiGLU experts (optionally clipped: ``swiglu_limits``) with a shared expert ->
HookedSSMConfig fields and state dict.

The mixer is Kimi Linear's (``KimiDeltaAttentionMixer``) with ``kda_gate_rank=0`` and
``kda_gate_lower_bound``; the pieces the two checkpoints share are read by ``kimi_linear``'s helpers.
Checkpoints name the embeddings ``word_embeddings``, each layer's mixer ``attention`` and its output
projection ``dense``, the score bias ``expert_bias``. DeepSeek's interleaved RoPE pairs are
de-interleaved here in the rows that compute them (``LatentAttention`` rotates ``rotate_half``-style).
The multi-token-prediction layers stored after the decoder are dropped, as transformers drops them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformers import AutoConfig, PretrainedConfig

from hooked_ssm.config import HookedSSMConfig
from hooked_ssm.pretrained.checkpoint import CheckpointError, ensure_consumed, take, take_embeddings, transformers_fields
from hooked_ssm.pretrained.kimi_linear import (
    delta_attention_weights,
    group_routed_moe_fields,
    latent_attention_fields,
    latent_attention_weights,
    mlp_weights,
    moe_weights,
)
from hooked_ssm.pretrained.torch_files import read_weights

_LAYER_TYPES = {"linear_attention": "kimi_delta_attention", "full_attention": "latent_attention_rope"}
_EXPERT = {"gate_proj": "gate_proj", "up_proj": "up_proj", "down_proj": "down_proj"}


def read_checkpoint(
    source: Path, raw_config: dict, architecture: str, defaults: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    return config_from_hf(AutoConfig.from_pretrained(source)), read_weights(source)


def config_from_hf(hf: PretrainedConfig) -> dict[str, Any]:
    if hf.hidden_act != "silu":  # also the short conv's activation
        raise CheckpointError(f"BailingHybrid with hidden_act={hf.hidden_act!r} is not supported (only 'silu').")
    rope = dict(hf.rope_parameters)
    if rope.get("rope_type", "default") != "default":
        raise CheckpointError(f"BailingHybrid with rope_type={rope['rope_type']!r} is not supported (only 'default').")
    return dict(
        **transformers_fields(hf, "BailingHybridForCausalLM"),
        layer_types=[_LAYER_TYPES[kind] for kind in hf.layer_types],
        n_heads=hf.linear_num_heads,
        n_key_heads=hf.linear_num_heads,
        d_k=hf.linear_head_dim,
        d_v=hf.linear_head_dim,
        conv_kernel=hf.linear_conv_kernel_dim,
        kda_gate_lower_bound=float(hf.kda_lower_bound) if hf.kda_safe_gate else None,
        **latent_attention_fields(hf),
        rotary_dim=hf.qk_rope_head_dim,
        rope_theta=float(rope["rope_theta"]),
        mla_head_gate=True,
        **group_routed_moe_fields(hf),
        swiglu_limits=[float(x) for x in hf.swiglu_limits],
        swiglu_limits_shared=[float(x) for x in hf.swiglu_limits_shared],
        eps=hf.rms_norm_eps,
        norm_zero_centered=False,
    )


def _deinterleave(w: Tensor, rows: slice) -> Tensor:
    """``w`` with the RoPE rows ``rows`` of each head reordered (x0, x1, x2, x3, ...) -> (x0, x2, ..., x1, x3, ...)."""
    w = w.clone()
    w[..., rows, :] = torch.cat([w[..., rows, :][..., 0::2, :], w[..., rows, :][..., 1::2, :]], dim=-2)
    return w


def _rope_rows_deinterleaved(weights: dict[str, Tensor], cfg: HookedSSMConfig) -> dict[str, Tensor]:
    """Queries: the last ``qk_rope_dim`` rows of each head of the final query projection; keys: the
    last ``qk_rope_dim`` rows of ``kv_a_proj`` (the shared key part), with its bias."""
    heads, d_head, rope = cfg.n_attn_heads, cfg.mla_qk_nope_dim + cfg.mla_qk_rope_dim, cfg.mla_qk_rope_dim
    q = "q_b_proj.weight" if cfg.mla_q_lora_rank else "q_proj.weight"
    per_head = weights[q].view(heads, d_head, -1)
    weights[q] = _deinterleave(per_head, slice(d_head - rope, d_head)).reshape(heads * d_head, -1)
    weights["kv_a_proj.weight"] = _deinterleave(weights["kv_a_proj.weight"], slice(-rope, None))
    if "kv_a_proj.bias" in weights:
        weights["kv_a_proj.bias"] = _deinterleave(weights["kv_a_proj.bias"][:, None], slice(-rope, None))[:, 0]
    return weights


def convert_state_dict(state: dict[str, Tensor], cfg: HookedSSMConfig) -> dict[str, Tensor]:
    """Map a ``BailingHybridForCausalLM`` state dict to HookedSSM's names, consuming every tensor."""
    state = {k: v for k, v in state.items()
             if not ((m := re.match(r"model\.layers\.(\d+)\.", k)) and int(m.group(1)) >= cfg.n_layers)}
    out = take_embeddings(state, cfg.tie_word_embeddings, "model.word_embeddings.weight", "model.norm.weight")
    for layer, kind in enumerate(cfg.layer_types):
        src, dst = f"model.layers.{layer}.", f"blocks.{layer}."
        out[f"{dst}ln1.w"] = take(state, f"{src}input_layernorm.weight")
        out[f"{dst}ln2.w"] = take(state, f"{src}post_attention_layernorm.weight")
        attn = f"{src}attention."
        if kind == "latent_attention_rope":
            weights = _rope_rows_deinterleaved(latent_attention_weights(state, attn, cfg, "dense"), cfg)
            out.update({f"{dst}attn.{k}": v for k, v in weights.items()})
        else:
            out.update({f"{dst}mixer.{k}": v for k, v in delta_attention_weights(state, attn, "dense").items()})
        mlp = f"{src}mlp."
        if cfg.moe_layers[layer]:
            weights = moe_weights(state, mlp, cfg, _EXPERT, "expert_bias")
        else:
            weights = mlp_weights(state, mlp)
        out.update({f"{dst}mlp.{k}": v for k, v in weights.items()})
    ensure_consumed(state)
    return out
