"""MiniMax (``MiniMaxForCausalLM``, ``MiniMaxAI/MiniMax-Text-01``): lightning (linear) attention layers
and softmax attention layers, each followed by a mixture of experts without a shared expert ->
HookedSSMConfig fields and state dict.

Each layer adds its sublayers to their *normed* input, weighted per kind (``normed_residual``,
``residual_factors``: ``linear_attn_*``, ``full_attn_*``, ``mlp_*`` alpha/beta factors). A lightning
layer's ``slope_rate`` becomes the mixer's ``slope``; the block-decay buffers transformers saves with
it are functions of the slope and are dropped. Experts ``w1`` / ``w3`` / ``w2`` are gate / up / down.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor
from transformers import AutoConfig, PretrainedConfig

from hooked_ssm.config import HookedSSMConfig
from hooked_ssm.pretrained.bamba import attention_weights, rope_fields
from hooked_ssm.pretrained.checkpoint import CheckpointError, ensure_consumed, take, take_embeddings, transformers_fields
from hooked_ssm.pretrained.torch_files import read_weights

_LAYER_TYPES = {"linear_attention": "lightning_attention", "full_attention": "full_attention"}
_EXPERT = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


def read_checkpoint(
    source: Path, raw_config: dict, architecture: str, defaults: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    return config_from_hf(AutoConfig.from_pretrained(source)), read_weights(source)


def config_from_hf(hf: PretrainedConfig) -> dict[str, Any]:
    if getattr(hf, "sliding_window", None):
        raise CheckpointError("MiniMax with sliding-window attention is not supported.")
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    return dict(
        **transformers_fields(hf, "MiniMaxForCausalLM"),
        layer_types=[_LAYER_TYPES[kind] for kind in hf.layer_types],
        n_heads=hf.num_attention_heads,
        n_key_heads=hf.num_attention_heads,
        d_k=head_dim,
        d_v=head_dim,
        chunk_size=hf.block_size,
        n_attn_heads=hf.num_attention_heads,
        n_kv_heads=hf.num_key_value_heads,
        d_head=head_dim,
        **rope_fields(hf, head_dim),
        attn_output_gate=False,
        attn_qk_norm="none",
        act_fn=hf.hidden_act,
        n_experts=hf.num_local_experts,
        n_experts_per_tok=hf.num_experts_per_tok,
        d_expert=hf.intermediate_size,
        norm_topk_prob=True,
        eps=hf.rms_norm_eps,
        norm_zero_centered=False,
        normed_residual=True,
        residual_factors={
            "mixer": (float(hf.linear_attn_alpha_factor), float(hf.linear_attn_beta_factor)),
            "attn": (float(hf.full_attn_alpha_factor), float(hf.full_attn_beta_factor)),
            "mlp": (float(hf.mlp_alpha_factor), float(hf.mlp_beta_factor)),
        },
    )


def _lightning(state: dict[str, Tensor], src: str) -> dict[str, Tensor]:
    out = {f"{name}.weight": take(state, f"{src}{name}.weight") for name in ("qkv_proj", "output_gate", "out_proj")}
    out["norm.w"] = take(state, f"{src}norm.weight")
    out["slope"] = take(state, f"{src}slope_rate").flatten()
    for derived in ("query_decay", "key_decay", "diagonal_decay"):
        state.pop(f"{src}{derived}", None)
    return out


def _moe(state: dict[str, Tensor], src: str, cfg: HookedSSMConfig) -> dict[str, Tensor]:
    out = {"router.weight": take(state, f"{src}gate.weight")}
    for e in range(cfg.n_experts):
        out.update({f"experts.{e}.{ours}.weight": take(state, f"{src}experts.{e}.{theirs}.weight")
                    for theirs, ours in _EXPERT.items()})
    return out


def convert_state_dict(state: dict[str, Tensor], cfg: HookedSSMConfig) -> dict[str, Tensor]:
    """Map a ``MiniMaxForCausalLM`` state dict to HookedSSM's names, consuming every tensor."""
    state = dict(state)
    out = take_embeddings(state, cfg.tie_word_embeddings, "model.embed_tokens.weight", "model.norm.weight")
    for layer, kind in enumerate(cfg.layer_types):
        src, dst = f"model.layers.{layer}.", f"blocks.{layer}."
        out[f"{dst}ln1.w"] = take(state, f"{src}input_layernorm.weight")
        out[f"{dst}ln2.w"] = take(state, f"{src}post_attention_layernorm.weight")
        if kind == "full_attention":
            out.update({f"{dst}attn.{k}": v for k, v in attention_weights(state, f"{src}self_attn.", cfg).items()})
        else:
            out.update({f"{dst}mixer.{k}": v for k, v in _lightning(state, f"{src}self_attn.").items()})
        out.update({f"{dst}mlp.{k}": v for k, v in _moe(state, f"{src}block_sparse_moe.", cfg).items()})
    ensure_consumed(state)
    return out
