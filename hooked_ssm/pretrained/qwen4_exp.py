"""Qwen4-Exp (``Qwen4ExpForCausalLM``, the text model): Qwen3.5's Gated DeltaNet (output gate SiLU or
sigmoid, ``output_gate_type``), gated attention narrowed by a QSA indexer (``indexed_attention``),
a mixture of experts with a gated shared expert in every layer, hyper-connections instead of
residual norms, and Per-Layer Embeddings (hashed n-grams) on the GDN layers ``ple_layer_ids``
(one-indexed) -> HookedSSMConfig fields and state dict.

Checkpoints split each n-gram table into ``ngram_embedding.shard_{i}`` row blocks (concatenated in
order here, as transformers does); a single ``ngram_embedding.weight`` is accepted too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformers import AutoConfig, PretrainedConfig

from hooked_ssm.config import HookedSSMConfig
from hooked_ssm.pretrained.bamba import attention_weights, rope_fields
from hooked_ssm.pretrained.checkpoint import CheckpointError, ensure_consumed, take, take_embeddings, transformers_fields
from hooked_ssm.pretrained.lara_mini import fused_moe_weights
from hooked_ssm.pretrained.qwen3_5 import gdn_mixer_weights, qwen_mlp_weights
from hooked_ssm.pretrained.torch_files import read_weights

_LAYER_TYPES = {"linear_attention": "gated_deltanet_hc", "indexed_attention": "indexed_attention_hc",
                "full_attention": "indexed_attention_hc"}  # checkpoints name indexed layers "full_attention"


def read_checkpoint(
    source: Path, raw_config: dict, architecture: str, defaults: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    state = read_weights(source)
    hf = AutoConfig.from_pretrained(source)
    fields = config_from_hf(hf)
    # Each layer's n-gram table holds its heads' prime-sized vocabularies (the checkpoint's
    # ngram_heads_vocab_sizes) one after the other, padded to a multiple of
    # make_ngram_vocab_size_divisible_by; a table of another size fails the load.
    divisor = hf.make_ngram_vocab_size_divisible_by
    rows = []
    for layer, kind in enumerate(fields["layer_types"]):
        sizes = state.get(f"model.layers.{layer}.ple.ple_embedding.ngram_heads_vocab_sizes")
        if kind.endswith("_ple") and sizes is None:
            raise CheckpointError(f"Checkpoint lacks layer {layer}'s ngram_heads_vocab_sizes that its config implies.")
        rows.append(-(-int(sizes.sum()) // divisor) * divisor if kind.endswith("_ple") else 0)
    fields["ple_ngram_rows"] = rows
    return fields, state


def _ngram_table(state: dict[str, Tensor], src: str) -> Tensor:
    """The n-gram table under ``src``: its shards concatenated in order, or the whole table."""
    if f"{src}ngram_embedding.weight" in state:
        return take(state, f"{src}ngram_embedding.weight")
    shards = sorted((int(key.removeprefix(f"{src}ngram_embedding.shard_").removesuffix(".weight")), key)
                    for key in state if key.startswith(f"{src}ngram_embedding.shard_"))
    if not shards:
        raise CheckpointError(f"Checkpoint has no n-gram table under {src}ngram_embedding (shard_*.weight or weight).")
    if [index for index, _ in shards] != list(range(len(shards))):
        raise CheckpointError(f"The n-gram table under {src} is missing shards: has {[i for i, _ in shards]}.")
    return torch.cat([take(state, key) for _, key in shards])


def config_from_hf(hf: PretrainedConfig) -> dict[str, Any]:
    if hf.hidden_act != "silu":  # also the short conv's activation
        raise CheckpointError(f"Qwen4-Exp with hidden_act={hf.hidden_act!r} is not supported (only 'silu').")
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    return dict(
        **transformers_fields(hf, "Qwen4ExpForCausalLM"),
        layer_types=[_LAYER_TYPES[kind] + ("_ple" if layer + 1 in hf.ple_layer_ids else "")
                     for layer, kind in enumerate(hf.layer_types)],
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
        ple_embed_dim=hf.ple_embed_dim if hf.ple_layer_ids else 0,
        ple_conv_kernel=hf.ple_conv_kernel_size,
        ngram_size=hf.ngram_size,
        heads_per_ngram=hf.heads_per_ngram,
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


def _per_layer_embedding(state: dict[str, Tensor], src: str) -> dict[str, Tensor]:
    out = {f"{name}.weight": take(state, f"{src}{name}.weight") for name in ("key_proj", "value_proj")}
    out.update({f"{name}.w": take(state, f"{src}{name}.weight") for name in ("norm_key", "norm_query", "norm_conv")})
    out["conv_weight"] = take(state, f"{src}conv1d.weight")
    embedding = f"{src}ple_embedding."
    out["embedding.table.weight"] = _ngram_table(state, embedding)
    out["embedding.multipliers"] = take(state, f"{embedding}layer_multipliers")
    out["embedding.head_vocab_sizes"] = take(state, f"{embedding}ngram_heads_vocab_sizes")
    out["embedding.head_offsets"] = take(state, f"{embedding}ngram_heads_offsets")
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
    out = take_embeddings(state, cfg.tie_word_embeddings, "model.embed_tokens.weight", None)
    out.update({f"ln_final.{k}": v for k, v in _hyper_connection(state, "model.hyper_connection_mixer.", False).items()})
    for layer, kind in enumerate(cfg.layer_types):
        src, dst = f"model.layers.{layer}.", f"blocks.{layer}."
        out.update({f"{dst}hc1.{k}": v for k, v in _hyper_connection(state, f"{src}attn_hyper_connection.").items()})
        out.update({f"{dst}hc2.{k}": v for k, v in _hyper_connection(state, f"{src}mlp_hyper_connection.").items()})
        if kind == "gated_deltanet_hc_ple":
            out.update({f"{dst}ple.{k}": v for k, v in _per_layer_embedding(state, f"{src}ple.").items()})
        if kind.startswith("gated_deltanet"):
            out.update({f"{dst}mixer.{k}": v for k, v in gdn_mixer_weights(state, f"{src}linear_attn.", cfg).items()})
        else:
            out.update({f"{dst}attn.{k}": v for k, v in _indexed_attention(state, f"{src}self_attn.", cfg).items()})
        out.update({f"{dst}mlp.{k}": v for k, v in _moe(state, f"{src}mlp.", cfg).items()})
    ensure_consumed(state)
    return out
