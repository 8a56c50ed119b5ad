"""Benchmark 5: substitution-test firings/s, fast path vs naive full re-runs, prompts of 512 tokens.

Uses the library's runner, ``writesae_lens.interventions.substitute_firings`` (three conditions per
firing: atom / delete / random), ``method="fast"`` (the intervention engine: the unpatched prefix
is walked once with a ``RecurrentState`` and copied at every firing position; the firings'
continuations then run as batches of rows = firings x conditions, ragged prefixes and all,
``max_rows`` rows per batch: the engine's device default, 48 on CPU and 192 on GPU) vs ``method="naive"`` (one
``run_with_hooks`` from position 0 per firing). Firings are placed at seeded random positions of
each prompt at one site (layer 0, head 1 of the toy Gated DeltaNet model); their atoms are
random atoms of a randomly initialised WriteSAE (the SAE only supplies the replacement writes, so
its training does not affect the timing). Three scoring windows are timed:

- ``score="last", horizon=None`` (the runner's default): each firing runs to the end of the prompt;
- ``score="last", horizon=32``: the window ends 32 tokens after the firing;
- ``score="next"``: the window is the firing's next token.

A fourth row repeats the default window at layer 1, head 1 (the toy's last Gated DeltaNet layer):
there the fast path runs block 1 only (an edit cannot change earlier blocks), as it would at the
paper's deeper sites.

Where SAELens is not importable (the GPU machine) the ``writesae_lens`` package ``__init__`` (which
imports SAELens) is bypassed to import ``writesae_lens.interventions`` alone, and a stand-in with
random unit rank-1 atoms replaces the SAE (recorded in the row).
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

import torch

from common import ROOT, Settings, compare, load_hooked, toy_dir

TARGET = ">= 5 (fast >= 5x naive)"
LENGTH = 512


def import_interventions() -> tuple[Any, str]:
    try:
        return importlib.import_module("writesae_lens.interventions"), "writesae_lens.interventions"
    except ImportError as err:
        for name in [n for n in sys.modules if n == "writesae_lens" or n.startswith("writesae_lens.")]:
            del sys.modules[name]
        # Bare packages for writesae_lens and writesae_lens.interventions: their __init__s import
        # modules that need SAELens (splicing), the substitution runner does not.
        for package in ("writesae_lens", "writesae_lens.interventions"):
            shim = types.ModuleType(package)
            shim.__path__ = [str(ROOT / package.replace(".", "/"))]
            sys.modules[package] = shim
        substitution = importlib.import_module("writesae_lens.interventions.substitution")
        interventions = types.SimpleNamespace(substitution=substitution,
                                              substitute_firings=substitution.substitute_firings)
        return interventions, f"writesae_lens.interventions.substitution without the package __init__s ({err.name} missing)"


class AtomStandIn:
    """What the substitution runner reads from an SAE with a rank-1 decoder: ``atoms()``, ``U_dec``."""

    def __init__(self, d_sae: int, d_k: int, d_v: int, device: str):
        gen = torch.Generator().manual_seed(0)
        self.U_dec = torch.randn(d_sae, d_k, generator=gen).to(device)
        self.V_dec = torch.randn(d_sae, d_v, generator=gen).to(device)
        self.device = torch.device(device)

    def atoms(self) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.U_dec / self.U_dec.norm(dim=-1, keepdim=True), self.V_dec / self.V_dec.norm(dim=-1, keepdim=True))


def make_sae(d_k: int, d_v: int, device: str) -> tuple[Any, str]:
    try:
        from writesae_lens.saes import WriteSAE, WriteSAEConfig

        torch.manual_seed(0)
        return WriteSAE(WriteSAEConfig(d_in=d_k * d_v, d_sae=512, d_k=d_k, d_v=d_v, k=32, device=device)), "WriteSAE (random)"
    except ImportError:
        return AtomStandIn(512, d_k, d_v, device), "AtomStandIn (random unit rank-1 atoms)"


def row_tokens(interventions: Any, firings: list, n_prompts: int, layer: int, score: str, horizon: int | None,
               batch_size: int) -> tuple[int, int]:
    """Row-tokens (rows x positions) each method pushes through the model, layer-skipping aside.

    Naive: 3 condition rows from position 0 to the window end per firing, plus one unpatched pass
    per prompt. Fast (the runner's plan): the prefix walk up to the last firing of each prompt
    batch; 3 rows per firing from ``t`` to the window end (4 when an unpatched row supplies the
    base logits: layer 0 and windows shorter in all than the batch); one unpatched pass per prompt
    otherwise. Ignores the padding of rows whose window ends inside a segment.
    """
    ends = {id(f): interventions.substitution.window_end(f.position, LENGTH, score, horizon) for f in firings}
    naive = 3 * sum(ends[id(f)] + 1 for f in firings) + n_prompts * LENGTH
    fast = 0
    for start in range(0, n_prompts, batch_size):
        prompts = range(start, min(start + batch_size, n_prompts))
        members = [f for f in firings if f.prompt in prompts]
        window = sum(ends[id(f)] - f.position + 1 for f in members)
        clean_slot = layer == 0 and window < len(prompts) * LENGTH
        fast += len(prompts) * max(f.position for f in members)  # the walk
        fast += (4 if clean_slot else 3) * window + (0 if clean_slot else len(prompts) * LENGTH)
    return naive, fast


def run(settings: Settings) -> None:
    interventions, how = import_interventions()
    from writesae_lens.interventions.firings import Firing
    from writesae_lens.interventions.sites import Site

    model = load_hooked(toy_dir("toy-gdn"), settings)
    d_k, d_v = model.cfg.d_k, model.cfg.d_v
    sae, sae_kind = make_sae(d_k, d_v, settings.device)
    n_prompts, per_prompt = (8, 8) if settings.cuda else ((2, 16) if settings.quick else (4, 32))
    batch_size = 8
    gen = torch.Generator().manual_seed(5)
    tokens = torch.randint(3, model.cfg.d_vocab, (n_prompts, LENGTH), generator=gen)
    placed = []  # (prompt, position, atom): the same firings at every site
    for p in range(n_prompts):
        positions = sorted((torch.randperm(LENGTH - 2, generator=gen)[:per_prompt] + 1).tolist())
        for t in positions:
            placed.append((p, t, int(torch.randint(0, 512, (1,), generator=gen))))
    variants = [(0, "last", None), (0, "last", 32), (0, "next", None), (1, "last", None)]
    for layer, score, horizon in variants:
        site = Site(layer=layer, head=1, kind="write")
        firings = [Firing(p, t, site.layer, site.head, atom, 1.0, 1.0, 1.0) for p, t, atom in placed]

        def runner(method: str, score=score, horizon=horizon, site=site, firings=firings):
            return lambda: interventions.substitute_firings(
                model, sae, tokens, firings, site, score=score, horizon=horizon, method=method,
                batch_size=batch_size, progress=False)

        fast, naive = runner("fast"), runner("naive")
        with torch.no_grad():
            rows_fast, rows_naive = fast(), naive()
        key = lambda r: (r["prompt"], r["position"])  # noqa: E731
        by_naive = {key(r): r for r in rows_naive}
        diff = max(abs(r[f"kl_{c}"] - by_naive[key(r)][f"kl_{c}"]) for r in rows_fast for c in ("atom", "delete", "random"))
        # The ratio of row-tokens the two methods push through the model: what prefix reuse alone
        # can give (the fast path also skips the blocks before the site, not counted here).
        naive_tokens, fast_tokens = row_tokens(interventions, firings, n_prompts, layer, score, horizon, batch_size)
        label = f"score={score}" + (f", horizon={horizon}" if horizon else (", horizon=None (default)" if score == "last" else ""))
        if layer:
            label += f", blocks 0-{layer - 1} skipped"
        compare(settings, bench="5 substitution",
                case=f"toy-gdn L{layer}H1, {n_prompts} prompts x {per_prompt} firings, T={LENGTH}, {label}",
                reference=("naive: run_with_hooks from 0 per firing", naive),
                candidate=("fast: batched branches from prefix snapshots", fast),
                tokens=len(firings), target=TARGET if layer == 0 else None, target_check=lambda r: r >= 5,
                min_rounds=2, max_rounds=5,
                extra=dict(unit_note="tok/s columns are firings/s here", score=score, horizon=horizon,
                           layer=layer, n_firings=len(firings), max_abs_kl_diff_fast_vs_naive=diff,
                           token_bound=naive_tokens / fast_tokens, runner=how, sae=sae_kind,
                           max_rows="runner default (48 CPU / 192 GPU)"))
        settings.results[-1]["unit"] = "firings/s"
        settings.save()
