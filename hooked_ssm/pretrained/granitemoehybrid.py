"""Granite 4.0-H (``GraniteMoeHybridForCausalLM``, ``ibm-granite/granite-4.0-h-*``): Mamba-2 and
attention layers, each followed by a mixture of experts plus an ungated shared expert (or, with
``num_local_experts == 0``, the shared MLP alone) -> HookedSSMConfig fields and state dict.

The Bamba layout with muP multipliers: embeddings times ``embedding_multiplier``, each mixer and
MLP output times ``residual_multiplier``, attention scores times ``attention_multiplier`` (not
``d_head ** -0.5``), logits divided by ``logits_scaling``. Attention may have no RoPE at all
(``position_embedding_type`` other than ``"rope"``). Experts are stored fused, ``input_linear``
``[experts, 2 d_expert, d_model]`` (gate rows, then up rows) and ``output_linear``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor
from transformers import AutoConfig, PretrainedConfig

from hooked_ssm.config import HookedSSMConfig
from hooked_ssm.pretrained.bamba import mamba2_or_attention, mamba_fields, plain_attention_fields, rope_fields
from hooked_ssm.pretrained.checkpoint import CheckpointError, ensure_consumed, take, take_embeddings, transformers_fields
from hooked_ssm.pretrained.torch_files import read_weights

_LAYER_TYPES = {"linear_attention": "mamba2", "full_attention": "full_attention"}


def read_checkpoint(
    source: Path, raw_config: dict, architecture: str, defaults: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    return config_from_hf(AutoConfig.from_pretrained(source)), read_weights(source)


def config_from_hf(hf: PretrainedConfig) -> dict[str, Any]:
    if hf.hidden_act != "silu":  # also the mixer's conv activation
        raise CheckpointError(f"Granite 4.0-H with hidden_act={hf.hidden_act!r} is not supported (only 'silu').")
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    rope = rope_fields(hf, head_dim) if hf.position_embedding_type == "rope" else dict(rotary_dim=0)
    n_experts = hf.num_local_experts or 0
    return dict(
        **transformers_fields(hf, "GraniteMoeHybridForCausalLM"),
        layer_types=[_LAYER_TYPES[kind] for kind in hf.layers_block_type],
        **mamba_fields(hf),
        **plain_attention_fields(hf, head_dim),
        **rope,
        attn_scale=float(hf.attention_multiplier),
        d_mlp=hf.shared_intermediate_size,  # the dense MLP when there are no experts
        act_fn=hf.hidden_act,
        n_experts=n_experts,
        n_experts_per_tok=hf.num_experts_per_tok if n_experts else 0,
        d_expert=hf.intermediate_size if n_experts else 0,
        d_shared_expert=hf.shared_intermediate_size if n_experts else 0,
        norm_topk_prob=True,  # softmax over the top-k logits
        shared_expert_gated=False,
        eps=hf.rms_norm_eps,
        norm_zero_centered=False,
        embedding_multiplier=float(hf.embedding_multiplier),
        residual_multiplier=float(hf.residual_multiplier),
        logits_divisor=float(hf.logits_scaling),
    )


def _fused_mlp(input_linear: Tensor, output_linear: Tensor) -> dict[str, Tensor]:
    gate, up = input_linear.chunk(2, dim=0)
    return {"gate_proj.weight": gate, "up_proj.weight": up, "down_proj.weight": output_linear}


def _mlp_weights(state: dict[str, Tensor], src: str, cfg: HookedSSMConfig) -> dict[str, Tensor]:
    shared = _fused_mlp(take(state, f"{src}shared_mlp.input_linear.weight"), take(state, f"{src}shared_mlp.output_linear.weight"))
    if not cfg.n_experts:
        return shared
    out = {f"shared_expert.{k}": v for k, v in shared.items()}
    out["router.weight"] = take(state, f"{src}block_sparse_moe.router.layer.weight")
    inputs = take(state, f"{src}block_sparse_moe.input_linear.weight")
    outputs = take(state, f"{src}block_sparse_moe.output_linear.weight")
    for e in range(cfg.n_experts):
        out.update({f"experts.{e}.{k}": v for k, v in _fused_mlp(inputs[e], outputs[e]).items()})
    return out


def convert_state_dict(state: dict[str, Tensor], cfg: HookedSSMConfig) -> dict[str, Tensor]:
    """Map a ``GraniteMoeHybridForCausalLM`` state dict to HookedSSM's names, consuming every tensor."""
    state = dict(state)
    out = take_embeddings(state, cfg.tie_word_embeddings, "model.embed_tokens.weight", "model.norm.weight")
    for layer, kind in enumerate(cfg.layer_types):
        src, dst = f"model.layers.{layer}.", f"blocks.{layer}."
        out[f"{dst}ln1.w"] = take(state, f"{src}input_layernorm.weight")
        out[f"{dst}ln2.w"] = take(state, f"{src}post_attention_layernorm.weight")
        out.update({f"{dst}{k}": v for k, v in mamba2_or_attention(state, src, kind, cfg).items()})
        out.update({f"{dst}mlp.{k}": v for k, v in _mlp_weights(state, src, cfg).items()})
    ensure_consumed(state)
    return out
