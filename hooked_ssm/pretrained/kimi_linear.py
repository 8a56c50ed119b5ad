"""Kimi Linear (``KimiLinearForCausalLM``, ``moonshotai/Kimi-Linear-48B-A3B-*``): Kimi Delta Attention
layers and multi-head latent attention layers (no RoPE), each followed by a dense SwiGLU MLP or a
mixture of SwiGLU experts with DeepSeek-V3 sigmoid group routing and a shared expert ->
HookedSSMConfig fields and state dict.

Checkpoints (the Hub's, and what ``save_pretrained`` writes) store the short convolution per q/k/v
(``q_conv1d`` ...: concatenated into the mixer's one ``conv_weight``), the forget gate's and the output
gate's low-rank factors (``f_a_proj`` / ``f_b_proj``, ``g_a_proj`` / ``g_b_proj``), every MLP under
``block_sparse_moe`` and the experts one by one (``w1`` / ``w3`` / ``w2`` = gate / up / down).
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
    if hf.num_key_value_heads != hf.num_attention_heads:
        raise CheckpointError(
            f"Kimi Linear's latent attention expands one key/value head per query head; num_key_value_heads="
            f"{hf.num_key_value_heads} != num_attention_heads={hf.num_attention_heads} is not supported."
        )
    sparse = [kind == "sparse" for kind in hf.mlp_layer_types]
    return dict(
        **transformers_fields(hf, "KimiLinearForCausalLM"),
        layer_types=[_LAYER_TYPES[kind] for kind in hf.layer_types],
        n_heads=hf.linear_num_heads,
        n_key_heads=hf.linear_num_heads,
        d_k=hf.linear_head_dim,
        d_v=hf.linear_head_dim,
        conv_kernel=hf.linear_conv_kernel_dim,
        kda_gate_rank=hf.linear_head_dim,  # f_a_proj / g_a_proj: hidden_size -> head_dim
        n_attn_heads=hf.num_attention_heads,
        n_kv_heads=hf.num_attention_heads,
        d_head=hf.qk_nope_head_dim + hf.qk_rope_head_dim,
        rotary_dim=0,
        attn_bias=bool(hf.attention_bias),
        mla_q_lora_rank=hf.q_lora_rank or 0,
        mla_kv_lora_rank=hf.kv_lora_rank,
        mla_qk_nope_dim=hf.qk_nope_head_dim,
        mla_qk_rope_dim=hf.qk_rope_head_dim,
        mla_v_head_dim=hf.v_head_dim,
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
        eps=hf.rms_norm_eps,
        norm_zero_centered=False,
    )


def _delta_attention(state: dict[str, Tensor], src: str) -> dict[str, Tensor]:
    out = {f"{x}_proj.weight": take(state, f"{src}{x}_proj.weight") for x in "qkvb"}
    out["conv_weight"] = torch.cat([take(state, f"{src}{x}_conv1d.weight") for x in "qkv"]).squeeze(1)
    for gate in "fg":
        out[f"{gate}_proj.0.weight"] = take(state, f"{src}{gate}_a_proj.weight")
        out[f"{gate}_proj.1.weight"] = take(state, f"{src}{gate}_b_proj.weight")
    out["dt_bias"] = take(state, f"{src}dt_bias").flatten()
    out["A_log"] = take(state, f"{src}A_log").flatten()
    out["norm.w"] = take(state, f"{src}o_norm.weight")
    out["out_proj.weight"] = take(state, f"{src}o_proj.weight")
    return out


def _latent_attention(state: dict[str, Tensor], src: str, cfg: HookedSSMConfig) -> dict[str, Tensor]:
    biased = ("kv_a_proj", "o_proj", *(("q_a_proj",) if cfg.mla_q_lora_rank else ()))
    names = {"kv_a_proj": "kv_a_proj_with_mqa", "kv_b_proj": "kv_b_proj", "o_proj": "o_proj"}
    if cfg.mla_q_lora_rank:
        names.update(q_a_proj="q_a_proj", q_b_proj="q_b_proj")
    else:
        names["q_proj"] = "q_proj"
    out = {}
    for ours, theirs in names.items():
        out[f"{ours}.weight"] = take(state, f"{src}{theirs}.weight")
        if cfg.attn_bias and ours in biased:
            out[f"{ours}.bias"] = take(state, f"{src}{theirs}.bias")
    out["kv_a_norm.w"] = take(state, f"{src}kv_a_layernorm.weight")
    if cfg.mla_q_lora_rank:
        out["q_a_norm.w"] = take(state, f"{src}q_a_layernorm.weight")
    return out


def _mlp(state: dict[str, Tensor], src: str, cfg: HookedSSMConfig, moe: bool) -> dict[str, Tensor]:
    if not moe:
        return {f"{p}.weight": take(state, f"{src}{p}.weight") for p in _MLP}
    out = {"router.weight": take(state, f"{src}gate.weight"),
           "score_bias": take(state, f"{src}gate.e_score_correction_bias")}
    out.update({f"shared_expert.{p}.weight": take(state, f"{src}shared_experts.{p}.weight") for p in _MLP})
    for e in range(cfg.n_experts):
        out.update({f"experts.{e}.{ours}.weight": take(state, f"{src}experts.{e}.{theirs}.weight")
                    for theirs, ours in _EXPERT.items()})
    return out


def convert_state_dict(state: dict[str, Tensor], cfg: HookedSSMConfig) -> dict[str, Tensor]:
    """Map a ``KimiLinearForCausalLM`` state dict to HookedSSM's names, consuming every tensor."""
    state = dict(state)
    out = take_embeddings(state, cfg.tie_word_embeddings, "model.embed_tokens.weight", "model.norm.weight")
    for layer, kind in enumerate(cfg.layer_types):
        src, dst = f"model.layers.{layer}.", f"blocks.{layer}."
        out[f"{dst}ln1.w"] = take(state, f"{src}input_layernorm.weight")
        out[f"{dst}ln2.w"] = take(state, f"{src}post_attention_layernorm.weight")
        if kind == "latent_attention":
            out.update({f"{dst}attn.{k}": v for k, v in _latent_attention(state, f"{src}self_attn.", cfg).items()})
        else:
            out.update({f"{dst}mixer.{k}": v for k, v in _delta_attention(state, f"{src}self_attn.").items()})
        mlp = _mlp(state, f"{src}block_sparse_moe.", cfg, cfg.moe_layers[layer])
        out.update({f"{dst}mlp.{k}": v for k, v in mlp.items()})
    ensure_consumed(state)
    return out
