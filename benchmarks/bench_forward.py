"""Benchmark 1: forward-pass tokens/s, HookedSSM vs the transformers reference, no hooks.

Same weights (the reference's checkpoint directory is what ``HookedSSM.from_pretrained`` loads),
same tokens, float32, all-position logits on both sides (``use_cache=False`` for the reference).
Both execution paths of HookedSSM are timed against the same reference: ``chunked`` (the default)
and ``recurrent`` (token by token).
"""

from __future__ import annotations

import torch

from common import Settings, build_reference, compare, free, load_hooked, set_execution

TARGET = ">= 1.0 (HookedSSM at least as fast)"


def grids(settings: Settings) -> dict[str, list[tuple[int, int]]]:
    if settings.cuda:
        return {"toy": [(1, 512), (8, 512), (32, 1024)], "real": [(1, 512), (8, 512), (1, 2048)]}
    if settings.quick:
        return {"toy": [(1, 512), (4, 256)], "real": [(1, 512)]}
    return {"toy": [(1, 128), (1, 512), (4, 256), (1, 2048), (16, 512)], "real": [(1, 512), (4, 256), (1, 2048)]}


def real_layers(settings: Settings, family: str) -> int | None:
    """Full depth on GPU; on CPU --quick, one [lin, lin, lin, full] group (Qwen3.5) / 4 layers (Mamba-2)."""
    return 4 if (settings.quick and not settings.cuda) else None


def mamba2_supported() -> tuple[bool, str]:
    try:
        from hooked_ssm.pretrained import supported_architectures

        if "Mamba2ForCausalLM" not in supported_architectures():
            return False, "HookedSSM.from_pretrained does not list Mamba2ForCausalLM"
    except Exception as err:  # noqa: BLE001
        return False, f"could not check Mamba-2 support: {err!r}"
    return True, ""


def run(settings: Settings) -> None:
    families = ["qwen3_5"]
    ok, why = mamba2_supported()
    if ok:
        families.append("mamba2")
    else:
        settings.note(f"forward: Mamba-2 skipped ({why}).")
    for family in families:
        for shape, grid in grids(settings).items():
            n_layers = real_layers(settings, family) if shape == "real" else None
            try:
                ref, path, label = build_reference(family, shape, n_layers, settings)
                hooked = load_hooked(path, settings)
            except Exception as err:  # noqa: BLE001 - report, keep going
                settings.note(f"forward: {family} {shape} could not be built: {err!r}")
                continue
            vocab = ref.config.vocab_size
            for batch, length in grid:
                gen = torch.Generator().manual_seed(batch * 10_000 + length)
                tokens = torch.randint(3, vocab, (batch, length), generator=gen).to(settings.device)
                with torch.no_grad():
                    ref_fn = lambda: ref(tokens, use_cache=False).logits  # noqa: E731
                    hooked_fn = lambda: hooked(tokens)  # noqa: E731
                    # Check once that both compute the same thing.
                    err = (ref_fn() - hooked_fn()).abs().max().item()
                    for execution in ("chunked", "recurrent"):
                        if settings.cuda and execution == "recurrent" and length > 512:
                            continue  # a Python loop over tokens: seconds per call on GPU
                        set_execution(hooked, execution)
                        compare(
                            settings,
                            bench="1 forward",
                            case=f"{family} {label}, B={batch} T={length}, {execution}",
                            reference=("transformers", ref_fn),
                            candidate=(f"HookedSSM {execution}", hooked_fn),
                            tokens=batch * length,
                            target=TARGET if (execution == "chunked" and not settings.cuda) else None,
                            target_check=lambda r: r >= 1.0,
                            extra=dict(family=family, shape=shape, batch=batch, length=length,
                                       execution=execution, max_abs_logit_diff=err),
                        )
                    set_execution(hooked, "chunked")
                    if shape == "real":
                        # The 248k-row LM head dominates the real Qwen3.5 shape at these lengths; the
                        # same comparison without it shows the layers themselves.
                        compare(
                            settings,
                            bench="1 forward",
                            case=f"{family} {label}, B={batch} T={length}, chunked, no LM head",
                            reference=("transformers (logits_to_keep=1)",
                                       lambda: ref(tokens, use_cache=False, logits_to_keep=1).logits),
                            candidate=("HookedSSM chunked (return_type=None)", lambda: hooked(tokens, return_type=None)),
                            tokens=batch * length,
                            target=TARGET if not settings.cuda else None,
                            target_check=lambda r: r >= 1.0,
                            extra=dict(family=family, shape=shape, batch=batch, length=length, execution="chunked",
                                       lm_head=False),
                        )
            free(ref, hooked)
