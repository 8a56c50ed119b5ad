"""Falcon-H1 (``FalconH1ForCausalLM``, ``tiiuae/Falcon-H1-*``): every layer runs a Mamba-2 mixer and
attention in parallel on the same normed input, then a SwiGLU MLP (``ParallelHybridBlock``) ->
HookedSSMConfig fields and state dict.

Falcon-H1's muP multipliers are folded into the weights they scale, which is exact up to float
rounding because each multiplies a linear map's input or output: ``ssm_in_multiplier`` and the
per-section ``ssm_multipliers`` (z, x, B, C, dt rows of ``in_proj``) into ``in_proj``,
``ssm_out_multiplier`` into the mixer's ``out_proj``, ``attention_in_multiplier`` into q/k/v,
``key_multiplier`` into k, ``attention_out_multiplier`` into ``o_proj``, ``mlp_multipliers`` into
``gate_proj`` / ``down_proj``. So every hook sees what transformers computes. The embedding and
logit multipliers stay multipliers (``embedding_multiplier``, ``logits_divisor``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformers import AutoConfig, PretrainedConfig

from hooked_ssm.config import HookedSSMConfig
from hooked_ssm.pretrained.bamba import attention_weights, mamba_fields, mlp_weights, plain_attention_fields, rope_fields
from hooked_ssm.pretrained.checkpoint import CheckpointError, ensure_consumed, take, take_embeddings, transformers_fields
from hooked_ssm.pretrained.mamba2 import mixer_weights
from hooked_ssm.pretrained.torch_files import read_weights


def read_checkpoint(
    source: Path, raw_config: dict, architecture: str, defaults: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    hf = AutoConfig.from_pretrained(source)
    state = _fold_multipliers(read_weights(source), hf)
    return config_from_hf(hf), state


def config_from_hf(hf: PretrainedConfig) -> dict[str, Any]:
    if hf.hidden_act != "silu":  # also the mixer's conv activation
        raise CheckpointError(f"Falcon-H1 with hidden_act={hf.hidden_act!r} is not supported (only 'silu').")
    if bool(hf.mamba_proj_bias) != bool(hf.projectors_bias):
        raise CheckpointError("Falcon-H1 with mamba_proj_bias != projectors_bias is not supported.")
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    if hf.mamba_rms_norm:
        ssm_norm = "norm_then_gate" if hf.mamba_norm_before_gate else "gate_then_norm"
    else:
        ssm_norm = "none"
    return dict(
        **transformers_fields(hf, "FalconH1ForCausalLM"),
        layer_types=["mamba2_parallel_attention"] * hf.num_hidden_layers,
        **mamba_fields(hf),
        ssm_norm=ssm_norm,
        **plain_attention_fields(hf, head_dim),
        **rope_fields(hf, head_dim),
        d_mlp=hf.intermediate_size,
        act_fn=hf.hidden_act,
        mlp_bias=bool(hf.mlp_bias),
        eps=hf.rms_norm_eps,
        norm_zero_centered=False,
        embedding_multiplier=float(hf.embedding_multiplier),
        logits_divisor=1.0 / float(hf.lm_head_multiplier),
    )


def _in_proj_multipliers(hf: PretrainedConfig) -> Tensor:
    """Falcon-H1's ``mup_vector`` (one multiplier per ``in_proj`` row: z, x, B, C, dt) times ``ssm_in_multiplier``."""
    d_inner, group_state = hf.mamba_n_heads * hf.mamba_d_head, hf.mamba_n_groups * hf.mamba_d_state
    sizes = [d_inner, d_inner, group_state, group_state, hf.mamba_n_heads]
    return torch.cat([torch.full((n,), float(m)) for n, m in zip(sizes, hf.ssm_multipliers)])


def _scale(state: dict[str, Tensor], prefix: str, factor: Tensor | float, bias: bool) -> None:
    """Scale the outputs of the linear map at ``prefix`` (its rows and bias) by ``factor``, in place in ``state``."""
    factor = torch.as_tensor(factor, dtype=torch.float64)
    weight = state[f"{prefix}.weight"]
    state[f"{prefix}.weight"] = (weight.double() * (factor[:, None] if factor.dim() else factor)).to(weight.dtype)
    if bias and f"{prefix}.bias" in state:
        state[f"{prefix}.bias"] = (state[f"{prefix}.bias"].double() * factor).to(weight.dtype)


def _scale_input(state: dict[str, Tensor], prefix: str, factor: float) -> None:
    """Scale the input of the linear map at ``prefix`` by ``factor`` (its weight only)."""
    weight = state[f"{prefix}.weight"]
    state[f"{prefix}.weight"] = (weight.double() * factor).to(weight.dtype)


def _fold_multipliers(state: dict[str, Tensor], hf: PretrainedConfig) -> dict[str, Tensor]:
    state = dict(state)
    in_proj = _in_proj_multipliers(hf)
    gate_multiplier, down_multiplier = hf.mlp_multipliers
    for layer in range(hf.num_hidden_layers):
        src = f"model.layers.{layer}."
        if f"{src}mamba.in_proj.weight" not in state:
            continue  # a malformed checkpoint: convert_state_dict names the missing tensor
        _scale_input(state, f"{src}mamba.in_proj", float(hf.ssm_in_multiplier))
        _scale(state, f"{src}mamba.in_proj", in_proj, bias=True)
        _scale(state, f"{src}mamba.out_proj", float(hf.ssm_out_multiplier), bias=True)
        for name in ("q_proj", "k_proj", "v_proj"):
            _scale_input(state, f"{src}self_attn.{name}", float(hf.attention_in_multiplier))
        _scale(state, f"{src}self_attn.k_proj", float(hf.key_multiplier), bias=True)
        _scale(state, f"{src}self_attn.o_proj", float(hf.attention_out_multiplier), bias=True)
        _scale(state, f"{src}feed_forward.gate_proj", float(gate_multiplier), bias=True)
        _scale(state, f"{src}feed_forward.down_proj", float(down_multiplier), bias=True)
    return state


def convert_state_dict(state: dict[str, Tensor], cfg: HookedSSMConfig) -> dict[str, Tensor]:
    """Map a (multiplier-folded) ``FalconH1ForCausalLM`` state dict to HookedSSM's names, consuming every tensor."""
    state = dict(state)
    out = take_embeddings(state, cfg.tie_word_embeddings, "model.embed_tokens.weight", "model.final_layernorm.weight")
    for layer in range(cfg.n_layers):
        src, dst = f"model.layers.{layer}.", f"blocks.{layer}."
        out[f"{dst}ln1.w"] = take(state, f"{src}input_layernorm.weight")
        out[f"{dst}ln2.w"] = take(state, f"{src}pre_ff_layernorm.weight")
        out.update({f"{dst}mixer.{k}": v for k, v in mixer_weights(state, f"{src}mamba.", cfg).items()})
        out.update({f"{dst}attn.{k}": v for k, v in attention_weights(state, f"{src}self_attn.", cfg).items()})
        out.update({f"{dst}mlp.{k}": v for k, v in mlp_weights(state, f"{src}feed_forward.", cfg).items()})
    ensure_consumed(state)
    return out
