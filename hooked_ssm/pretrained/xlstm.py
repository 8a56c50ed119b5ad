"""xLSTM (``xLSTMForCausalLM``, ``NX-AI/xLSTM-7b``): blocks of an mLSTM layer and a SwiGLU feed-forward,
each pre-normed -> HookedSSMConfig fields and state dict.

Every block is an ``mlstm`` layer (``MLSTMMixer``). Head dims come from the weights (transformers'
layers use ``int(hidden_size * qk_dim_factor)``, its cache the multiple of 64 above it). Both
``weight_mode`` layouts load: ``"fused"`` tensors (``qkv_opreact``, ``ifgate_preact``,
``proj_up_gate_z``) are split into the ``"single"`` ones. transformers applies ``out_norm`` whatever
``add_out_norm`` says, and so do we. Checkpoints with biases (``use_bias``) are refused: every norm
would need one, and no released model has them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor
from transformers import PretrainedConfig, xLSTMConfig

from hooked_ssm.config import HookedSSMConfig
from hooked_ssm.pretrained.checkpoint import CheckpointError, ensure_consumed, take, take_embeddings
from hooked_ssm.pretrained.torch_files import read_weights


# Which GPU kernels transformers' optional ``xlstm`` package should run. Without that package
# ``xLSTMConfig`` accepts only its native kernel names and refuses a config that names Triton ones
# (``chunkwise--triton_xl_chunk``, as xLSTM-7b's release does); the recurrence is the same, so they
# are not read.
_KERNEL_FIELDS = ("chunkwise_kernel", "sequence_kernel", "step_kernel")


def read_checkpoint(
    source: Path, raw_config: dict, architecture: str, defaults: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    state = read_weights(source)
    hf = xLSTMConfig.from_dict({key: value for key, value in raw_config.items() if key not in _KERNEL_FIELDS})
    return config_from_hf(hf, state), state


def config_from_hf(hf: PretrainedConfig, state: dict[str, Tensor]) -> dict[str, Any]:
    if hf.use_bias:
        raise CheckpointError("xLSTM with use_bias=True is not supported (no released checkpoint has biases).")
    heads = hf.num_heads
    first = "backbone.blocks.0."
    if hf.weight_mode == "single":
        qk_dim, v_dim = state[f"{first}mlstm_layer.q.weight"].shape[0], state[f"{first}mlstm_layer.v.weight"].shape[0]
        d_mlp = state[f"{first}ffn.proj_up.weight"].shape[0]
    else:
        qk_dim, v_dim = int(hf.hidden_size * hf.qk_dim_factor), int(hf.hidden_size * hf.v_dim_factor)
        d_mlp = state[f"{first}ffn.proj_up_gate_z.weight"].shape[0] // 2
    if qk_dim % heads or v_dim % heads:
        raise CheckpointError(f"xLSTM: q/k width {qk_dim} and v width {v_dim} must be multiples of num_heads ({heads}).")
    return dict(
        d_model=hf.hidden_size,
        n_layers=hf.num_hidden_layers,
        d_vocab=hf.vocab_size,
        layer_types=["mlstm"] * hf.num_hidden_layers,
        n_heads=heads,
        n_key_heads=heads,
        d_k=qk_dim // heads,
        d_v=v_dim // heads,
        chunk_size=hf.chunk_size,
        mlstm_gate_soft_cap=float(hf.gate_soft_cap or -1.0),
        mlstm_eps=hf.eps,
        d_mlp=d_mlp,
        act_fn="silu",
        eps=hf.norm_eps,
        norm_zero_centered=False,
        tie_word_embeddings=bool(hf.tie_word_embeddings),
        output_logits_soft_cap=float(hf.output_logit_soft_cap or -1.0),
        original_architecture="xLSTMForCausalLM",
        bos_token_id=hf.bos_token_id,
        eos_token_id=hf.eos_token_id,
        pad_token_id=hf.pad_token_id,
    )


def _mlstm(state: dict[str, Tensor], src: str, cfg: HookedSSMConfig) -> dict[str, Tensor]:
    qk, v = cfg.n_heads * cfg.d_k, cfg.n_heads * cfg.d_v
    if f"{src}qkv_opreact.weight" in state:  # weight_mode="fused"
        q, k, value, ogate = take(state, f"{src}qkv_opreact.weight").split([qk, qk, v, v])
        igate, fgate = take(state, f"{src}ifgate_preact.weight").split(cfg.n_heads)
        ibias, fbias = take(state, f"{src}ifgate_preact.bias").split(cfg.n_heads)
    else:
        q, k, value, ogate = (take(state, f"{src}{name}.weight") for name in ("q", "k", "v", "ogate_preact"))
        igate, ibias = take(state, f"{src}igate_preact.weight"), take(state, f"{src}igate_preact.bias")
        fgate, fbias = take(state, f"{src}fgate_preact.weight"), take(state, f"{src}fgate_preact.bias")
    return {
        "q_proj.weight": q, "k_proj.weight": k, "v_proj.weight": value, "output_gate.weight": ogate,
        "input_gate.weight": igate, "input_gate.bias": ibias, "forget_gate.weight": fgate, "forget_gate.bias": fbias,
        "norm_w": take(state, f"{src}multihead_norm.weight"), "out_proj.weight": take(state, f"{src}out_proj.weight"),
    }


def _ffn(state: dict[str, Tensor], src: str) -> dict[str, Tensor]:
    if f"{src}proj_up_gate_z.weight" in state:  # weight_mode="fused": [gate | up]
        gate, up = take(state, f"{src}proj_up_gate_z.weight").chunk(2)
    else:
        gate, up = take(state, f"{src}proj_up_gate.weight"), take(state, f"{src}proj_up.weight")
    return {"gate_proj.weight": gate, "up_proj.weight": up, "down_proj.weight": take(state, f"{src}proj_down.weight")}


def convert_state_dict(state: dict[str, Tensor], cfg: HookedSSMConfig) -> dict[str, Tensor]:
    """Map an ``xLSTMForCausalLM`` state dict to HookedSSM's names, consuming every tensor."""
    state = dict(state)
    out = take_embeddings(state, cfg.tie_word_embeddings, "backbone.embeddings.weight", "backbone.out_norm.weight")
    for layer in range(cfg.n_layers):
        src, dst = f"backbone.blocks.{layer}.", f"blocks.{layer}."
        out[f"{dst}ln1.w"] = take(state, f"{src}norm_mlstm.weight")
        out[f"{dst}ln2.w"] = take(state, f"{src}norm_ffn.weight")
        out.update({f"{dst}mixer.{k}": v for k, v in _mlstm(state, f"{src}mlstm_layer.", cfg).items()})
        out.update({f"{dst}mlp.{k}": v for k, v in _ffn(state, f"{src}ffn.").items()})
    ensure_consumed(state)
    return out
