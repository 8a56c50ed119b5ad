"""LaraMini (``LaraMiniForCausalLM``): Qwen3.5's Gated DeltaNet, sliding-window attention layers with
RoPE, global attention layers without any positional encoding, and a mixture of experts with an
ungated shared expert after every mixer -> HookedSSMConfig fields and state dict.

Checkpoints fuse each mixer's input projections into one ``in_proj`` (rows
``[q | k | v | z | b | a]``) and name its gated norm ``out_norm``; experts are stored fused
(``gate_up_proj`` ``[experts, 2 d_expert, d_model]``, gate rows first, and ``down_proj``). The split
layout of transformers' modules (``in_proj_qkv`` ...) is accepted too. Norms are plain RMSNorms
(weight, not 1 + weight).
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

_LAYER_TYPES = {"linear_attention": "gated_deltanet", "sliding_attention": "sliding_attention",
                "full_attention": "full_attention_nope"}
_SPLIT = ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a")


def read_checkpoint(
    source: Path, raw_config: dict, architecture: str, defaults: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    return config_from_hf(AutoConfig.from_pretrained(source)), read_weights(source)


def config_from_hf(hf: PretrainedConfig) -> dict[str, Any]:
    if hf.hidden_act != "silu":  # also the short conv's activation
        raise CheckpointError(f"LaraMini with hidden_act={hf.hidden_act!r} is not supported (only 'silu').")
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    return dict(
        **transformers_fields(hf, "LaraMiniForCausalLM"),
        layer_types=[_LAYER_TYPES[kind] for kind in hf.layer_types],
        n_heads=hf.linear_num_value_heads,
        n_key_heads=hf.linear_num_key_heads,
        d_k=hf.linear_key_head_dim,
        d_v=hf.linear_value_head_dim,
        conv_kernel=hf.linear_conv_kernel_dim,
        n_attn_heads=hf.num_attention_heads,
        n_kv_heads=hf.num_key_value_heads,
        d_head=head_dim,
        **rope_fields(hf, head_dim),
        attn_output_gate=False,
        attn_bias=bool(hf.attention_bias),
        attn_sliding_window=int(hf.sliding_window or 0),
        act_fn=hf.hidden_act,
        n_experts=hf.num_experts,
        n_experts_per_tok=hf.num_experts_per_tok,
        d_expert=hf.moe_intermediate_size,
        d_shared_expert=hf.shared_expert_intermediate_size,
        norm_topk_prob=bool(hf.norm_topk_prob),
        shared_expert_gated=False,
        eps=hf.rms_norm_eps,
        norm_zero_centered=False,
    )


def _mixer(state: dict[str, Tensor], src: str, cfg: HookedSSMConfig) -> dict[str, Tensor]:
    if f"{src}in_proj.weight" in state:
        qkv = 2 * cfg.n_key_heads * cfg.d_k + cfg.n_heads * cfg.d_v
        sizes = [qkv, cfg.n_heads * cfg.d_v, cfg.n_heads, cfg.n_heads]
        out = {f"{name}.weight": w for name, w in zip(_SPLIT, take(state, f"{src}in_proj.weight").split(sizes))}
    else:
        out = {f"{name}.weight": take(state, f"{src}{name}.weight") for name in _SPLIT}
    norm = f"{src}out_norm.weight" if f"{src}out_norm.weight" in state else f"{src}norm.weight"
    out["norm.w"] = take(state, norm)
    out["conv_weight"] = take(state, f"{src}conv1d.weight").squeeze(1)
    for name in ("A_log", "dt_bias", "out_proj.weight"):
        out[name] = take(state, f"{src}{name}")
    return out


def fused_moe_weights(state: dict[str, Tensor], src: str, cfg: HookedSSMConfig) -> dict[str, Tensor]:
    out = {"router.weight": take(state, f"{src}gate.weight")}
    for p in ("gate_proj", "up_proj", "down_proj"):
        out[f"shared_expert.{p}.weight"] = take(state, f"{src}shared_expert.{p}.weight")
    gate_up, down = take(state, f"{src}experts.gate_up_proj"), take(state, f"{src}experts.down_proj")
    for e in range(cfg.n_experts):
        gate, up = gate_up[e].chunk(2, dim=0)
        out.update({f"experts.{e}.gate_proj.weight": gate, f"experts.{e}.up_proj.weight": up,
                    f"experts.{e}.down_proj.weight": down[e]})
    return out


def convert_state_dict(state: dict[str, Tensor], cfg: HookedSSMConfig) -> dict[str, Tensor]:
    """Map a ``LaraMiniForCausalLM`` state dict to HookedSSM's names, consuming every tensor."""
    state = dict(state)
    out = take_embeddings(state, cfg.tie_word_embeddings, "model.embed_tokens.weight", "model.norm.weight")
    for layer, kind in enumerate(cfg.layer_types):
        src, dst = f"model.layers.{layer}.", f"blocks.{layer}."
        out[f"{dst}ln1.w"] = take(state, f"{src}input_layernorm.weight")
        out[f"{dst}ln2.w"] = take(state, f"{src}post_attention_layernorm.weight")
        if kind == "gated_deltanet":
            out.update({f"{dst}mixer.{k}": v for k, v in _mixer(state, f"{src}linear_attn.", cfg).items()})
        else:
            attn = f"{src}self_attn."
            out.update({f"{dst}attn.{k}": v for k, v in attention_weights(state, attn, cfg).items()})
            out[f"{dst}attn.q_norm.w"] = take(state, f"{attn}q_norm.weight")
            out[f"{dst}attn.k_norm.w"] = take(state, f"{attn}k_norm.weight")
        out.update({f"{dst}mlp.{k}": v for k, v in fused_moe_weights(state, f"{src}mlp.", cfg).items()})
    ensure_consumed(state)
    return out
