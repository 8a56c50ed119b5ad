"""Qwen4-Exp (``Qwen4ExpForCausalLM``, the text model): Qwen3.5's Gated DeltaNet (output gate SiLU or
sigmoid, ``output_gate_type``), gated attention narrowed by a QSA indexer (``indexed_attention``),
a mixture of experts with a gated shared expert in every layer, and hyper-connections instead of
residual norms -> HookedSSMConfig fields and state dict.

Not supported: Per-Layer Embeddings (``ple_layer_ids``: hashed n-gram embeddings injected into the
streams of some layers); a config that uses them is refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor
from transformers import AutoConfig, PretrainedConfig

from hooked_ssm.config import HookedSSMConfig
from hooked_ssm.pretrained.bamba import attention_weights, rope_fields
from hooked_ssm.pretrained.checkpoint import CheckpointError, ensure_consumed, take, transformers_fields
from hooked_ssm.pretrained.lara_mini import fused_moe_weights
from hooked_ssm.pretrained.qwen3_5 import gdn_mixer_weights, qwen_mlp_weights
from hooked_ssm.pretrained.torch_files import read_weights

_LAYER_TYPES = {"linear_attention": "gated_deltanet_hc", "indexed_attention": "indexed_attention_hc",
                "full_attention": "indexed_attention_hc"}  # checkpoints name indexed layers "full_attention"


def read_checkpoint(
    source: Path, raw_config: dict, architecture: str, defaults: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    return config_from_hf(AutoConfig.from_pretrained(source)), read_weights(source)


def config_from_hf(hf: PretrainedConfig) -> dict[str, Any]:
    if hf.ple_layer_ids:
        raise CheckpointError(
            f"Qwen4-Exp with Per-Layer Embeddings (ple_layer_ids={hf.ple_layer_ids}) is not supported: HookedSSM "
            "does not implement the hashed n-gram embeddings. Only configs with ple_layer_ids=[] load."
        )
    if hf.hidden_act != "silu":  # also the short conv's activation
        raise CheckpointError(f"Qwen4-Exp with hidden_act={hf.hidden_act!r} is not supported (only 'silu').")
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    return dict(
        **transformers_fields(hf, "Qwen4ExpForCausalLM"),
        layer_types=[_LAYER_TYPES[kind] for kind in hf.layer_types],
        n_heads=hf.linear_num_value_heads,
        n_key_heads=hf.linear_num_key_heads,
        d_k=hf.linear_key_head_dim,
        d_v=hf.linear_value_head_dim,
        conv_kernel=hf.linear_conv_kernel_dim,
        gdn_gate_act=hf.output_gate_type or hf.hidden_act,
        n_attn_heads=hf.num_attention_heads,
        n_kv_heads=hf.num_key_value_heads,
        d_head=head_dim,
        **rope_fields(hf, head_dim),
        attn_bias=bool(hf.attention_bias),
        indexer_n_heads=hf.indexer_n_heads or 0,
        indexer_head_dim=hf.indexer_head_dim or 0,
        indexer_budget=hf.indexer_budget or 0,
        indexer_compress_ratio=hf.indexer_compress_ratio or 0,
        hc_count=hf.hc_count,
        hc_lowrank=hf.hc_lowrank,
        act_fn=hf.hidden_act,
        n_experts=hf.num_experts,
        n_experts_per_tok=hf.num_experts_per_tok,
        d_expert=hf.moe_intermediate_size,
        d_shared_expert=hf.shared_expert_intermediate_size,
        norm_topk_prob=bool(hf.norm_topk_prob),
        eps=hf.rms_norm_eps,
        norm_zero_centered=True,
    )


def _hyper_connection(state: dict[str, Tensor], src: str, inject: bool = True) -> dict[str, Tensor]:
    out = {"norm.w": take(state, f"{src}hc_norm.weight"),
           "read_down.weight": take(state, f"{src}input_mix_weight_down.weight"),
           "read_up.weight": take(state, f"{src}input_mix_weight_up.weight")}
    if inject:
        out["inject_weights.weight"] = take(state, f"{src}block_inject_weight.weight")
    return out


def _indexed_attention(state: dict[str, Tensor], src: str, cfg: HookedSSMConfig) -> dict[str, Tensor]:
    out = attention_weights(state, src, cfg)
    out["q_norm.w"] = take(state, f"{src}q_norm.weight")
    out["k_norm.w"] = take(state, f"{src}k_norm.weight")
    out["indexer.qk_proj.weight"] = take(state, f"{src}indexer.index_qk_proj.weight")
    out["indexer.q_norm.w"] = take(state, f"{src}indexer.q_layernorm.weight")
    out["indexer.k_norm.w"] = take(state, f"{src}indexer.k_layernorm.weight")
    return out


def _moe(state: dict[str, Tensor], src: str, cfg: HookedSSMConfig) -> dict[str, Tensor]:
    """Experts stored fused (``experts.gate_up_proj``, as the modules hold them) or one by one (as
    ``save_pretrained`` writes them)."""
    if f"{src}experts.gate_up_proj" not in state:
        return qwen_mlp_weights(state, src, cfg, moe=True)
    return {**fused_moe_weights(state, src, cfg), "shared_expert_gate.weight": take(state, f"{src}shared_expert_gate.weight")}


def convert_state_dict(state: dict[str, Tensor], cfg: HookedSSMConfig) -> dict[str, Tensor]:
    """Map a ``Qwen4ExpForCausalLM`` state dict to HookedSSM's names, consuming every tensor."""
    state = dict(state)
    out = {"embed.W_E": take(state, "model.embed_tokens.weight")}
    lm_head = state.pop("lm_head.weight", None)
    if not cfg.tie_word_embeddings:
        if lm_head is None:
            raise CheckpointError("Checkpoint has no lm_head.weight but its config says the embeddings are untied.")
        out["unembed.weight"] = lm_head
    out.update({f"ln_final.{k}": v for k, v in _hyper_connection(state, "model.hyper_connection_mixer.", False).items()})
    for layer, kind in enumerate(cfg.layer_types):
        src, dst = f"model.layers.{layer}.", f"blocks.{layer}."
        out.update({f"{dst}hc1.{k}": v for k, v in _hyper_connection(state, f"{src}attn_hyper_connection.").items()})
        out.update({f"{dst}hc2.{k}": v for k, v in _hyper_connection(state, f"{src}mlp_hyper_connection.").items()})
        if kind == "gated_deltanet_hc":
            out.update({f"{dst}mixer.{k}": v for k, v in gdn_mixer_weights(state, f"{src}linear_attn.", cfg).items()})
        else:
            out.update({f"{dst}attn.{k}": v for k, v in _indexed_attention(state, f"{src}self_attn.", cfg).items()})
        out.update({f"{dst}mlp.{k}": v for k, v in _moe(state, f"{src}mlp.", cfg).items()})
    ensure_consumed(state)
    return out
