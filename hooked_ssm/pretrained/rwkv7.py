"""RWKV-7 ("x070"): BlinkDL ``.pth`` state dicts and the fla-hub Hugging Face layout
(``RWKV7ForCausalLM``, ``config.json`` with ``model_type: rwkv7``) -> HookedSSMConfig fields and
state dict. fla is never imported: its layout is mapped back to BlinkDL's names here
(the inverse of fla's ``utils/convert_from_rwkv7.py``) and converted from there.

BlinkDL's names and shapes are also accepted in safetensors, with no pickle involved: a bare
``.safetensors`` file (read like a ``.pth``), or a directory whose ``config.json`` declares
``"architectures": ["rwkv7_blinkdl"]`` beside ``model.safetensors`` (the bundled ``toy-rwkv7``).
Such a config.json adds token ids and the context length; the dims still come from the tensors
(any dims it states must agree). :func:`to_blink_state_dict` writes that layout.

Every dim is read from the tensor shapes (a ``.pth`` has no config): ``d_model`` and ``d_vocab``
from ``emb.weight``, ``n_heads`` and the head size from ``r_k``, the LoRA ranks from ``w1``,
``a1``, ``v1`` (layer 1) and ``g1``, the channel-mix width from ``ffn.key.weight``.

The erase key is normalised as BlinkDL does (``F.normalize``, eps 1e-12 on the norm). fla with
``fuse_norm=True`` uses ``x * rsqrt(sum(x^2) + 1e-6)`` instead; the two differ only for erase
keys of tiny norm.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from hooked_ssm.config import HookedSSMConfig
from hooked_ssm.pretrained.checkpoint import CheckpointError, read_safetensors, take
from hooked_ssm.pretrained.torch_files import read_weights

BLINK = "rwkv7_blinkdl"  # pseudo-architecture of a BlinkDL .pth

_TIME_MIX = ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g")
_LINEARS = {"receptance": "r_proj", "key": "k_proj", "value": "v_proj", "output": "o_proj"}
_FLA_LINEARS = {value: key for key, value in _LINEARS.items()}
_FLA_NORMS = {"pre_norm": "ln0", "attn_norm": "ln1", "ffn_norm": "ln2"}
_LORA_SLOT = {"0.weight": "1", "2.weight": "2", "2.bias": "0"}


def _n_layers(state: dict[str, Tensor]) -> int:
    layers = {int(m.group(1)) for key in state if (m := re.match(r"blocks\.(\d+)\.", key))}
    return max(layers) + 1 if layers else 0


def config_from_blink(state: dict[str, Tensor], defaults: dict[str, Any] | None = None) -> dict[str, Any]:
    """HookedSSMConfig fields of a BlinkDL RWKV-7 state dict, all read from tensor shapes."""
    if "emb.weight" not in state or not any(key.startswith("blocks.") for key in state):
        raise CheckpointError("Not an RWKV checkpoint: it has no 'emb.weight' / 'blocks.*' tensors.")
    if "blocks.0.att.r_k" not in state or "blocks.0.att.k_k" not in state:
        version = "RWKV-4/5/6" if any(".att.time_" in key for key in state) else "unknown"
        raise CheckpointError(
            f"Not an RWKV-7 (x070) checkpoint (no blocks.0.att.r_k / k_k; looks like {version}). "
            "HookedSSM supports RWKV-7 only."
        )
    if any(".ffn.s_emb" in key or ".ffn.s1" in key for key in state):
        raise CheckpointError("RWKV-7 DeepEmbed checkpoints (ffn.s_emb) are not supported.")
    n_layers = _n_layers(state)
    d_vocab, d_model = state["emb.weight"].shape
    n_heads, head_size = state["blocks.0.att.r_k"].shape
    lora = {
        "rwkv_decay_lora": state["blocks.0.att.w1"].shape[1],
        "rwkv_a_lora": state["blocks.0.att.a1"].shape[1],
        "rwkv_v_lora": state["blocks.1.att.v1"].shape[1] if n_layers > 1 else 0,
        "rwkv_gate_lora": state["blocks.0.att.g1"].shape[1],
    } if all(f"blocks.0.att.{n}1" in state for n in "wag") else None
    if lora is None or (n_layers > 1 and "blocks.1.att.v1" not in state):
        raise CheckpointError("RWKV-7 checkpoint lacks its LoRA tensors (blocks.*.att.w1/a1/g1, blocks.1.att.v1).")
    fields: dict[str, Any] = dict(
        d_model=d_model,
        n_layers=n_layers,
        d_vocab=d_vocab,
        layer_types=["rwkv7"] * n_layers,
        n_heads=n_heads,
        n_key_heads=n_heads,
        d_k=head_size,
        d_v=head_size,
        d_mlp=state["blocks.0.ffn.key.weight"].shape[0] if "blocks.0.ffn.key.weight" in state else 0,
        eps=1e-5,
        group_norm_eps=64e-5,  # BlinkDL: 1e-5 * head_size_divisor**2 with divisor 8
        norm_type="layernorm",
        norm_zero_centered=False,
        tie_word_embeddings=False,
        original_architecture=BLINK,
        n_ctx=4096,
        default_prepend_bos=False,
        eos_token_id=0,
        **lora,
    )
    fields.update({k: v for k, v in (defaults or {}).items() if k in ("n_ctx", "eos_token_id", "bos_token_id")})
    return fields


def config_from_blink_dir(raw: dict, state: dict[str, Tensor]) -> dict[str, Any]:
    """Fields of a BlinkDL-named state dict stored beside a ``config.json`` (``rwkv7_blinkdl``).

    A config that names a ``bos_token_id`` makes ``<|bos|>`` prepended by default, as models
    trained with a BOS before every document (the toy) expect; BlinkDL's releases have none.
    """
    fields = config_from_blink(state)
    declared = {
        "d_model": raw.get("hidden_size"), "n_layers": raw.get("num_hidden_layers"), "d_vocab": raw.get("vocab_size"),
        "d_k": raw.get("head_size"), "d_mlp": raw.get("intermediate_size"),
        "rwkv_decay_lora": raw.get("decay_low_rank_dim"), "rwkv_a_lora": raw.get("a_low_rank_dim"),
        "rwkv_v_lora": raw.get("v_low_rank_dim"), "rwkv_gate_lora": raw.get("gate_low_rank_dim"),
    }
    wrong = {key: (value, fields[key]) for key, value in declared.items() if value is not None and value != fields[key]}
    if wrong:
        raise CheckpointError(f"config.json does not match the weights (config vs tensors: {wrong}).")
    fields.update(
        bos_token_id=raw.get("bos_token_id"),
        eos_token_id=raw.get("eos_token_id"),
        pad_token_id=raw.get("pad_token_id"),
        default_prepend_bos=raw.get("bos_token_id") is not None,
        n_ctx=int(raw.get("max_position_embeddings") or fields["n_ctx"]),
    )
    return fields


def fla_to_blink(state: dict[str, Tensor], tie_word_embeddings: bool = False) -> dict[str, Tensor]:
    """Rename an fla-hub ``RWKV7ForCausalLM`` state dict to BlinkDL's names and shapes."""
    out: dict[str, Tensor] = {}
    for key, tensor in state.items():
        name = _fla_name_to_blink(key)
        if name is None:
            raise CheckpointError(f"Unexpected tensor {key!r} in an fla RWKV-7 checkpoint.")
        if re.search(r"\.att\.[wavg][12]$", name):
            tensor = tensor.t()
        out[name] = tensor
    if "head.weight" not in out and tie_word_embeddings and "emb.weight" in out:
        out["head.weight"] = out["emb.weight"]
    if "emb.weight" in out and "blocks.0.ln0.weight" not in out:
        # fla builds layer 0's pre_norm with default init when a converted checkpoint lacks it.
        d_model = out["emb.weight"].shape[1]
        out["blocks.0.ln0.weight"] = torch.ones(d_model, dtype=out["emb.weight"].dtype)
        out["blocks.0.ln0.bias"] = torch.zeros(d_model, dtype=out["emb.weight"].dtype)
    return out


def _fla_name_to_blink(key: str) -> str | None:
    top = {"model.embeddings.weight": "emb.weight", "model.norm.weight": "ln_out.weight",
           "model.norm.bias": "ln_out.bias", "lm_head.weight": "head.weight"}
    if key in top:
        return top[key]
    m = re.match(r"model\.layers\.(\d+)\.(\w+)\.(.+)$", key)
    if not m:
        return None
    layer, part, rest = m.groups()
    prefix = f"blocks.{layer}."
    if part in _FLA_NORMS:
        return f"{prefix}{_FLA_NORMS[part]}.{rest}"
    if part == "ffn":
        return f"{prefix}ffn.{rest}"
    if part != "attn":
        return None
    lora = re.match(r"([wavg])_lora\.lora\.(0\.weight|2\.weight|2\.bias)$", rest)
    if lora:
        return f"{prefix}att.{lora.group(1)}{_LORA_SLOT[lora.group(2)]}"
    proj = re.match(r"(\w+)_proj\.weight$", rest)
    if proj and f"{proj.group(1)}_proj" in _FLA_LINEARS:
        return f"{prefix}att.{_FLA_LINEARS[proj.group(1) + '_proj']}.weight"
    if rest.startswith("g_norm."):
        return f"{prefix}att.ln_x.{rest.removeprefix('g_norm.')}"
    if rest in (*_TIME_MIX, "k_k", "k_a", "r_k"):
        return f"{prefix}att.{rest}"
    return None


def config_from_fla(raw: dict, state: dict[str, Tensor]) -> dict[str, Any]:
    """Fields of an fla-hub RWKV-7 checkpoint (``state`` already renamed to BlinkDL's names)."""
    unsupported = {
        "attn (hybrid attention layers)": raw.get("attn") is not None,
        "norm_first=False": raw.get("norm_first", True) is not True,
        "norm_bias=False": raw.get("norm_bias", True) is not True,
        f"hidden_act={raw.get('hidden_act')!r}": raw.get("hidden_act", "sqrelu") != "sqrelu",
    }
    value_dim = raw.get("value_dim")
    hidden = raw.get("hidden_size")
    if value_dim is not None and any(v != hidden for v in (value_dim if isinstance(value_dim, list) else [value_dim])):
        unsupported[f"value_dim={value_dim}"] = True
    bad = [name for name, flag in unsupported.items() if flag]
    if bad:
        raise CheckpointError(f"This fla RWKV-7 checkpoint uses options HookedSSM does not support: {bad}.")
    fields = config_from_blink(state)
    if raw.get("num_hidden_layers", fields["n_layers"]) != fields["n_layers"] or hidden not in (None, fields["d_model"]):
        raise CheckpointError(
            f"config.json (hidden_size {hidden}, num_hidden_layers {raw.get('num_hidden_layers')}) does not match the "
            f"weights (d_model {fields['d_model']}, {fields['n_layers']} layers)."
        )
    norm_eps = float(raw.get("norm_eps", 1e-5))
    fields.update(
        eps=norm_eps,
        group_norm_eps=fields["d_k"] * norm_eps,  # fla: GroupNorm eps = head_dim * norm_eps
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        original_architecture="RWKV7ForCausalLM",
        n_ctx=int(raw.get("max_position_embeddings", 4096) or 4096),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_id=raw.get("eos_token_id"),
        pad_token_id=raw.get("pad_token_id"),
    )
    return fields


def read_checkpoint(
    source: Path, raw_config: dict, architecture: str, defaults: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """A checkpoint directory: BlinkDL names beside a config.json (toy-rwkv7), or fla-hub's layout."""
    if architecture == BLINK:
        state = read_safetensors(source)
        return config_from_blink_dir(raw_config, state), state
    state = fla_to_blink(read_weights(source), bool(raw_config.get("tie_word_embeddings", False)))
    return config_from_fla(raw_config, state), state


def convert_state_dict(state: dict[str, Tensor], cfg: HookedSSMConfig) -> dict[str, Tensor]:
    """Map a BlinkDL RWKV-7 state dict to HookedSSM's parameter names.

    Consumes every tensor and raises on leftovers (layer 0's unused ``v0/v1/v2`` are dropped).
    """
    state = dict(state)
    flat = lambda t: t.reshape(-1)  # noqa: E731  ((1, 1, C) -> (C,))
    out = {
        "embed.W_E": take(state, "emb.weight"),
        "ln_final.w": take(state, "ln_out.weight"),
        "ln_final.b": take(state, "ln_out.bias"),
    }
    head = state.pop("head.weight", None)
    if cfg.tie_word_embeddings:
        pass
    elif head is None:
        raise CheckpointError("Checkpoint has no head.weight (lm_head) but its embeddings are untied.")
    else:
        out["unembed.weight"] = head
    for name in ("weight", "bias"):
        out[f"blocks.0.ln0.{name[0]}"] = take(state, f"blocks.0.ln0.{name}")
    for layer in range(cfg.n_layers):
        src, dst = f"blocks.{layer}.", f"blocks.{layer}."
        for norm in ("ln1", "ln2"):
            for name in ("weight", "bias"):
                out[f"{dst}{norm}.{name[0]}"] = take(state, f"{src}{norm}.{name}")
        att, mixer = f"{src}att.", f"{dst}mixer."
        for name in (*_TIME_MIX, "w0", "a0", "k_k", "k_a"):
            out[f"{mixer}{name}"] = flat(take(state, f"{att}{name}"))
        for name in ("w1", "w2", "a1", "a2", "g1", "g2", "r_k"):
            out[f"{mixer}{name}"] = take(state, f"{att}{name}")
        if layer == 0:
            for name in ("v0", "v1", "v2"):
                state.pop(f"{att}{name}", None)  # present in BlinkDL files, never used
        else:
            out[f"{mixer}v0"] = flat(take(state, f"{att}v0"))
            out[f"{mixer}v1"] = take(state, f"{att}v1")
            out[f"{mixer}v2"] = take(state, f"{att}v2")
        for blink, ours in _LINEARS.items():
            out[f"{mixer}{ours}.weight"] = take(state, f"{att}{blink}.weight")
        out[f"{mixer}ln_x_w"] = take(state, f"{att}ln_x.weight")
        out[f"{mixer}ln_x_b"] = take(state, f"{att}ln_x.bias")
        ffn = f"{src}ffn."
        out[f"{dst}mlp.x_k"] = flat(take(state, f"{ffn}x_k"))
        out[f"{dst}mlp.key.weight"] = take(state, f"{ffn}key.weight")
        out[f"{dst}mlp.value.weight"] = take(state, f"{ffn}value.weight")
    if state:
        raise CheckpointError(f"Checkpoint has tensors the config does not account for: {sorted(state)[:8]}")
    return out


def to_blink_state_dict(state: dict[str, Tensor], cfg: HookedSSMConfig) -> dict[str, Tensor]:
    """The inverse of :func:`convert_state_dict`: HookedSSM parameters -> BlinkDL names and shapes
    (``(1, 1, C)`` mix vectors, ``(H, N)`` ``r_k``), as in a released ``.pth``. Layer 0 gets no
    ``v0/v1/v2`` (BlinkDL's files carry unused ones; ``rwkv`` and this loader do not need them)."""
    row = lambda t: t.reshape(1, 1, -1)  # noqa: E731
    out = {
        "emb.weight": state["embed.W_E"],
        "blocks.0.ln0.weight": state["blocks.0.ln0.w"],
        "blocks.0.ln0.bias": state["blocks.0.ln0.b"],
        "ln_out.weight": state["ln_final.w"],
        "ln_out.bias": state["ln_final.b"],
        "head.weight": state["embed.W_E"] if cfg.tie_word_embeddings else state["unembed.weight"],
    }
    for layer in range(cfg.n_layers):
        blk, mixer, att, ffn = f"blocks.{layer}.", f"blocks.{layer}.mixer.", f"blocks.{layer}.att.", f"blocks.{layer}.ffn."
        for norm in ("ln1", "ln2"):
            out[f"{blk}{norm}.weight"], out[f"{blk}{norm}.bias"] = state[f"{blk}{norm}.w"], state[f"{blk}{norm}.b"]
        vectors = (*_TIME_MIX, "w0", "a0", "k_k", "k_a") + (("v0",) if layer > 0 else ())
        for name in vectors:
            out[f"{att}{name}"] = row(state[f"{mixer}{name}"])
        matrices = ("w1", "w2", "a1", "a2", "g1", "g2", "r_k") + (("v1", "v2") if layer > 0 else ())
        for name in matrices:
            out[f"{att}{name}"] = state[f"{mixer}{name}"]
        for blink, ours in _LINEARS.items():
            out[f"{att}{blink}.weight"] = state[f"{mixer}{ours}.weight"]
        out[f"{att}ln_x.weight"], out[f"{att}ln_x.bias"] = state[f"{mixer}ln_x_w"], state[f"{mixer}ln_x_b"]
        out[f"{ffn}x_k"] = row(state[f"{blk}mlp.x_k"])
        out[f"{ffn}key.weight"] = state[f"{blk}mlp.key.weight"]
        out[f"{ffn}value.weight"] = state[f"{blk}mlp.value.weight"]
    return {name: tensor.detach().contiguous() for name, tensor in out.items()}
