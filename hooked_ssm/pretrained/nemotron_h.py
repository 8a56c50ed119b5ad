"""NemotronH (``NemotronHForCausalLM``: ``nvidia/Nemotron-H-*``, ``nvidia/NVIDIA-Nemotron-Nano-*-v2``,
Nemotron 3): every layer is one pre-norm sublayer, a Mamba-2 mixer, an attention (no RoPE: position
comes from the Mamba-2 layers), a plain ``relu2`` MLP, or a mixture of experts with DeepSeek-V3
sigmoid group routing and a shared expert -> HookedSSMConfig fields and state dict.

Layer types map to ``mamba2`` / ``full_attention`` / ``mlp`` (an MoE layer is an ``mlp`` layer
that ``moe_layers`` marks). Latent MoE projections (``moe_latent_size``) are not supported.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor
from transformers import AutoConfig, PretrainedConfig

from hooked_ssm.config import HookedSSMConfig
from hooked_ssm.pretrained.bamba import attention_weights, plain_attention_fields
from hooked_ssm.pretrained.checkpoint import CheckpointError, ensure_consumed, take, take_embeddings, transformers_fields
from hooked_ssm.pretrained.mamba2 import mixer_weights
from hooked_ssm.pretrained.torch_files import read_weights

_LAYER_TYPES = {"linear_attention": "mamba2", "full_attention": "full_attention", "mlp": "mlp", "moe": "mlp"}


def read_checkpoint(
    source: Path, raw_config: dict, architecture: str, defaults: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    return config_from_hf(AutoConfig.from_pretrained(source)), read_weights(source)


def config_from_hf(hf: PretrainedConfig) -> dict[str, Any]:
    if hf.mamba_hidden_act != "silu":
        raise CheckpointError(f"NemotronH with mamba_hidden_act={hf.mamba_hidden_act!r} is not supported (only 'silu').")
    if getattr(hf, "moe_latent_size", None) is not None:
        raise CheckpointError("NemotronH with latent MoE projections (moe_latent_size) is not supported.")
    if getattr(hf, "sliding_window", None):
        raise CheckpointError("NemotronH with sliding-window attention is not supported.")
    kinds = list(hf.layers_block_type)
    has_moe = "moe" in kinds
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    return dict(
        **transformers_fields(hf, "NemotronHForCausalLM"),
        layer_types=[_LAYER_TYPES[kind] for kind in kinds],
        n_heads=hf.mamba_num_heads,
        n_key_heads=hf.n_groups,
        d_k=hf.ssm_state_size,
        d_v=hf.mamba_head_dim,
        conv_kernel=hf.conv_kernel,
        chunk_size=hf.chunk_size,
        conv_bias=bool(hf.use_conv_bias),
        proj_bias=bool(hf.use_bias),
        time_step_limit=tuple(hf.time_step_limit),
        residual_in_fp32=bool(hf.residual_in_fp32),
        **plain_attention_fields(hf, head_dim),
        rotary_dim=0,
        d_mlp=hf.intermediate_size,
        act_fn=hf.mlp_hidden_act,
        mlp_bias=bool(hf.mlp_bias),
        mlp_gated=False,
        block_mlp=False,
        n_experts=hf.n_routed_experts if has_moe else 0,
        n_experts_per_tok=hf.num_experts_per_tok if has_moe else 0,
        d_expert=hf.moe_intermediate_size if has_moe else 0,
        d_shared_expert=hf.moe_shared_expert_intermediate_size if has_moe else 0,
        norm_topk_prob=bool(hf.norm_topk_prob),
        moe_layers=[kind == "moe" for kind in kinds],
        moe_router="sigmoid_group",
        moe_n_group=hf.n_group,
        moe_topk_group=hf.topk_group,
        moe_routed_scale=float(hf.routed_scaling_factor),
        eps=hf.layer_norm_epsilon,
        norm_zero_centered=False,
    )


def _mlp(state: dict[str, Tensor], prefix: str, cfg: HookedSSMConfig) -> dict[str, Tensor]:
    suffixes = ("weight", "bias") if cfg.mlp_bias else ("weight",)
    return {f"{p}.{s}": take(state, f"{prefix}{p}.{s}") for p in ("up_proj", "down_proj") for s in suffixes}


def _moe(state: dict[str, Tensor], prefix: str, cfg: HookedSSMConfig) -> dict[str, Tensor]:
    out = {"router.weight": take(state, f"{prefix}gate.weight"),
           "score_bias": take(state, f"{prefix}gate.e_score_correction_bias")}
    out.update({f"shared_expert.{k}": v for k, v in _mlp(state, f"{prefix}shared_experts.", cfg).items()})
    for e in range(cfg.n_experts):
        out.update({f"experts.{e}.{k}": v for k, v in _mlp(state, f"{prefix}experts.{e}.", cfg).items()})
    return out


def convert_state_dict(state: dict[str, Tensor], cfg: HookedSSMConfig) -> dict[str, Tensor]:
    """Map a ``NemotronHForCausalLM`` state dict to HookedSSM's names, consuming every tensor."""
    state = dict(state)
    out = take_embeddings(state, cfg.tie_word_embeddings, "backbone.embeddings.weight", "backbone.norm_f.weight")
    for layer, kind in enumerate(cfg.layer_types):
        src, dst = f"backbone.layers.{layer}.", f"blocks.{layer}."
        out[f"{dst}ln1.w"] = take(state, f"{src}norm.weight")
        if kind == "full_attention":
            sub = {f"attn.{k}": v for k, v in attention_weights(state, f"{src}mixer.", cfg).items()}
        elif kind == "mamba2":
            sub = {f"mixer.{k}": v for k, v in mixer_weights(state, f"{src}mixer.", cfg).items()}
        else:
            weights = _moe(state, f"{src}mixer.", cfg) if cfg.moe_layers[layer] else _mlp(state, f"{src}mixer.", cfg)
            sub = {f"mlp.{k}": v for k, v in weights.items()}
        out.update({f"{dst}{k}": v for k, v in sub.items()})
    ensure_consumed(state)
    return out
