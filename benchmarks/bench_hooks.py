"""Benchmark 2: the cost of hooks.

- every hook point with a no-op hook vs none (and the same without the three matrix hooks
  ``hook_write`` / ``hook_state`` / ``hook_delta_v``, whose mere presence changes the scan);
- ``hook_write`` on every Gated DeltaNet layer, caching one head's slice vs all heads, against
  HookedSSM without hooks and against the transformers reference (the 1.5x target); the same for
  ``hook_write_factors`` (the write's ``[k | v]`` factors, d_k + d_v numbers instead of d_k*d_v);
- ``hook_state`` likewise (the whole trajectory, every position);
- ``run_with_cache`` on one layer's ``hook_state`` with and without ``pos_slice=-1``: time, bytes of
  the cached tensors, and peak memory (CPU: peak RSS growth; GPU: ``torch.cuda.max_memory_allocated``);
- ``hook_state`` edits (replacements: position t reads the returned state) against caching
  ``hook_state`` at the same positions: one head changed at every position (what an SAE splice
  does: one batched read, no re-scan) and at two selected positions (the scan split there). Target:
  within 2x.
"""

from __future__ import annotations

from typing import Any

import torch

from common import Settings, build_reference, compare, free, load_hooked, measure_peak, mib, tensor_bytes

MATRIX_HOOKS = ("hook_write", "hook_state", "hook_delta_v")
TARGET_WRITE = ">= 0.667 (within 1.5x of transformers)"


def noop(act: torch.Tensor, hook: Any) -> None:
    return None


def capture_hooks(model: Any, leaf: str, head: int | None, store: list) -> list[tuple[str, Any]]:
    """A capturing hook on ``blocks.{l}.mixer.{leaf}`` of every recurrent layer: one head's slice or all."""

    def hook(act: torch.Tensor, hook: Any) -> None:
        store.append((act[:, :, head] if head is not None else act).detach().clone())

    names = [f"blocks.{l}.mixer.{leaf}" for l in range(model.cfg.n_layers)]
    return [(name, hook) for name in names if name in model.hook_dict]


def with_hooks(model: Any, tokens: torch.Tensor, hooks: list, store: list | None = None):
    def fn():
        if store is not None:
            store.clear()
        with model.hooks(fwd_hooks=hooks):
            return model(tokens)

    return fn


def cases(settings: Settings) -> list[tuple[str, int, int]]:
    if settings.cuda:
        return [("toy", 8, 512), ("real", 1, 512)]
    if settings.quick:
        return [("toy", 1, 512), ("real", 1, 256)]
    return [("toy", 1, 512), ("toy", 4, 512), ("real", 1, 512)]


def allocator_probe(settings: Settings) -> None:
    """CPU: the hook_write target row again, in fresh processes, with glibc's default allocator
    settings and with freed memory kept for reuse (see alloc_probe.py)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from common import ROOT

    one_gib = str(1 << 30)
    for label, extra_env in (("fresh process, glibc defaults", {}),
                             ("fresh process, MALLOC_MMAP_THRESHOLD_=MALLOC_TRIM_THRESHOLD_=1GiB",
                              {"MALLOC_MMAP_THRESHOLD_": one_gib, "MALLOC_TRIM_THRESHOLD_": one_gib})):
        env = dict(os.environ, **extra_env, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        proc = subprocess.run([sys.executable, str(Path(__file__).with_name("alloc_probe.py")), str(settings.budget_s)],
                              capture_output=True, text=True, env=env, timeout=1800)
        if proc.returncode:
            settings.note(f"hooks: allocator probe failed: {proc.stderr[-500:]}")
            continue
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        row.update(case=f"qwen3_5 toy (toy-gdn), B=1 T=512: hook_write one head, 3 layers, vs transformers ({label})",
                   target=TARGET_WRITE, met=row["speedup"] >= 1 / 1.5, allocator_env=extra_env)
        settings.add(**row)


def run(settings: Settings) -> None:
    if not settings.cuda:
        allocator_probe(settings)
    for shape, batch, length in cases(settings):
        n_layers = 4 if (shape == "real" and settings.quick and not settings.cuda) else None
        ref, path, label = build_reference("qwen3_5", shape, n_layers, settings)
        model = load_hooked(path, settings)
        gen = torch.Generator().manual_seed(7)
        tokens = torch.randint(3, ref.config.vocab_size, (batch, length), generator=gen).to(settings.device)
        case = f"qwen3_5 {label}, B={batch} T={length}"
        head = 0
        all_names = list(model.hook_dict)
        cheap = [n for n in all_names if not n.endswith(MATRIX_HOOKS)]
        store: list = []
        with torch.no_grad():
            plain = lambda: model(tokens)  # noqa: E731
            reference = lambda: ref(tokens, use_cache=False).logits  # noqa: E731
            compare(settings, bench="2 hooks", case=f"{case}: {len(cheap)} no-op hooks (no matrix hooks)",
                    reference=("HookedSSM, no hooks", plain),
                    candidate=("no-op hooks", with_hooks(model, tokens, [(n, noop) for n in cheap])),
                    tokens=batch * length, extra=dict(n_hooks=len(cheap)))
            compare(settings, bench="2 hooks", case=f"{case}: all {len(all_names)} hook points no-op",
                    reference=("HookedSSM, no hooks", plain),
                    candidate=("all no-op hooks", with_hooks(model, tokens, [(n, noop) for n in all_names])),
                    tokens=batch * length, extra=dict(n_hooks=len(all_names)),
                    max_rounds=5)
            # hook_write_factors: the write's [k | v] factors, what factored SAE training caches.
            for leaf in ("hook_write", "hook_write_factors", "hook_state"):
                one = capture_hooks(model, leaf, head, store)
                every = capture_hooks(model, leaf, None, store)
                n = len(one)
                if leaf.startswith("hook_write"):
                    compare(settings, bench="2 hooks", case=f"{case}: {leaf} one head, {n} layers, vs transformers",
                            reference=("transformers, no hooks", reference),
                            candidate=(f"HookedSSM + {leaf}[:, :, {head}] cached", with_hooks(model, tokens, one, store)),
                            tokens=batch * length,
                            target=TARGET_WRITE if not settings.cuda else None,
                            target_check=lambda r: r >= 1 / 1.5)
                compare(settings, bench="2 hooks", case=f"{case}: {leaf} one head cached, {n} layers",
                        reference=("HookedSSM, no hooks", plain),
                        candidate=(f"{leaf} one head", with_hooks(model, tokens, one, store)),
                        tokens=batch * length, extra=dict(cached_bytes=_cached(model, tokens, one, store)),
                        max_rounds=7)
                compare(settings, bench="2 hooks", case=f"{case}: {leaf} one head vs all heads cached, {n} layers",
                        reference=(f"{leaf} all heads", with_hooks(model, tokens, every, store)),
                        candidate=(f"{leaf} one head", with_hooks(model, tokens, one, store)),
                        tokens=batch * length, extra=dict(cached_bytes_all=_cached(model, tokens, every, store)),
                        max_rounds=5)
            store.clear()
            state_edit_cases(settings, model, tokens, case, head, store)
            memory_case(settings, model, path, 7, tokens, case)
        free(ref, model)


TARGET_STATE_EDIT = ">= 0.5 (within 2x of caching hook_state)"


def state_edit_cases(settings: Settings, model: Any, tokens: torch.Tensor, case: str, head: int, store: list) -> None:
    """A ``hook_state`` edit of one head on every recurrent layer vs caching that head's states.

    The edit scales the head's states by 0.9 (a stand-in for an SAE's reconstruction, whose own cost
    is not the hook's): every position changes, so every position is a replacement point.
    """
    def scale_head(states: torch.Tensor, hook: Any) -> torch.Tensor:
        states = states.clone()
        states[:, :, head] *= 0.9
        return states

    length = tokens.shape[1]
    for label, positions in (("every position", None), ("2 selected positions", [length // 3, 2 * length // 3])):
        cache_hooks = capture_hooks(model, "hook_state", head, store)
        edit_hooks = [(name, scale_head) for name, _ in cache_hooks]
        kwargs = {} if positions is None else {"state_positions": positions}

        def run(hooks: list, kwargs: dict = kwargs) -> Any:
            store.clear()
            with model.hooks(fwd_hooks=hooks):
                return model(tokens, **kwargs)

        compare(settings, bench="2 hooks",
                case=f"{case}: hook_state one head edited (replaced) at {label}, {len(cache_hooks)} layers",
                reference=(f"hook_state one head cached at {label}", lambda: run(cache_hooks)),
                candidate=(f"hook_state one head edited at {label}", lambda: run(edit_hooks)),
                tokens=tokens.numel(), target=TARGET_STATE_EDIT, target_check=lambda r: r >= 0.5, max_rounds=7)
    store.clear()


def _cached(model: Any, tokens: torch.Tensor, hooks: list, store: list) -> int:
    with_hooks(model, tokens, hooks, store)()
    n = tensor_bytes(store)
    store.clear()
    return n


def memory_case(settings: Settings, model: Any, path: Any, seed: int, tokens: torch.Tensor, case: str) -> None:
    """``run_with_cache`` of ``blocks.0.mixer.hook_state`` (no logits), all positions vs ``pos_slice=-1``."""
    name = "blocks.0.mixer.hook_state"
    runs = {
        "all positions": (None, lambda: model.run_with_cache(tokens, names_filter=name, return_type=None)[1]),
        "pos_slice=-1": (-1, lambda: model.run_with_cache(tokens, names_filter=name, return_type=None, pos_slice=-1)[1]),
    }
    measured: dict[str, dict[str, Any]] = {}
    for label, (pos_slice, fn) in runs.items():
        spec = dict(kind="state_cache", path=str(path), seed=seed, batch=tokens.shape[0], length=tokens.shape[1],
                    hook=name, pos_slice=pos_slice)
        with torch.no_grad():
            measured[label] = measure_peak(settings, spec, fn)
            measured[label]["shape"] = list(fn()[name].shape)
    full, last = measured["all positions"], measured["pos_slice=-1"]
    settings.add(bench="2 hooks", case=f"{case}: run_with_cache({name}) peak memory",
                 reference="all positions", candidate="pos_slice=-1", unit="MiB",
                 ref_value=mib(full["peak_bytes"]), cand_value=mib(last["peak_bytes"]),
                 speedup=full["peak_bytes"] / max(last["peak_bytes"], 1), how=full["how"])
    settings.add(bench="2 hooks", case=f"{case}: run_with_cache({name}) cached bytes",
                 reference="all positions", candidate="pos_slice=-1", unit="MiB",
                 ref_value=mib(full["result_bytes"]), cand_value=mib(last["result_bytes"]),
                 speedup=full["result_bytes"] / max(last["result_bytes"], 1),
                 shapes=[full["shape"], last["shape"]])
    with torch.no_grad():
        compare(settings, bench="2 hooks", case=f"{case}: run_with_cache({name}) time",
                reference=("all positions", runs["all positions"][1]), candidate=("pos_slice=-1", runs["pos_slice=-1"][1]),
                tokens=tokens.numel(), max_rounds=7)
