"""What the cache-intervention protocols (erasure, sign prediction, sustained installs) share:
the trials they plan, the write edits they ask the intervention engine for, and the scipy
statistics their summaries report.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float
from sae_lens import SAE
from scipy import stats
from torch import Tensor
from tqdm.auto import tqdm

from hooked_ssm import HookedSSM
from writesae_lens.interventions.firings import (
    Site,
    branch_logits,
    contribution_norms,
    prefix_states,
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


@dataclass
class WriteEdit:
    """An edit of the native write of the site's head at ``position`` of prompt ``prompt``:
    ``replace`` it by a ``[d_k, d_v]`` matrix, and/or ``add`` one to it."""

    prompt: int
    position: int
    add: Float[Tensor, "d_k d_v"] | None = None
    replace: Float[Tensor, "d_k d_v"] | None = None


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


#: ``reduce(native_logits, edited_logits, edit_index)`` -> one row per edit of the chunk.
Reduce = Callable[[Float[Tensor, "rows vocab"], Float[Tensor, "rows vocab"], Tensor], Tensor]


def _edit_hook(head: int, edits: Sequence[WriteEdit]) -> Callable:
    """A ``hook_write`` hook for a one-token step of ``len(edits)`` branch rows: row ``i`` gets
    edit ``i`` (its replacement, then its addition)."""

    def hook(act: Tensor, hook: object) -> Tensor:
        for i, edit in enumerate(edits):
            if edit.replace is not None:
                act[i, 0, head] = edit.replace.flatten().to(act)
            if edit.add is not None:
                act[i, 0, head] += edit.add.flatten().to(act)
        return act

    return hook


@torch.no_grad()
def run_write_edits(
    model: HookedSSM,
    site: Site,
    prompts: Sequence[Tensor],
    edits: Sequence[WriteEdit],
    reduce: Reduce,
    batch_size: int = 8,
    max_rows: int = 64,
    progress: bool = False,
) -> Tensor:
    """For each edit, ``reduce(native, edited, index)`` of the logits (float64, ``[rows, vocab]``)
    at the edit's position: the unmodified model's and the model's with that edit alone (one
    branch per edit); ``index`` holds the chunk's edit numbers. Results are in the order of
    ``edits``."""
    by_prompt: dict[int, list[int]] = {}
    for i, edit in enumerate(edits):
        by_prompt.setdefault(edit.prompt, []).append(i)
    out: dict[int, Tensor] = {}
    bar = tqdm(total=len(edits), disable=not progress, desc="write edits")
    for ids, batch in prompt_batches(prompts, batch_size, ids=sorted(by_prompt)):
        native = model(batch.to(model.cfg.device)).double()
        at: dict[int, list[tuple[int, int]]] = {}
        for row, prompt in enumerate(ids):
            for i in by_prompt[prompt]:
                at.setdefault(edits[i].position, []).append((row, i))
        for t, state in prefix_states(model, batch, at):
            for c0 in range(0, len(at[t]), max_rows):
                chunk = at[t][c0 : c0 + max_rows]
                rows = torch.tensor([row for row, _ in chunk])
                hook = _edit_hook(site.head, [edits[i] for _, i in chunk])
                logits = branch_logits(model, site, batch, state, rows, t, t, hook, positions=[t])
                index = torch.tensor([i for _, i in chunk])
                reduced = reduce(native[rows.to(native.device), t], logits[:, 0].double(), index).cpu()
                for j, (_, i) in enumerate(chunk):
                    out[i] = reduced[j]
                bar.update(len(chunk))
    bar.close()
    return torch.stack([out[i] for i in range(len(edits))])


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
