"""``toy-rwkv7`` for ``scripts/train_toy_models.py``: build, initialise and save a tiny RWKV-7.

transformers has no RWKV-7 class, so this model is HookedSSM's own pure-torch RWKV-7 (the module
that every bundled RWKV-7 checkpoint loads into), trained directly. Its recurrence is
differentiable as is; for speed the training forward runs the chunked form of
``hooked_ssm.ops.rwkv7_chunked`` (tested equal to the recurrence, values and gradients), and the
reported losses are computed with the recurrent form, which is what loading the model runs.

It is saved in BlinkDL's layout (the names and shapes of a released ``.pth``), as safetensors
beside a ``config.json`` that declares ``rwkv7_blinkdl``, so that the same tensors load into
HookedSSM and, written out as a ``.pth``, into BlinkDL's ``rwkv`` package.

Imported by the training script only when ``toy-rwkv7`` is asked for (it needs ``hooked_ssm``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file

from hooked_ssm import HookedSSM
from hooked_ssm.config import HookedSSMConfig
from hooked_ssm.ops.rwkv7_chunked import DEFAULT_CHUNK_SIZE
from hooked_ssm.pretrained.rwkv7 import BLINK, to_blink_state_dict

D_MODEL, N_LAYERS, HEAD_SIZE = 128, 2, 64  # small enough to learn the memory tasks in a CPU-sized run
D_MLP = 4 * D_MODEL  # BlinkDL's channel-mix width
MODEL_CLASS = "HookedSSM"


def lora_rank(factor: float, d_model: int = D_MODEL) -> int:
    """BlinkDL's LoRA width rule ``max(32, round(factor * sqrt(C) / 32) * 32)``."""
    return max(32, round(factor * math.sqrt(d_model) / 32) * 32)


LORA = {"decay": lora_rank(2.5), "a": lora_rank(2.5), "v": lora_rank(1.7), "gate": lora_rank(5.0)}


def make_config(vocab_size: int, device: str = "cpu") -> HookedSSMConfig:
    """The same fields ``hooked_ssm.pretrained.rwkv7.config_from_blink`` reads back from the tensors."""
    heads = D_MODEL // HEAD_SIZE
    return HookedSSMConfig(
        d_model=D_MODEL, n_layers=N_LAYERS, d_vocab=vocab_size, layer_types=["rwkv7"] * N_LAYERS,
        n_heads=heads, n_key_heads=heads, d_k=HEAD_SIZE, d_v=HEAD_SIZE, d_mlp=D_MLP,
        rwkv_decay_lora=LORA["decay"], rwkv_a_lora=LORA["a"], rwkv_v_lora=LORA["v"], rwkv_gate_lora=LORA["gate"],
        eps=1e-5, group_norm_eps=1e-5 * HEAD_SIZE, norm_type="layernorm", norm_zero_centered=False,
        tie_word_embeddings=False, original_architecture=BLINK, model_name="toy-rwkv7", device=device,
    )


def build_model(seed: int, vocab_size: int, device: str = "cpu") -> HookedSSM:
    torch.manual_seed(seed)
    model = HookedSSM(make_config(vocab_size, device))
    init_blinkdl_(model)  # trains through the chunked form (execution="chunked", the default)
    return model


def use_exact_recurrence_(model: HookedSSM) -> HookedSSM:
    """Switch the mixers to the per-token recurrence (the reported losses are computed with it)."""
    for block in model.blocks:
        block.mixer.execution = "recurrent"
    return model


def _orthogonal_(weight: torch.Tensor, scale: float) -> None:
    """Orthogonal init with BlinkDL's gain: ``scale * sqrt(rows / cols)`` when rows > cols."""
    rows, cols = weight.shape
    nn.init.orthogonal_(weight, gain=scale * (math.sqrt(rows / cols) if rows > cols else 1.0))


@torch.no_grad()
def init_blinkdl_(model: HookedSSM) -> None:
    """BlinkDL's RWKV-7 initialisation (his training code's conventions), in HookedSSM's names.

    Why these values: token-shift mixes fade from "mostly the previous token" in the first layer
    to "mostly the current token" in the last; the decay bias ``w0`` spreads the per-channel
    decay ``exp(-e^-0.5 sigmoid(w0))`` from ~0.9998 (first head) down to ~0.56 (last head), with
    a zigzag inside each head, so that every head has channels that keep >= 0.98 per token and
    none starts out forgetting everything; the output projections and the channel-mix value
    start at zero, so at step 0 every block is the identity and the model is a bigram model;
    the embedding starts tiny (``ln0`` normalises it) and the head orthogonal.
    """
    cfg = model.cfg
    C, N, L = cfg.d_model, cfg.d_k, cfg.n_layers
    model.embed.W_E.uniform_(-1e-4, 1e-4)
    vocab = cfg.d_vocab
    _orthogonal_(model.unembed.weight, 0.5 * (math.sqrt(vocab / C) if vocab > C else 1.0))
    n = torch.arange(C, dtype=torch.float32)
    ddd = n / C
    linear = n / (C - 1) - 0.5  # -0.5 .. 0.5 across channels
    zigzag = ((n % N) - (N - 1) / 2) / ((N - 1) / 2)  # -1 .. 1 within each head
    zigzag = zigzag * zigzag.abs()
    for layer, block in enumerate(model.blocks):
        ratio_0_to_1 = layer / (L - 1)
        ratio_1_to_almost0 = 1.0 - layer / L
        mixer = block.mixer
        for name, power in (("x_r", 0.2), ("x_w", 0.9), ("x_k", 0.7), ("x_v", 0.7), ("x_a", 0.9), ("x_g", 0.2)):
            getattr(mixer, name).copy_(1.0 - ddd.pow(power * ratio_1_to_almost0))
        decay_speed = -6 + 6 * (n / (C - 1)).pow(1 + ratio_0_to_1**0.3)
        mixer.w0.copy_(decay_speed + 0.5 + zigzag * 2.5)
        mixer.a0.copy_(-0.19 + zigzag * 0.3 + linear * 0.4)
        if layer > 0:
            mixer.v0.copy_(0.73 - linear * 0.4)
        for first, second in (("w1", "w2"), ("a1", "a2"), ("v1", "v2"), ("g1", "g2")):
            if hasattr(mixer, first):  # LoRAs: down-projection zero, up-projection orthogonal x 0.1
                getattr(mixer, first).zero_()
                _orthogonal_(getattr(mixer, second), 0.1)
        mixer.k_k.copy_(0.71 - linear * 0.1)
        mixer.k_a.fill_(1.02)
        mixer.r_k.fill_(-0.04)
        bound = C**-0.5
        mixer.r_proj.weight.uniform_(-0.5 * bound, 0.5 * bound)
        mixer.k_proj.weight.uniform_(-0.05 * bound, 0.05 * bound)
        mixer.v_proj.weight.uniform_(-0.5 * bound, 0.5 * bound)
        mixer.o_proj.weight.zero_()
        mixer.ln_x_w.fill_(1.0)
        mixer.ln_x_b.zero_()
        block.mlp.x_k.copy_(1.0 - ddd.pow(ratio_1_to_almost0**4))
        block.mlp.key.weight.uniform_(-0.5 * bound, 0.5 * bound)
        block.mlp.value.weight.zero_()


def config_json(vocab_size: int, bos: int, eos: int, pad: int, dtype: torch.dtype) -> dict:
    """``config.json`` of the saved model: declares the layout; the dims are checked against the tensors."""
    return {
        "architectures": [BLINK],
        "model_type": BLINK,
        "format": "BlinkDL RWKV-7 (x070) state dict: tensor names and shapes as in a released .pth, in safetensors",
        "vocab_size": vocab_size,
        "hidden_size": D_MODEL,
        "num_hidden_layers": N_LAYERS,
        "head_size": HEAD_SIZE,
        "intermediate_size": D_MLP,
        "decay_low_rank_dim": LORA["decay"],
        "a_low_rank_dim": LORA["a"],
        "v_low_rank_dim": LORA["v"],
        "gate_low_rank_dim": LORA["gate"],
        "norm_eps": 1e-5,
        "group_norm_eps": 1e-5 * HEAD_SIZE,
        "tie_word_embeddings": False,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": pad,
        "max_position_embeddings": 4096,
        "dtype": str(dtype).removeprefix("torch."),
    }


def save_blinkdl(model: HookedSSM, out: Path, dtype: torch.dtype, bos: int, eos: int, pad: int) -> None:
    """``out/config.json`` + ``out/model.safetensors`` (BlinkDL names, ``dtype``)."""
    out.mkdir(parents=True, exist_ok=True)
    state = to_blink_state_dict(model.state_dict(), model.cfg)
    weights = out / "model.safetensors"
    save_file({k: v.to("cpu", dtype).contiguous() for k, v in state.items()}, str(weights), metadata={"format": "pt"})
    weights.chmod(0o644)  # safetensors creates it owner-only; it is package data
    cfg = config_json(model.cfg.d_vocab, bos, eos, pad, dtype)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")


DESCRIPTION = (
    f"RWKV-7 (\"x070\", Goose) in BlinkDL's layout: {N_LAYERS} layers, d_model {D_MODEL}, "
    f"{D_MODEL // HEAD_SIZE} heads of size {HEAD_SIZE}, LoRA ranks decay {LORA['decay']} / a {LORA['a']} / "
    f"value-residual {LORA['v']} / gate {LORA['gate']}, channel mix {D_MLP}, untied embedding and head."
)

CARD_NOTES = [
    "## How it was trained",
    "",
    "transformers has no RWKV-7 class, so the model was trained as a `HookedSSM` (the pure-torch",
    "RWKV-7 that BlinkDL and fla-hub checkpoints load into). The training forward runs the chunked",
    f"form in `hooked_ssm/ops/rwkv7_chunked.py` (chunks of {DEFAULT_CHUNK_SIZE} tokens; tested equal to the",
    "per-token recurrence in values and gradients), which differentiates several times faster on CPU;",
    "the losses above are computed with the per-token recurrent form (the reference form).",
    "",
    "Initialisation follows BlinkDL's RWKV-7 conventions (`init_blinkdl_` in `scripts/toy_rwkv7.py`):",
    "per-channel decay biases spread across and within heads (per-token decay ~0.56 to ~0.9998; every",
    "head has channels keeping >= 0.98), zero output projections and channel-mix values, zero LoRA",
    "down-projections with orthogonal x0.1 up-projections, a tiny embedding and an orthogonal head.",
    "",
    "## Format",
    "",
    "`model.safetensors` holds BlinkDL's tensor names and shapes (those of a released `.pth`) and",
    "`config.json` declares `rwkv7_blinkdl`; `HookedSSM.from_pretrained(\"toy-rwkv7\")` reads every",
    "dim from the tensors. To run it in BlinkDL's `rwkv` package, write the tensors to a `.pth`:",
    "",
    "```python",
    "import torch; from safetensors.torch import load_file",
    "torch.save({k: v.float() for k, v in load_file(\"model.safetensors\").items()}, \"toy-rwkv7.pth\")",
    "```",
    "",
    "Its logits match HookedSSM's (see `tests/integration/test_toy_rwkv7.py`). The model was trained",
    "with `<|bos|>` before every document; HookedSSM prepends it by default (the config names it).",
    "",
]
