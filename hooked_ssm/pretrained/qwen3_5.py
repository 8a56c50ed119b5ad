"""Qwen3.5 (``Qwen3_5ForCausalLM`` and the text part of ``Qwen3_5ForConditionalGeneration``), its
mixture-of-experts models (``Qwen3_5Moe*``) and Qwen3-Next (``Qwen3NextForCausalLM``): transformers
config -> HookedSSMConfig, HF state dict -> ours.

The families share the decoder; Qwen3-Next fuses the mixer's input projections per key head; Qwen3-Next
and Qwen3.5-MoE use mixture-of-experts MLPs (Qwen3.5-MoE in every layer, so its config has no
dense ``intermediate_size``). All are converted to one canonical layout here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformers import AutoConfig, PretrainedConfig

from hooked_ssm.config import HookedSSMConfig
from hooked_ssm.pretrained.checkpoint import CheckpointError, read_safetensors, take

_LAYER_TYPES = {"linear_attention": "gated_deltanet", "full_attention": "full_attention"}


def read_checkpoint(
    source: Path, raw_config: dict, architecture: str, defaults: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    return config_from_hf(AutoConfig.from_pretrained(source), architecture), read_safetensors(source)


def config_from_hf(hf_config: PretrainedConfig, architecture: str) -> dict[str, Any]:
    text = hf_config.get_text_config()
    rope = dict(getattr(text, "rope_parameters", None) or {})
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    partial = rope.get("partial_rotary_factor", getattr(text, "partial_rotary_factor", 1.0))
    n_experts = getattr(text, "num_experts", 0) or 0
    sparse_step = getattr(text, "decoder_sparse_step", 1) or 1
    mlp_only = set(getattr(text, "mlp_only_layers", []) or [])
    return dict(
        d_model=text.hidden_size,
        n_layers=text.num_hidden_layers,
        d_vocab=text.vocab_size,
        layer_types=[_LAYER_TYPES[kind] for kind in text.layer_types],
        n_heads=text.linear_num_value_heads,
        n_key_heads=text.linear_num_key_heads,
        d_k=text.linear_key_head_dim,
        d_v=text.linear_value_head_dim,
        conv_kernel=text.linear_conv_kernel_dim,
        n_attn_heads=text.num_attention_heads,
        n_kv_heads=text.num_key_value_heads,
        d_head=head_dim,
        rotary_dim=int(head_dim * partial),
        rope_theta=float(rope.get("rope_theta", getattr(text, "rope_theta", 10_000.0))),
        attn_output_gate=getattr(text, "attn_output_gate", True),
        d_mlp=getattr(text, "intermediate_size", 0) or 0,
        act_fn=text.hidden_act,
        n_experts=n_experts,
        n_experts_per_tok=getattr(text, "num_experts_per_tok", 0) or 0,
        d_expert=getattr(text, "moe_intermediate_size", 0) or 0,
        d_shared_expert=getattr(text, "shared_expert_intermediate_size", 0) or 0,
        norm_topk_prob=getattr(text, "norm_topk_prob", True),
        moe_layers=[
            n_experts > 0 and layer not in mlp_only and (layer + 1) % sparse_step == 0
            for layer in range(text.num_hidden_layers)
        ],
        eps=text.rms_norm_eps,
        norm_zero_centered=True,
        # transformers ties by the top-level config (the VLM's, not its text_config's).
        tie_word_embeddings=bool(hf_config.tie_word_embeddings),
        n_ctx=getattr(text, "max_position_embeddings", 4096),
        original_architecture=architecture,
        bos_token_id=getattr(text, "bos_token_id", None),
        eos_token_id=getattr(text, "eos_token_id", None),
        pad_token_id=getattr(text, "pad_token_id", None),
    )


def _split_fused_mixer(state: dict[str, Tensor], src: str, cfg: HookedSSMConfig) -> dict[str, Tensor]:
    """Qwen3-Next groups ``in_proj_qkvz`` rows per key head as ``[q_i | k_i | v_i (r d_v) | z_i (r d_v)]``
    and ``in_proj_ba`` as ``[b_i (r) | a_i (r)]``; undo the grouping."""
    r = cfg.n_heads // cfg.n_key_heads
    qkvz = take(state, f"{src}in_proj_qkvz.weight")
    qkvz = qkvz.view(cfg.n_key_heads, 2 * cfg.d_k + 2 * r * cfg.d_v, -1)
    q, k, v, z = qkvz.split([cfg.d_k, cfg.d_k, r * cfg.d_v, r * cfg.d_v], dim=1)
    ba = take(state, f"{src}in_proj_ba.weight").view(cfg.n_key_heads, 2 * r, -1)
    b, a = ba.split([r, r], dim=1)
    flat = lambda w: w.reshape(-1, w.shape[-1])  # noqa: E731
    return {
        "in_proj_qkv.weight": torch.cat([flat(q), flat(k), flat(v)]),
        "in_proj_z.weight": flat(z),
        "in_proj_b.weight": flat(b),
        "in_proj_a.weight": flat(a),
    }


def gdn_mixer_weights(state: dict[str, Tensor], src: str, cfg: HookedSSMConfig) -> dict[str, Tensor]:
    if f"{src}in_proj_qkvz.weight" in state:
        out = _split_fused_mixer(state, src, cfg)
    else:
        out = {name: take(state, f"{src}{name}") for name in
               ("in_proj_qkv.weight", "in_proj_z.weight", "in_proj_b.weight", "in_proj_a.weight")}
    out["conv_weight"] = take(state, f"{src}conv1d.weight").squeeze(1)
    for name in ("A_log", "dt_bias", "out_proj.weight"):
        out[name] = take(state, f"{src}{name}")
    out["norm.w"] = take(state, f"{src}norm.weight")
    return out


def qwen_mlp_weights(state: dict[str, Tensor], src: str, cfg: HookedSSMConfig, moe: bool) -> dict[str, Tensor]:
    projections = ("gate_proj", "up_proj", "down_proj")
    if not moe:
        return {f"{p}.weight": take(state, f"{src}{p}.weight") for p in projections}
    out = {"router.weight": take(state, f"{src}gate.weight"),
           "shared_expert_gate.weight": take(state, f"{src}shared_expert_gate.weight")}
    for p in projections:
        out[f"shared_expert.{p}.weight"] = take(state, f"{src}shared_expert.{p}.weight")
        for e in range(cfg.n_experts):
            out[f"experts.{e}.{p}.weight"] = take(state, f"{src}experts.{e}.{p}.weight")
    return out


def convert_state_dict(state: dict[str, Tensor], cfg: HookedSSMConfig) -> dict[str, Tensor]:
    """Map a transformers state dict (CausalLM or VLM layout) to HookedSSM's parameter names.

    Consumes every text-model tensor and raises on leftovers, so a checkpoint that does not match
    its config never loads silently.
    """
    state = {k.replace("model.language_model.", "model."): v for k, v in state.items()
             if not k.startswith(("model.visual.", "mtp.", "visual."))}
    out = {"embed.W_E": take(state, "model.embed_tokens.weight"), "ln_final.w": take(state, "model.norm.weight")}
    lm_head = state.pop("lm_head.weight", None)
    if not cfg.tie_word_embeddings:
        if lm_head is None:
            raise CheckpointError("Checkpoint has no lm_head.weight but its config says the embeddings are untied.")
        out["unembed.weight"] = lm_head
    for layer, kind in enumerate(cfg.layer_types):
        src, dst = f"model.layers.{layer}.", f"blocks.{layer}."
        out[f"{dst}ln1.w"] = take(state, f"{src}input_layernorm.weight")
        out[f"{dst}ln2.w"] = take(state, f"{src}post_attention_layernorm.weight")
        if kind == "full_attention":
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                out[f"{dst}attn.{name}.weight"] = take(state, f"{src}self_attn.{name}.weight")
            out[f"{dst}attn.q_norm.w"] = take(state, f"{src}self_attn.q_norm.weight")
            out[f"{dst}attn.k_norm.w"] = take(state, f"{src}self_attn.k_norm.weight")
        else:
            out.update({f"{dst}mixer.{k}": v for k, v in gdn_mixer_weights(state, f"{src}linear_attn.", cfg).items()})
        out.update({f"{dst}mlp.{k}": v for k, v in qwen_mlp_weights(state, f"{src}mlp.", cfg, cfg.moe_layers[layer]).items()})
    if state:
        raise CheckpointError(f"Checkpoint has tensors the config does not account for: {sorted(state)[:8]}")
    return out
