"""Kimi Linear (``KimiLinearForCausalLM``, ``moonshotai/Kimi-Linear-48B-A3B-*``): Kimi Delta Attention
layers and multi-head latent attention layers (no RoPE), each followed by a dense SwiGLU MLP or a
mixture of SwiGLU experts with DeepSeek-V3 sigmoid group routing and a shared expert ->
HookedSSMConfig fields and state dict.

Checkpoints (the Hub's, and what ``save_pretrained`` writes) store q/k/v projections and short convs
apart (``q_proj``, ``q_conv1d`` ...: concatenated into the Gated DeltaNet layout, ``in_proj_qkv`` and
``conv_weight``), the forget gate's and the output gate's low-rank factors (``f_a_proj`` / ``f_b_proj``
-> ``in_proj_a``, ``g_a_proj`` / ``g_b_proj`` -> ``in_proj_z``), every MLP under ``block_sparse_moe``
and the experts one by one (``w1`` / ``w3`` / ``w2`` = gate / up / down).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformers import AutoConfig, PretrainedConfig

from hooked_ssm.config import HookedSSMConfig
from hooked_ssm.pretrained.checkpoint import CheckpointError, ensure_consumed, take, take_embeddings, transformers_fields
from hooked_ssm.pretrained.torch_files import read_weights

_LAYER_TYPES = {"linear_attention": "kimi_delta_attention", "full_attention": "latent_attention"}
_EXPERT = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
_MLP = ("gate_proj", "up_proj", "down_proj")


def read_checkpoint(
    source: Path, raw_config: dict, architecture: str, defaults: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    return config_from_hf(AutoConfig.from_pretrained(source)), read_weights(source)


def config_from_hf(hf: PretrainedConfig) -> dict[str, Any]:
    if hf.hidden_act != "silu":  # also the short conv's activation
        raise CheckpointError(f"Kimi Linear with hidden_act={hf.hidden_act!r} is not supported (only 'silu').")
    return dict(
        **transformers_fields(hf, "KimiLinearForCausalLM"),
        layer_types=[_LAYER_TYPES[kind] for kind in hf.layer_types],
        n_heads=hf.linear_num_heads,
        n_key_heads=hf.linear_num_heads,
        d_k=hf.linear_head_dim,
        d_v=hf.linear_head_dim,
        conv_kernel=hf.linear_conv_kernel_dim,
        kda_gate_rank=hf.linear_head_dim,  # f_a_proj / g_a_proj: hidden_size -> head_dim
        **latent_attention_fields(hf),
        rotary_dim=0,
        **group_routed_moe_fields(hf),
        eps=hf.rms_norm_eps,
        norm_zero_centered=False,
    )


def latent_attention_fields(hf: PretrainedConfig) -> dict[str, Any]:
    """The latent attention's config fields (Kimi Linear, BailingHybrid)."""
    if hf.num_key_value_heads != hf.num_attention_heads:
        raise CheckpointError(
            f"Latent attention expands one key/value head per query head; num_key_value_heads="
            f"{hf.num_key_value_heads} != num_attention_heads={hf.num_attention_heads} is not supported."
        )
    return dict(
        n_attn_heads=hf.num_attention_heads,
        n_kv_heads=hf.num_attention_heads,
        d_head=hf.qk_nope_head_dim + hf.qk_rope_head_dim,
        attn_bias=bool(hf.attention_bias),
        mla_q_lora_rank=hf.q_lora_rank or 0,
        mla_kv_lora_rank=hf.kv_lora_rank,
        mla_qk_nope_dim=hf.qk_nope_head_dim,
        mla_qk_rope_dim=hf.qk_rope_head_dim,
        mla_v_head_dim=hf.v_head_dim,
    )


def group_routed_moe_fields(hf: PretrainedConfig) -> dict[str, Any]:
    """Dense SwiGLU or group-routed SwiGLU experts per ``mlp_layer_types`` (Kimi Linear, BailingHybrid)."""
    sparse = [kind == "sparse" for kind in hf.mlp_layer_types]
    return dict(
        d_mlp=hf.intermediate_size,
        act_fn=hf.hidden_act,
        n_experts=hf.num_local_experts if any(sparse) else 0,
        n_experts_per_tok=hf.num_experts_per_tok if any(sparse) else 0,
        d_expert=hf.moe_intermediate_size,
        d_shared_expert=hf.moe_intermediate_size * hf.n_shared_experts,
        norm_topk_prob=bool(hf.norm_topk_prob),
        moe_layers=sparse,
        moe_router="sigmoid_group",
        moe_n_group=hf.n_group,
        moe_topk_group=hf.topk_group,
        moe_routed_scale=float(hf.routed_scaling_factor),
    )


def delta_attention_weights(state: dict[str, Tensor], src: str, out_name: str) -> dict[str, Tensor]:
    """A KDA mixer's tensors in ``GatedDeltaNetMixer``'s layout: q/k/v projections and their short convs
    concatenated; the forget gate (``f``) and output gate (``g``) low rank (``f_a_proj`` / ``f_b_proj``:
    Kimi Linear) or full rank (``f_proj``: BailingHybrid); ``out_name`` the output projection."""
    out = {
        "in_proj_qkv.weight": torch.cat([take(state, f"{src}{x}_proj.weight") for x in "qkv"]),
        "in_proj_b.weight": take(state, f"{src}b_proj.weight"),
        "conv_weight": torch.cat([take(state, f"{src}{x}_conv1d.weight") for x in "qkv"]).squeeze(1),
    }
    for theirs, ours in (("f", "in_proj_a"), ("g", "in_proj_z")):
        if f"{src}{theirs}_a_proj.weight" in state:
            out[f"{ours}.0.weight"] = take(state, f"{src}{theirs}_a_proj.weight")
            out[f"{ours}.1.weight"] = take(state, f"{src}{theirs}_b_proj.weight")
        else:
            out[f"{ours}.weight"] = take(state, f"{src}{theirs}_proj.weight")
    out["dt_bias"] = take(state, f"{src}dt_bias").flatten()
    out["A_log"] = take(state, f"{src}A_log").flatten()
    out["norm.w"] = take(state, f"{src}o_norm.weight")
    out["out_proj.weight"] = take(state, f"{src}{out_name}.weight")
    return out


def latent_attention_weights(
    state: dict[str, Tensor], src: str, cfg: HookedSSMConfig, out_name: str
) -> dict[str, Tensor]:
    """A latent attention's tensors (``out_name``: the checkpoint's output projection); the head gate's if any."""
    names = {"kv_a_proj": "kv_a_proj_with_mqa", "kv_b_proj": "kv_b_proj", "o_proj": out_name}
    names.update({"q_a_proj": "q_a_proj", "q_b_proj": "q_b_proj"} if cfg.mla_q_lora_rank else {"q_proj": "q_proj"})
    biased = {"kv_a_proj", "o_proj", "q_a_proj"} if cfg.attn_bias else set()
    out = {}
    for ours, theirs in names.items():
        out[f"{ours}.weight"] = take(state, f"{src}{theirs}.weight")
        if ours in biased:
            out[f"{ours}.bias"] = take(state, f"{src}{theirs}.bias")
    out["kv_a_norm.w"] = take(state, f"{src}kv_a_layernorm.weight")
    if cfg.mla_q_lora_rank:
        out["q_a_norm.w"] = take(state, f"{src}q_a_layernorm.weight")
    if cfg.mla_head_gate:
        out["g_proj.weight"] = take(state, f"{src}g_proj.weight")
    return out


def moe_weights(
    state: dict[str, Tensor], src: str, cfg: HookedSSMConfig, experts: dict[str, str], score_bias: str
) -> dict[str, Tensor]:
    """Group-routed experts: router, score bias (``score_bias``: its name under ``gate.``), shared
    expert, and each expert's projections (``experts``: the checkpoint's names -> ours)."""
    out = {"router.weight": take(state, f"{src}gate.weight"), "score_bias": take(state, f"{src}gate.{score_bias}")}
    out.update({f"shared_expert.{p}.weight": take(state, f"{src}shared_experts.{p}.weight") for p in _MLP})
    for e in range(cfg.n_experts):
        out.update({f"experts.{e}.{ours}.weight": take(state, f"{src}experts.{e}.{theirs}.weight")
                    for theirs, ours in experts.items()})
    return out


def mlp_weights(state: dict[str, Tensor], src: str) -> dict[str, Tensor]:
    return {f"{p}.weight": take(state, f"{src}{p}.weight") for p in _MLP}


def convert_state_dict(state: dict[str, Tensor], cfg: HookedSSMConfig) -> dict[str, Tensor]:
    """Map a ``KimiLinearForCausalLM`` state dict to HookedSSM's names, consuming every tensor."""
    state = dict(state)
    out = take_embeddings(state, cfg.tie_word_embeddings, "model.embed_tokens.weight", "model.norm.weight")
    for layer, kind in enumerate(cfg.layer_types):
        src, dst = f"model.layers.{layer}.", f"blocks.{layer}."
        out[f"{dst}ln1.w"] = take(state, f"{src}input_layernorm.weight")
        out[f"{dst}ln2.w"] = take(state, f"{src}post_attention_layernorm.weight")
        attn = f"{src}self_attn."
        if kind == "latent_attention":
            out.update({f"{dst}attn.{k}": v for k, v in latent_attention_weights(state, attn, cfg, "o_proj").items()})
        else:
            out.update({f"{dst}mixer.{k}": v for k, v in delta_attention_weights(state, attn, "o_proj").items()})
        mlp = f"{src}block_sparse_moe."
        if cfg.moe_layers[layer]:
            weights = moe_weights(state, mlp, cfg, _EXPERT, "e_score_correction_bias")
        else:
            weights = mlp_weights(state, mlp)
        out.update({f"{dst}mlp.{k}": v for k, v in weights.items()})
    ensure_consumed(state)
    return out
