"""Glm5Next (``Glm5NextForConditionalGeneration``, ``zai-org/GLM-5.3-Flash``; the text model, the vision
tower's tensors dropped): Kimi Delta Attention layers (low-rank gates, bounded forget gate) and
multi-head latent attention without RoPE narrowed by a k-pool sparse-attention indexer, each followed
by a clipped SwiGLU MLP or group-routed clipped SwiGLU experts with a shared expert, in manifold
hyper-connection blocks (``hc_mult`` residual streams) -> HookedSSMConfig fields and state dict.

Checkpoints (the Hub's, and what ``save_pretrained`` writes) store the KDA tensors as Kimi Linear
does (read by its helpers) and each hyper-connection as ``hc_attn_*`` / ``hc_ffn_*``; the sublayers'
input norms (``input_layernorm`` / ``post_attention_layernorm``) belong to the hyper-connections
(``hc1.ln`` / ``hc2.ln``), the final ``norm`` to the read-out. The multi-token-prediction layer after
the decoder is dropped. Layers that reuse an earlier layer's indexer selection (``indexer_types``
"shared") are refused.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from torch import Tensor
from transformers import AutoConfig, PretrainedConfig

from hooked_ssm.config import HookedSSMConfig
from hooked_ssm.pretrained.checkpoint import CheckpointError, ensure_consumed, take, take_embeddings, transformers_fields
from hooked_ssm.pretrained.kimi_linear import (
    delta_attention_weights,
    group_routed_moe_fields,
    latent_attention_fields,
    latent_attention_weights,
    mlp_weights,
    moe_weights,
)
from hooked_ssm.pretrained.torch_files import read_weights

_LAYER_TYPES = {"linear_attention": "kimi_delta_attention_hc", "indexed_attention": "indexed_latent_attention_hc"}
_EXPERT = {"gate_proj": "gate_proj", "up_proj": "up_proj", "down_proj": "down_proj"}


def read_checkpoint(
    source: Path, raw_config: dict, architecture: str, defaults: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    return config_from_hf(AutoConfig.from_pretrained(source)), read_weights(source)


def config_from_hf(hf: PretrainedConfig) -> dict[str, Any]:
    text = hf.get_text_config()
    if text.hidden_act != "silu":  # also the short conv's activation
        raise CheckpointError(f"Glm5Next with hidden_act={text.hidden_act!r} is not supported (only 'silu').")
    if "shared" in text.indexer_types:
        raise CheckpointError(
            f"Glm5Next layers that reuse an earlier layer's indexer selection (indexer_types={text.indexer_types}) "
            "are not supported; only 'full' indexer layers are."
        )
    limit = float(text.swiglu_limit or 0.0)
    fields = transformers_fields(text, "Glm5NextForConditionalGeneration")
    fields["tie_word_embeddings"] = bool(hf.tie_word_embeddings)  # transformers ties by the top-level config
    return dict(
        **fields,
        layer_types=[_LAYER_TYPES[kind] for kind in text.layer_types],
        n_heads=text.linear_num_heads,
        n_key_heads=text.linear_num_heads,
        d_k=text.linear_head_dim,
        d_v=text.linear_head_dim,
        conv_kernel=text.linear_conv_kernel_dim,
        kda_gate_rank=text.linear_head_dim,  # f_a_proj / g_a_proj: hidden_size -> head_dim
        kda_gate_lower_bound=None if text.linear_lower_bound is None else float(text.linear_lower_bound),
        **latent_attention_fields(text),
        rotary_dim=0,
        mla_norm_eps=text.rms_norm_eps,
        indexer_n_heads=text.index_n_heads,
        indexer_head_dim=text.index_head_dim,
        indexer_budget=text.index_topk,
        indexer_compress_ratio=text.index_kpool,
        indexer_tail=bool(text.index_kpool_always_select_tail),
        **group_routed_moe_fields(text),
        swiglu_limits=[limit] * text.num_hidden_layers,
        swiglu_limits_shared=[limit] * text.num_hidden_layers,
        swiglu_limit_dense=limit,
        swiglu_clip_before_act=True,
        hc_count=text.hc_mult,
        hc_type="manifold",
        hc_sinkhorn_iters=text.hc_sinkhorn_iters,
        hc_eps=text.hc_eps,
        eps=text.rms_norm_eps,
        norm_zero_centered=False,
    )


def _hyper_connection(state: dict[str, Tensor], src: str, sublayer: str, norm: str) -> dict[str, Tensor]:
    """``hc_{sublayer}_fn`` / ``_base`` / ``_scale`` and the sublayer's input norm ``norm``."""
    out = {name: take(state, f"{src}hc_{sublayer}_{name}") for name in ("fn", "base", "scale")}
    out["ln.w"] = take(state, f"{src}{norm}.weight")
    return out


def _indexer(state: dict[str, Tensor], src: str) -> dict[str, Tensor]:
    names = {"q_proj.weight": "wq_b.weight", "k_proj.weight": "wk.weight", "k_norm.w": "k_norm.weight",
             "k_norm.b": "k_norm.bias", "head_weights.weight": "weights_proj.weight",
             "pool_gate.weight": "index_kpool_compress_gate", "pool_logit_bias": "index_kpool_compress_ape"}
    return {ours: take(state, f"{src}{theirs}") for ours, theirs in names.items()}


def convert_state_dict(state: dict[str, Tensor], cfg: HookedSSMConfig) -> dict[str, Tensor]:
    """Map a ``Glm5NextForConditionalGeneration`` state dict to HookedSSM's names, consuming every tensor
    of the text model."""
    state = {k.replace("model.language_model.", "model."): v for k, v in state.items()
             if not k.startswith(("model.visual.", "visual."))}
    # The multi-token-prediction layer stored after the decoder (and its shared head) is dropped, as
    # transformers drops it.
    state = {k: v for k, v in state.items() if not (
        ".shared_head." in k or ((m := re.match(r"model\.layers\.(\d+)\.", k)) and int(m.group(1)) >= cfg.n_layers))}
    out = take_embeddings(state, cfg.tie_word_embeddings, "model.embed_tokens.weight", None)
    out["ln_final.norm.w"] = take(state, "model.norm.weight")
    for layer, kind in enumerate(cfg.layer_types):
        src, dst = f"model.layers.{layer}.", f"blocks.{layer}."
        hc1 = _hyper_connection(state, src, "attn", "input_layernorm")
        hc2 = _hyper_connection(state, src, "ffn", "post_attention_layernorm")
        out.update({f"{dst}hc1.{k}": v for k, v in hc1.items()})
        out.update({f"{dst}hc2.{k}": v for k, v in hc2.items()})
        attn = f"{src}self_attn."
        if kind == "indexed_latent_attention_hc":
            weights = {**latent_attention_weights(state, attn, cfg, "o_proj"),
                       **{f"indexer.{k}": v for k, v in _indexer(state, f"{attn}indexer.").items()}}
            out.update({f"{dst}attn.{k}": v for k, v in weights.items()})
        else:
            out.update({f"{dst}mixer.{k}": v for k, v in delta_attention_weights(state, attn, "o_proj").items()})
        mlp = f"{src}mlp."
        if cfg.moe_layers[layer]:
            weights = moe_weights(state, mlp, cfg, _EXPERT, "e_score_correction_bias")
        else:
            weights = mlp_weights(state, mlp)
        out.update({f"{dst}mlp.{k}": v for k, v in weights.items()})
    ensure_consumed(state)
    return out
