"""Benchmark 1 and 3 for RWKV-7: HookedSSM vs BlinkDL's ``rwkv`` package (its reference).

Both load the same weights: HookedSSM's parameters written out in BlinkDL's ``.pth`` layout
(``to_blink_state_dict``), read back by ``rwkv.model.RWKV(strategy="cpu fp32")``. Shapes: the
bundled ``toy-rwkv7`` and the RWKV-7 0.1B release shape (d_model 768, 12 layers, heads of 64,
vocabulary 65536) with BlinkDL's initialisation plus a perturbation of every parameter.

- forward: all-position logits of one sequence (``rwkv``'s ``forward(tokens, None,
  full_output=True)``; it takes one sequence, so B = 1) vs ``HookedSSM(tokens)``;
- generation: greedy decoding, ``rwkv`` fed one token at a time with its state (how its own
  pipeline decodes) vs ``HookedSSM.generate(use_past_kv_cache=True)``; same prompt, same length.

Both HookedSSM execution paths are timed: ``chunked`` (the default) and ``recurrent``. The
``rwkv`` package is a CPU reference here (its CUDA path needs a compiled kernel), so the benchmark
runs on CPU only.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from typing import Any

import torch

from common import ROOT, Settings, compare, free, perturb_, set_execution, toy_dir

SHAPE_0_1B = dict(d_model=768, n_layers=12, d_vocab=65536, d_k=64, d_mlp=3072,
                  lora=dict(rwkv_decay_lora=64, rwkv_a_lora=64, rwkv_v_lora=32, rwkv_gate_lora=128))


def rwkv_package() -> Any:
    """``rwkv.model`` in its RWKV-7 CPU mode (set before the first import: it reads the environment then)."""
    os.environ["RWKV_V7_ON"] = "1"
    os.environ.setdefault("RWKV_JIT_ON", "0")
    os.environ["RWKV_CUDA_ON"] = "0"
    return importlib.import_module("rwkv.model")


def real_shape_model(n_layers: int) -> Any:
    """HookedSSM at the 0.1B release shape, BlinkDL-initialised (scripts/toy_rwkv7.py) and perturbed."""
    from hooked_ssm import HookedSSM
    from hooked_ssm.config import HookedSSMConfig
    from hooked_ssm.pretrained.rwkv7 import BLINK

    spec = importlib.util.spec_from_file_location("toy_rwkv7", ROOT / "scripts" / "toy_rwkv7.py")
    toy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(toy)
    s = SHAPE_0_1B
    heads = s["d_model"] // s["d_k"]
    cfg = HookedSSMConfig(
        d_model=s["d_model"], n_layers=n_layers, d_vocab=s["d_vocab"], layer_types=["rwkv7"] * n_layers,
        n_heads=heads, n_key_heads=heads, d_k=s["d_k"], d_v=s["d_k"], d_mlp=s["d_mlp"], **s["lora"],
        eps=1e-5, group_norm_eps=1e-5 * s["d_k"], norm_type="layernorm", norm_zero_centered=False,
        tie_word_embeddings=False, original_architecture=BLINK, model_name="rwkv7-0.1b-shape",
    )
    torch.manual_seed(0)
    model = HookedSSM(cfg)
    toy.init_blinkdl_(model)
    return perturb_(model, seed=0).eval()


def reference_for(model: Any, settings: Settings, name: str) -> Any:
    """``rwkv``'s model on the same weights, through a BlinkDL ``.pth`` in the work directory."""
    from hooked_ssm.pretrained.rwkv7 import to_blink_state_dict

    path = settings.workdir / f"{name}.pth"
    torch.save(to_blink_state_dict(model.state_dict(), model.cfg), path)
    return rwkv_package().RWKV(model=str(path.with_suffix("")), strategy="cpu fp32")  # path without .pth


def rwkv_greedy(reference: Any, prompt: list[int], new: int) -> list[int]:
    logits, state = reference.forward(prompt, None)
    out = list(prompt)
    for _ in range(new):
        out.append(int(logits.argmax()))
        logits, state = reference.forward([out[-1]], state)
    return out


def run(settings: Settings) -> None:
    if settings.cuda:
        settings.note("rwkv7: skipped on CUDA (the rwkv package is the CPU reference here).")
        return
    from hooked_ssm import HookedSSM

    cases = [("toy", 512, 32, 48), ("real", 128 if settings.quick else 512, 16, 16)]
    for shape, length, prompt_len, new in cases:
        n_layers = 4 if settings.quick else SHAPE_0_1B["n_layers"]
        if shape == "toy":
            model, label = HookedSSM.from_pretrained(toy_dir("toy-rwkv7"), dtype=torch.float32).eval(), "toy (toy-rwkv7)"
        else:
            model, label = real_shape_model(n_layers), f"RWKV-7 0.1B shape, {n_layers}/{SHAPE_0_1B['n_layers']} layers"
        reference = reference_for(model, settings, f"rwkv7_{shape}")
        gen = torch.Generator().manual_seed(13)
        tokens = torch.randint(1, model.cfg.d_vocab, (1, length), generator=gen)
        with torch.no_grad():
            ref_fn = lambda: reference.forward(tokens[0].tolist(), None, full_output=True)[0]  # noqa: E731
            hooked_fn = lambda: model(tokens)[0]  # noqa: E731
            for execution in ("chunked", "recurrent"):
                set_execution(model, execution)
                compare(settings, bench="1 forward", case=f"rwkv7 {label}, B=1 T={length}, {execution}",
                        reference=("rwkv package (cpu fp32)", ref_fn), candidate=(f"HookedSSM {execution}", hooked_fn),
                        tokens=length,
                        target=">= 1.0 (HookedSSM at least as fast)" if execution == "chunked" else None,
                        target_check=lambda r: r >= 1.0,
                        extra=dict(family="rwkv7", shape=shape, batch=1, length=length, execution=execution,
                                   max_abs_logit_diff=(ref_fn() - hooked_fn()).abs().max().item()))
            set_execution(model, "chunked")

            prompt = tokens[:, :prompt_len]
            ref_gen = lambda: rwkv_greedy(reference, prompt[0].tolist(), new)  # noqa: E731
            hooked_gen = lambda: model.generate(prompt, max_new_tokens=new, do_sample=False,  # noqa: E731
                                                use_past_kv_cache=True, stop_at_eos=False, verbose=False)
            same = ref_gen() == hooked_gen()[0].tolist()
            compare(settings, bench="3 generate", case=f"rwkv7 {label}, B=1, prompt {prompt_len}, +{new} tokens",
                    reference=("rwkv package, token by token with its state", ref_gen),
                    candidate=("HookedSSM generate", hooked_gen), tokens=new, max_rounds=7,
                    extra=dict(family="rwkv7", shape=shape, prompt=prompt_len, new_tokens=new, identical_tokens=same))
        free(model, reference)
