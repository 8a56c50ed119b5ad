"""What the cache-intervention protocols (erasure, sign prediction, sustained installs,
amplification) share: the trials they plan, how they hand branches to the intervention engine
(:mod:`writesae_lens.interventions.engine`) and the scipy statistics their summaries report.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float, Int
from sae_lens import SAE
from scipy import stats
from torch import Tensor
from tqdm.auto import tqdm

from hooked_ssm import HookedSSM
from writesae_lens.interventions.engine import Branch, BranchResult, InterventionEngine, Scorer
from writesae_lens.interventions.firings import (
    Site,
    contribution_norms,
    observe_site,
    prompt_batches,
    unit_atoms,
)


@dataclass(frozen=True)
class Trial:
    """One position of one prompt, with feature ``i``'s code value there (0 at a non-firing)."""

    prompt: int
    position: int
    coefficient: float = 0.0


def describe_options(options: object) -> str:
    """``name=value, ...`` of a protocol's options dataclass: the variant line of a report header."""
    return ", ".join(f"{f.name}={getattr(options, f.name)!r}" for f in dataclasses.fields(options))


def atom_per_unit_code(sae: SAE, feature: int, d_k: int, d_v: int) -> Float[Tensor, "d_k d_v"]:
    """What the decoder adds per unit of ``feature``'s code, as a key-major ``[d_k, d_v]`` matrix
    (``a * atom_per_unit_code`` is the feature's decoded contribution at code value ``a``)."""
    index = torch.tensor([feature])
    norm = contribution_norms(sae, torch.ones(1), index).float().cpu()
    return (unit_atoms(sae, index, d_k, d_v)[0].float().cpu() * norm).contiguous()


@torch.no_grad()
def firings_by_feature(
    model: HookedSSM, sae: SAE, site: Site, prompts: Sequence[Tensor], min_position: int, batch_size: int
) -> dict[int, list[Trial]]:
    """Every firing of every feature (the paper's definition: positions ``t >= min_position``
    where the feature's code is non-zero), sorted by ``(prompt, position)`` per feature."""
    out: dict[int, list[Trial]] = {}
    for ids, batch in prompt_batches(prompts, batch_size):
        codes = observe_site(model, batch, site, sae, logits=False)["codes"][:, min_position:].cpu()
        for row, t, feature in torch.nonzero(codes).tolist():
            out.setdefault(feature, []).append(Trial(ids[row], t + min_position, float(codes[row, t, feature])))
    return {f: sorted(trials, key=lambda tr: (tr.prompt, tr.position)) for f, trials in sorted(out.items())}


def feature_positions(
    model: HookedSSM, sae: SAE, site: Site, prompts: Sequence[Tensor], feature: int, min_position: int, batch_size: int
) -> tuple[list[Trial], list[Trial]]:
    """``(firings, non-firings)`` of ``feature`` over every position ``t >= min_position``."""
    firing = firings_by_feature(model, sae, site, prompts, min_position, batch_size).get(feature, [])
    fired = {(tr.prompt, tr.position) for tr in firing}
    quiet = [Trial(p, t) for p, prompt in enumerate(prompts) for t in range(min_position, len(prompt)) if (p, t) not in fired]
    return firing, quiet


@dataclass
class Reduced:
    """An engine scorer: ``{"value": fn(base_logits, patched_logits, branch)}`` at each scored
    position (float64 logits; ``branch`` holds the caller's branch indices)."""

    fn: Callable[[Float[Tensor, "n vocab"], Float[Tensor, "n vocab"], Int[Tensor, "n"]], Tensor]
    needs_base: bool = True

    def __call__(self, patched: Tensor, base: Tensor | None, branch: Tensor, position: Tensor) -> dict[str, Tensor]:
        return {"value": self.fn(None if base is None else base.double(), patched.double(), branch)}


def run_branches(
    model: HookedSSM, prompts: Sequence[Tensor], branches: Sequence[Branch], scorer: Scorer, batch_size: int = 8,
    progress: bool = False, desc: str = "branches",
) -> list[BranchResult]:
    """``InterventionEngine(model).run(...)`` with a progress bar; results in branch order."""
    results: list[BranchResult | None] = [None] * len(branches)
    with tqdm(total=len(branches), disable=not progress, desc=desc) as bar:
        for index, done in InterventionEngine(model).iter_run(prompts, branches, scorer, batch_size):
            for i, result in zip(index, done):
                results[i] = result
            bar.update(len(index))
    return results  # type: ignore[return-value]


def median_ci(x: np.ndarray, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile-bootstrap CI of the median (``scipy.stats.bootstrap``, 9,999 resamples)."""
    if x.size < 2 or np.all(x == x[0]):
        return (float(np.median(x)), float(np.median(x))) if x.size else (float("nan"), float("nan"))
    res = stats.bootstrap((x,), np.median, confidence_level=level, method="percentile",
                          rng=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def mean_ci(x: np.ndarray, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile-bootstrap CI of the mean (``scipy.stats.bootstrap``, 9,999 resamples)."""
    if x.size < 2 or np.all(x == x[0]):
        return (float(x.mean()), float(x.mean())) if x.size else (float("nan"), float("nan"))
    res = stats.bootstrap((x,), np.mean, confidence_level=level, method="percentile", rng=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def wilcoxon_summary(x: np.ndarray, alternative: str = "two-sided") -> dict:
    """``scipy.stats.wilcoxon`` of the paired differences ``x`` against 0."""
    if x.size == 0 or not np.any(x != 0):
        return dict(statistic=float("nan"), p_value=float("nan"), alternative=alternative, n=int(x.size))
    res = stats.wilcoxon(x, alternative=alternative)
    return dict(statistic=float(res.statistic), p_value=float(res.pvalue), alternative=alternative, n=int(x.size))


def wilson_ci(successes: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval (``scipy.stats.binomtest(...).proportion_ci``)."""
    if n == 0:
        return float("nan"), float("nan")
    ci = stats.binomtest(successes, n).proportion_ci(confidence_level=level, method="wilson")
    return float(ci.low), float(ci.high)
