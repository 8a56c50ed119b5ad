"""Zamba2 (``Zamba2ForCausalLM``, ``Zyphra/Zamba2-1.2B`` / ``-2.7B`` / ``-7B``): Mamba-2 layers, some of
them hybrid layers where a shared transformer block feeds the mixer -> HookedSSMConfig fields and
state dict (``hooked_ssm.components.shared_transformer``).

The shared blocks' weights are saved once, under the first hybrid layer that runs each block
(``model.layers.{L}.shared_transformer.*``, with the LoRA adapters of every invocation of it,
``*_adapter_list.{i}``, ``i`` counting hybrid layers); transformers ties the other layers' blocks
to it, and so does HookedSSM. The Mamba-2 mixer is transformers' (``conv1d`` always has a bias; the
gated norm's eps is fixed at 1e-5); the attention reads ``2 d_model`` inputs with heads of
``2 d_model / n_heads`` and scales scores by ``(head_dim / 2) ** -0.5``, without q/k norms or gate.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor
from transformers import AutoConfig, PretrainedConfig

from hooked_ssm.components.shared_transformer import HYBRID_KIND
from hooked_ssm.config import HookedSSMConfig
from hooked_ssm.pretrained.bamba import plain_attention_fields, rope_fields
from hooked_ssm.pretrained.checkpoint import CheckpointError, ensure_consumed, take, take_embeddings, transformers_fields
from hooked_ssm.pretrained.mamba2 import mixer_weights
from hooked_ssm.pretrained.torch_files import read_weights

_LAYER_TYPES = {"linear_attention": "mamba2", "hybrid": HYBRID_KIND}
_GATED_NORM_EPS = 1e-5  # Zamba2MambaMixer's Zamba2RMSNormGated(..., eps=1e-5), whatever rms_norm_eps says
# Shared block tensors: transformers' name under ``shared_transformer.`` -> ours under ``shared_transformer.``.
_SHARED = {"input_layernorm.weight": "ln1.w", "pre_ff_layernorm.weight": "ln2.w",
           **{f"self_attn.{p}.weight": f"attn.{p}.weight" for p in ("q_proj", "k_proj", "v_proj", "o_proj")}}
_SHARED_MLP = {"feed_forward.gate_up_proj": "mlp.gate_up_proj", "feed_forward.down_proj": "mlp.down_proj"}


def read_checkpoint(
    source: Path, raw_config: dict, architecture: str, defaults: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    return config_from_hf(AutoConfig.from_pretrained(source)), read_weights(source)


def config_from_hf(hf: PretrainedConfig) -> dict[str, Any]:
    d_inner = int(hf.mamba_expand * hf.hidden_size)
    if d_inner != hf.n_mamba_heads * hf.mamba_headdim:
        raise CheckpointError(f"Zamba2 with mamba_expand * hidden_size = {d_inner} not divisible into n_mamba_heads = "
                              f"{hf.n_mamba_heads} heads is not supported.")
    unknown = sorted(set(hf.layers_block_type) - set(_LAYER_TYPES))
    if unknown:
        raise CheckpointError(f"Zamba2 layer types {unknown} are not supported (only {sorted(_LAYER_TYPES)}).")
    head_dim = hf.attention_head_dim  # 2 * hidden_size / num_attention_heads: the heads split [resid | embeddings]
    rope = rope_fields(hf, head_dim) if hf.use_mem_rope else dict(rotary_dim=0)
    return dict(
        **transformers_fields(hf, "Zamba2ForCausalLM"),
        layer_types=[_LAYER_TYPES[kind] for kind in hf.layers_block_type],
        n_heads=hf.n_mamba_heads,
        n_key_heads=hf.mamba_ngroups,
        d_k=hf.mamba_d_state,
        d_v=hf.mamba_headdim,
        conv_kernel=hf.mamba_d_conv,
        chunk_size=hf.chunk_size,
        conv_bias=True,
        proj_bias=bool(hf.add_bias_linear),
        time_step_limit=(hf.time_step_min, float("inf")),
        ssm_norm_eps=_GATED_NORM_EPS,
        **plain_attention_fields(hf, head_dim),
        attn_scale=(head_dim / 2) ** -0.5,
        **rope,
        d_mlp=hf.intermediate_size,
        act_fn=hf.hidden_act,
        mlp_bias=bool(hf.add_bias_linear),
        block_mlp=False,  # the only MLPs are the shared blocks'
        n_shared_blocks=hf.num_mem_blocks,
        shared_adapter_rank=hf.adapter_rank,
        shared_attn_adapters=bool(hf.use_shared_attention_adapter),
        eps=hf.rms_norm_eps,
        norm_zero_centered=False,
    )


def _shared_weights(state: dict[str, Tensor], prefix: str, cfg: HookedSSMConfig) -> dict[str, Tensor]:
    """The shared block's own tensors under ``prefix`` (one copy, reused by every invocation)."""
    out = {ours: take(state, f"{prefix}{theirs}") for theirs, ours in _SHARED.items()}
    for suffix in ("weight", "bias") if cfg.mlp_bias else ("weight",):
        out.update({f"{ours}.{suffix}": take(state, f"{prefix}{theirs}.{suffix}") for theirs, ours in _SHARED_MLP.items()})
    return out


def _adapters(state: dict[str, Tensor], prefix: str, invocation: int, cfg: HookedSSMConfig) -> dict[str, Tensor]:
    """Invocation ``invocation``'s LoRA adapters, kept with its shared block under ``prefix``."""
    lists = {"feed_forward.gate_up_proj_adapter_list": "mlp.gate_up_proj.adapter"}
    if cfg.shared_attn_adapters:
        lists.update({f"self_attn.linear_{p}_adapter_list": f"attn.{p}_proj.adapter" for p in "qkv"})
    return {f"{ours}.{i}.weight": take(state, f"{prefix}{theirs}.{invocation}.{i}.weight")
            for theirs, ours in lists.items() for i in (0, 1)}


def convert_state_dict(state: dict[str, Tensor], cfg: HookedSSMConfig) -> dict[str, Tensor]:
    """Map a ``Zamba2ForCausalLM`` state dict to HookedSSM's names, consuming every tensor. Each
    shared block's tensors go to every layer that runs it (the same tensor: the model ties them)."""
    state = dict(state)
    out = take_embeddings(state, cfg.tie_word_embeddings, "model.embed_tokens.weight", "model.final_layernorm.weight")
    owners: dict[int, str] = {}  # shared block -> prefix its tensors are saved under
    shared: dict[int, dict[str, Tensor]] = {}
    invocation = 0
    for layer, kind in enumerate(cfg.layer_types):
        src, dst = f"model.layers.{layer}.", f"blocks.{layer}."
        mamba = f"{src}mamba." if kind == "mamba2" else f"{src}mamba_decoder.mamba."
        out[f"{dst}ln1.w"] = take(state, f"{mamba.removesuffix('mamba.')}input_layernorm.weight")
        out.update({f"{dst}mixer.{k}": v for k, v in mixer_weights(state, mamba, cfg).items()})
        if kind == "mamba2":
            continue
        block = invocation % cfg.n_shared_blocks
        owner = owners.setdefault(block, f"{src}shared_transformer.")
        if block not in shared:
            shared[block] = _shared_weights(state, owner, cfg)
        else:  # a save that kept the tied copy of the block under this layer too: transformers ignores it
            for key in [key for key in state if key.startswith(f"{src}shared_transformer.")]:
                del state[key]
        weights = {**shared[block], **_adapters(state, owner, invocation, cfg),
                   "linear.weight": take(state, f"{src}linear.weight")}
        out.update({f"{dst}shared_transformer.{k}": v for k, v in weights.items()})
        invocation += 1
    ensure_consumed(state)
    return out
