"""OLMo-Hybrid (``OlmoHybridForCausalLM``, ``allenai/Olmo-Hybrid-*``): Gated DeltaNet layers and
post-norm attention layers -> HookedSSMConfig fields and state dict.

A Gated DeltaNet variant, run by ``GatedDeltaNetMixer`` with two parameters: ``beta = 2 sigmoid(b)``
(``linear_allow_neg_eigval``: beta in (0, 2), so the erase ``I - beta k k^T`` can flip the sign of
the state along k) and the output norm's eps fixed at 1e-5 (FLA's ``FusedRMSNormGated``). The
projections q/k/v/g/a/b are separate and the short conv is stored per q/k/v; they are concatenated
into the mixer's layout. Attention layers norm their outputs, not their inputs
(``full_attention_post_norm``), with one q norm and one k norm over all heads; RoPE is optional.

Checkpoints name the norms as the original code does (``attention_layer_norm``,
``feedforward_layer_norm``); the names of transformers' modules (``input_layernorm``,
``post_attention_layernorm``, ``conv1d``) are accepted too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformers import AutoConfig, PretrainedConfig

from hooked_ssm.config import HookedSSMConfig
from hooked_ssm.pretrained.bamba import attention_weights, mlp_weights, rope_fields
from hooked_ssm.pretrained.checkpoint import CheckpointError, ensure_consumed, take, take_embeddings, transformers_fields
from hooked_ssm.pretrained.torch_files import read_weights

_LAYER_TYPES = {"linear_attention": "gated_deltanet", "full_attention": "full_attention_post_norm"}
OUTPUT_NORM_EPS = 1e-5  # OlmoHybridGatedDeltaNet's o_norm, whatever rms_norm_eps says


def read_checkpoint(
    source: Path, raw_config: dict, architecture: str, defaults: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    return config_from_hf(AutoConfig.from_pretrained(source)), read_weights(source)


def config_from_hf(hf: PretrainedConfig) -> dict[str, Any]:
    if hf.hidden_act != "silu":  # also the short conv's activation
        raise CheckpointError(f"OLMo-Hybrid with hidden_act={hf.hidden_act!r} is not supported (only 'silu').")
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    rope = dict(getattr(hf, "rope_parameters", None) or {})
    return dict(
        **transformers_fields(hf, "OlmoHybridForCausalLM"),
        layer_types=[_LAYER_TYPES[kind] for kind in hf.layer_types],
        n_heads=hf.linear_num_value_heads,
        n_key_heads=hf.linear_num_key_heads,
        d_k=hf.linear_key_head_dim,
        d_v=hf.linear_value_head_dim,
        conv_kernel=hf.linear_conv_kernel_dim,
        gdn_beta_scale=2.0 if hf.linear_allow_neg_eigval else 1.0,
        gdn_norm_eps=OUTPUT_NORM_EPS,
        n_attn_heads=hf.num_attention_heads,
        n_kv_heads=hf.num_key_value_heads,
        d_head=head_dim,
        **(rope_fields(hf, head_dim) if rope.get("rope_theta") is not None else dict(rotary_dim=0)),
        attn_output_gate=False,
        attn_qk_norm="all_heads",
        attn_bias=bool(hf.attention_bias),
        d_mlp=hf.intermediate_size,
        act_fn=hf.hidden_act,
        eps=hf.rms_norm_eps,
        norm_zero_centered=False,
    )


def _take_any(state: dict[str, Tensor], *keys: str) -> Tensor:
    """The first of ``keys`` the checkpoint has (one tensor saved under either of its names)."""
    for key in keys:
        if key in state:
            return state.pop(key)
    return take(state, keys[0])  # raises, naming the checkpoint's own name


def _mixer(state: dict[str, Tensor], src: str) -> dict[str, Tensor]:
    if f"{src}conv1d.weight" in state:
        conv = take(state, f"{src}conv1d.weight")
    else:
        conv = torch.cat([take(state, f"{src}{x}_conv1d.weight") for x in "qkv"])
    return {
        "in_proj_qkv.weight": torch.cat([take(state, f"{src}{x}_proj.weight") for x in "qkv"]),
        "in_proj_z.weight": take(state, f"{src}g_proj.weight"),
        "in_proj_a.weight": take(state, f"{src}a_proj.weight"),
        "in_proj_b.weight": take(state, f"{src}b_proj.weight"),
        "conv_weight": conv.squeeze(1),
        "A_log": take(state, f"{src}A_log"),
        "dt_bias": take(state, f"{src}dt_bias"),
        "norm.w": take(state, f"{src}o_norm.weight"),
        "out_proj.weight": take(state, f"{src}o_proj.weight"),
    }


def convert_state_dict(state: dict[str, Tensor], cfg: HookedSSMConfig) -> dict[str, Tensor]:
    """Map an ``OlmoHybridForCausalLM`` state dict to HookedSSM's names, consuming every tensor."""
    state = dict(state)
    out = take_embeddings(state, cfg.tie_word_embeddings, "model.embed_tokens.weight", "model.norm.weight")
    for layer, kind in enumerate(cfg.layer_types):
        src, dst = f"model.layers.{layer}.", f"blocks.{layer}."
        if kind == "gated_deltanet":
            out[f"{dst}ln1.w"] = _take_any(state, f"{src}attention_layer_norm.weight", f"{src}input_layernorm.weight")
            out[f"{dst}ln2.w"] = _take_any(state, f"{src}feedforward_layer_norm.weight", f"{src}post_attention_layernorm.weight")
            out.update({f"{dst}mixer.{k}": v for k, v in _mixer(state, f"{src}linear_attn.").items()})
        else:  # post-norm: ln1 norms the attention's output, ln2 the MLP's
            out[f"{dst}ln1.w"] = _take_any(state, f"{src}feedforward_layer_norm.weight", f"{src}post_attention_layernorm.weight")
            out[f"{dst}ln2.w"] = take(state, f"{src}post_feedforward_layernorm.weight")
            attn = f"{src}self_attn."
            out.update({f"{dst}attn.{k}": v for k, v in attention_weights(state, attn, cfg).items()})
            out[f"{dst}attn.q_norm.w"] = take(state, f"{attn}q_norm.weight")
            out[f"{dst}attn.k_norm.w"] = take(state, f"{attn}k_norm.weight")
        out.update({f"{dst}mlp.{k}": v for k, v in mlp_weights(state, f"{src}mlp.", cfg).items()})
    ensure_consumed(state)
    return out
