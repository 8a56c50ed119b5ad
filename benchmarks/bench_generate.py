"""Benchmark 3: greedy generation tokens/s with the recurrent cache.

HookedSSM ``generate(..., do_sample=False, use_past_kv_cache=True, stop_at_eos=False)`` vs the
reference's own cached ``generate`` (transformers: ``do_sample=False``, ``min_new_tokens`` =
``max_new_tokens`` to force the length, its default cache). Same prompt, same number of new
tokens; new tokens/s counts ``batch * max_new_tokens`` and the time includes the prompt's prefill.
Both execution paths of HookedSSM are timed (decoding steps are one token each).
"""

from __future__ import annotations

import torch

from bench_forward import mamba2_supported
from common import Settings, build_reference, compare, free, load_hooked, set_execution


def cases(settings: Settings) -> list[tuple[str, str, int, int, int]]:
    """(family, shape, batch, prompt length, new tokens)."""
    if settings.cuda:
        return [("qwen3_5", "toy", 1, 32, 64), ("qwen3_5", "toy", 8, 32, 64), ("qwen3_5", "real", 1, 32, 32),
                ("mamba2", "toy", 1, 32, 64)]
    if settings.quick:
        return [("qwen3_5", "toy", 1, 32, 48), ("qwen3_5", "real", 1, 16, 16), ("mamba2", "toy", 1, 32, 48)]
    return [("qwen3_5", "toy", 1, 32, 128), ("qwen3_5", "toy", 8, 32, 64), ("qwen3_5", "real", 1, 32, 32),
            ("mamba2", "toy", 1, 32, 128)]


def run(settings: Settings) -> None:
    ok, why = mamba2_supported()
    if not ok:
        settings.note(f"generate: Mamba-2 skipped ({why}).")
    for family, shape, batch, prompt_len, new in cases(settings):
        if family == "mamba2" and not ok:
            continue
        n_layers = 4 if (shape == "real" and settings.quick and not settings.cuda) else None
        ref, path, label = build_reference(family, shape, n_layers, settings)
        model = load_hooked(path, settings)
        gen = torch.Generator().manual_seed(11)
        prompt = torch.randint(3, ref.config.vocab_size, (batch, prompt_len), generator=gen).to(settings.device)
        pad = ref.config.pad_token_id if ref.config.pad_token_id is not None else 0

        def ref_generate():
            return ref.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new,
                                min_new_tokens=new, do_sample=False, pad_token_id=pad)

        def hooked_generate():
            return model.generate(prompt, max_new_tokens=new, do_sample=False, use_past_kv_cache=True,
                                  stop_at_eos=False, verbose=False)

        ref_generate.__name__ = "transformers generate"
        with torch.no_grad():
            for execution in ("chunked", "recurrent"):
                set_execution(model, execution)
                a, b = ref_generate(), hooked_generate()
                same = a.shape == b.shape and bool((a == b).all())
                agree = float((a[:, prompt_len:] == b[:, prompt_len:]).float().mean()) if a.shape == b.shape else 0.0
                compare(settings, bench="3 generate", case=f"{family} {label}, B={batch}, prompt {prompt_len}, +{new} tokens, {execution}",
                        reference=("transformers generate (cached)", ref_generate),
                        candidate=(f"HookedSSM generate ({execution})", hooked_generate),
                        tokens=batch * new, max_rounds=7,
                        extra=dict(family=family, shape=shape, batch=batch, prompt=prompt_len, new_tokens=new,
                                   execution=execution, identical_tokens=same, token_agreement=agree))
        free(ref, model)
