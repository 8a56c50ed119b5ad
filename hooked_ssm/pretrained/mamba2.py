"""Mamba-2: transformers ``Mamba2ForCausalLM`` checkpoints and the original mamba_ssm layout
(``state-spaces/mamba2-*``: ``config.json`` with ``d_model`` / ``n_layer`` / ``ssm_cfg``,
``pytorch_model.bin`` with ``backbone.embedding.weight``) -> HookedSSMConfig fields and state dict.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor
from transformers import AutoConfig, PretrainedConfig

from hooked_ssm.config import HookedSSMConfig
from hooked_ssm.pretrained.checkpoint import CheckpointError, take
from hooked_ssm.pretrained.torch_files import read_weights

MAMBA_SSM = "mamba_ssm"  # pseudo-architecture of the original layout

# mamba_ssm.modules.mamba2.Mamba2 defaults (what an ssm_cfg of {"layer": "Mamba2"} means).
MAMBA_SSM_DEFAULTS: dict[str, Any] = {
    "d_state": 128, "d_conv": 4, "expand": 2, "headdim": 64, "ngroups": 1, "chunk_size": 256,
    "rmsnorm": True, "norm_before_gate": False, "bias": False, "conv_bias": True,
    "dt_limit": (0.0, float("inf")), "D_has_hdim": False, "d_ssm": None,
}


def is_mamba_ssm_config(raw: dict) -> bool:
    return "ssm_cfg" in raw or ("d_model" in raw and "n_layer" in raw)


def architecture_of(raw: dict) -> str | None:
    """The original mamba_ssm config.json names no architecture and no model_type."""
    return MAMBA_SSM if is_mamba_ssm_config(raw) else None


def read_checkpoint(
    source: Path, raw_config: dict, architecture: str, defaults: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    state = read_weights(source)
    if architecture == MAMBA_SSM:
        return config_from_mamba_ssm(raw_config, state, defaults), state
    return config_from_hf(AutoConfig.from_pretrained(source)), state


def _common(n_layers: int) -> dict[str, Any]:
    return dict(
        layer_types=["mamba2"] * n_layers,
        norm_zero_centered=False,
        norm_type="rmsnorm",
        d_mlp=0,
        n_ctx=2048,
        default_prepend_bos=False,
    )


def config_from_hf(hf: PretrainedConfig) -> dict[str, Any]:
    """Fields of a transformers ``Mamba2Config`` (absent keys take transformers' defaults)."""
    if hf.hidden_act != "silu":
        raise CheckpointError(f"Mamba-2 with hidden_act={hf.hidden_act!r} is not supported (only 'silu').")
    d_inner = int(hf.expand * hf.hidden_size)
    if d_inner != hf.num_heads * hf.head_dim:
        raise CheckpointError(
            f"Inconsistent Mamba-2 config: expand*hidden_size = {d_inner} but num_heads*head_dim = "
            f"{hf.num_heads}*{hf.head_dim} = {hf.num_heads * hf.head_dim}."
        )
    return dict(
        d_model=hf.hidden_size,
        n_layers=hf.num_hidden_layers,
        d_vocab=hf.vocab_size,
        n_heads=hf.num_heads,
        n_key_heads=hf.n_groups,
        d_k=hf.state_size,
        d_v=hf.head_dim,
        conv_kernel=hf.conv_kernel,
        conv_bias=bool(hf.use_conv_bias),
        proj_bias=bool(hf.use_bias),
        time_step_limit=tuple(hf.time_step_limit),
        residual_in_fp32=bool(hf.residual_in_fp32),
        eps=hf.layer_norm_epsilon,
        tie_word_embeddings=bool(hf.tie_word_embeddings),
        original_architecture="Mamba2ForCausalLM",
        bos_token_id=hf.bos_token_id,
        eos_token_id=hf.eos_token_id,
        pad_token_id=hf.pad_token_id,
        **_common(hf.num_hidden_layers),
    )


def config_from_mamba_ssm(raw: dict, state: dict[str, Tensor], defaults: dict[str, Any] | None = None) -> dict[str, Any]:
    """Fields of an original mamba_ssm ``config.json``; dims the config leaves unsaid come from
    ``defaults`` (a release table entry), mamba_ssm's own defaults, and the tensor shapes."""
    ssm = {**MAMBA_SSM_DEFAULTS, **(defaults or {}), **(raw.get("ssm_cfg") or {})}
    if ssm.get("layer", "Mamba2") != "Mamba2":
        raise CheckpointError(f"ssm_cfg.layer is {ssm['layer']!r}; only Mamba2 checkpoints are supported (not Mamba-1).")
    unsupported = {
        "d_intermediate": raw.get("d_intermediate", 0) not in (0, None),
        "attn_layer_idx": bool(raw.get("attn_layer_idx")),
        "rms_norm": raw.get("rms_norm", True) is not True,
        "ssm_cfg.rmsnorm": ssm["rmsnorm"] is not True,
        "ssm_cfg.norm_before_gate": ssm["norm_before_gate"] is not False,
        "ssm_cfg.D_has_hdim": bool(ssm["D_has_hdim"]),
    }
    bad = [name for name, flag in unsupported.items() if flag]
    if bad:
        raise CheckpointError(f"This mamba_ssm checkpoint uses options HookedSSM does not support: {bad}.")
    try:
        n_layers = int(raw["n_layer"])
        d_model = int(raw["d_model"])
        vocab = int(raw["vocab_size"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"mamba_ssm config.json lacks or mangles {err}; it needs d_model, n_layer, vocab_size.") from None
    multiple = int(raw.get("pad_vocab_size_multiple", 1) or 1)
    if vocab % multiple:
        vocab += multiple - vocab % multiple
    prefix = "backbone.layers.0.mixer."
    try:
        n_heads = state[f"{prefix}A_log"].shape[0]
        conv_dim, _, conv_kernel = state[f"{prefix}conv1d.weight"].shape
        d_inner = state[f"{prefix}out_proj.weight"].shape[1]
    except KeyError as err:
        raise CheckpointError(f"Checkpoint is missing the tensor {err.args[0]!r} of a Mamba-2 layer.") from None
    if ssm["d_ssm"] not in (None, d_inner):
        raise CheckpointError(f"ssm_cfg.d_ssm={ssm['d_ssm']} (a partial SSM) is not supported.")
    explicit = raw.get("ssm_cfg") or {}
    group_state = (conv_dim - d_inner) // 2  # n_groups * d_state
    if "ngroups" in explicit or "d_state" not in explicit:
        n_groups = int(ssm["ngroups"])
    else:
        n_groups = group_state // int(explicit["d_state"])
    d_state = group_state // max(n_groups, 1)
    shapes = {"expand": d_inner / d_model, "headdim": d_inner // n_heads, "d_state": d_state, "d_conv": conv_kernel}
    conflicts = {name: (explicit[name], value) for name, value in shapes.items() if name in explicit and explicit[name] != value}
    if conflicts or d_inner % n_heads or n_groups * d_state * 2 != conv_dim - d_inner or n_heads % n_groups:
        raise CheckpointError(
            f"Tensor shapes (conv_dim {conv_dim}, d_inner {d_inner}, {n_heads} heads, kernel {conv_kernel}) do not fit "
            f"the config (ngroups {n_groups}; config vs shapes: {conflicts})."
        )
    headdim = d_inner // n_heads
    return dict(
        d_model=d_model,
        n_layers=n_layers,
        d_vocab=vocab,
        n_heads=n_heads,
        n_key_heads=n_groups,
        d_k=d_state,
        d_v=headdim,
        conv_kernel=conv_kernel,
        conv_bias=bool(ssm["conv_bias"]),
        proj_bias=bool(ssm["bias"]),
        time_step_limit=tuple(ssm["dt_limit"]),
        residual_in_fp32=bool(raw.get("residual_in_fp32", True)),
        eps=float(raw.get("norm_epsilon", 1e-5)),
        tie_word_embeddings=bool(raw.get("tie_embeddings", True)),
        original_architecture=MAMBA_SSM,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        **_common(n_layers),
    )


def mixer_weights(state: dict[str, Tensor], prefix: str, cfg: HookedSSMConfig) -> dict[str, Tensor]:
    """Take one Mamba-2 mixer's tensors (transformers / mamba_ssm names under ``prefix``), named as
    ``Mamba2Mixer``'s parameters. Shared by every family that runs this mixer."""
    out = {"conv_weight": take(state, f"{prefix}conv1d.weight").squeeze(1)}
    names = ["in_proj.weight", "out_proj.weight", "dt_bias", "A_log", "D"]
    names += ["in_proj.bias", "out_proj.bias"] if cfg.proj_bias else []
    for name in names:
        out[name] = take(state, f"{prefix}{name}")
    if cfg.conv_bias:
        out["conv_bias"] = take(state, f"{prefix}conv1d.bias")
    if cfg.ssm_norm != "none":
        out["norm.w"] = take(state, f"{prefix}norm.weight")
    return out


def convert_state_dict(state: dict[str, Tensor], cfg: HookedSSMConfig) -> dict[str, Tensor]:
    """Map a transformers or mamba_ssm Mamba-2 state dict to HookedSSM's parameter names.

    Consumes every tensor and raises on leftovers, so a checkpoint that does not match its config
    never loads silently.
    """
    state = dict(state)
    embed_key = "backbone.embeddings.weight" if "backbone.embeddings.weight" in state else "backbone.embedding.weight"
    out = {"embed.W_E": take(state, embed_key), "ln_final.w": take(state, "backbone.norm_f.weight")}
    lm_head = state.pop("lm_head.weight", None)  # mamba_ssm saves it even when tied
    if not cfg.tie_word_embeddings:
        if lm_head is None:
            raise CheckpointError("Checkpoint has no lm_head.weight but its config says the embeddings are untied.")
        out["unembed.weight"] = lm_head
    for layer in range(cfg.n_layers):
        src, dst = f"backbone.layers.{layer}.", f"blocks.{layer}."
        out[f"{dst}ln1.w"] = take(state, f"{src}norm.weight")
        out.update({f"{dst}mixer.{k}": v for k, v in mixer_weights(state, f"{src}mixer.", cfg).items()})
    if state:
        raise CheckpointError(f"Checkpoint has tensors the config does not account for: {sorted(state)[:8]}")
    return out
