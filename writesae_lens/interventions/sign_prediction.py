"""Single-position sign prediction (paper section 4 and App. I.5; docs/method.md, "Cache interventions").

For a target token ``T`` the closed form picks the value-side direction
``w*_T = W_O[h] W_U[:, T] / ||W_O[h] W_U[:, T]||`` (the paper's ``v*_T = W_O[head]^T W_U[T] / ||.||``;
our ``W_O[h]`` is the head's ``[d_v, d_model]`` slice). A trial writes ``s u w*_T^T`` into the
head's cache at one position ``t0`` (added to the native write, ``s = magnitude * ||D_nat(t0)||_F``)
and measures the change of ``T``'s logit there. The closed form (Eq. 1 at lag 0, ``J`` = identity)
predicts ``s (u . q_t0) ||W_O[h] W_U[:, T]||``: its sign is ``sign(u . q_t0)``.

The key side ``u`` is the atom's own key factor ``u_i`` (``key="atom"``, the default and the
paper's: the direction is "written into the cache" by feature ``i``'s atom with its value side
swapped for ``w*_T``). Options: ``"native"`` (the write's own key ``k_t0``, the key factor of
``hook_write_factors``; what this library did before AUDIT.md item 9), ``"query"`` (``q_t0``: the
sign is then always predicted positive) and ``"random"`` (a seeded Gaussian unit vector).

Trials (paper: n = 2,000 triples): ``(feature i, position t0, target T)`` with ``t0`` a firing of
``i`` (``positions="firing"``; ``"any"``: any position of a prompt where ``i`` fires) among the
features with at least ``min_firings`` firings, and ``T`` drawn uniformly among the tokens ranked
``rank_range`` (1-based) at ``t0`` by the unmodified model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from sae_lens import SAE
from scipy import stats
from torch import Tensor

from hooked_ssm import HookedSSM
from writesae_lens.analysis.stats import r_squared, wilson_interval
from writesae_lens.interventions.atoms import unit_factors
from writesae_lens.interventions.engine import Branch, add_write, as_prompt_list, prompt_batches
from writesae_lens.interventions.firings import Firing, find_firings
from writesae_lens.interventions.logit_shift import readout_matrix
from writesae_lens.interventions.observe import observe_site
from writesae_lens.interventions.protocol import Reduced, describe_options, run_branches
from writesae_lens.interventions.sites import resolve_site

#: The paper's numbers (Qwen3.5-0.8B L9 H4, App. I.5).
PAPER_SIGN_PREDICTION: dict[str, object] = {
    "label": "paper (Qwen3.5-0.8B L9 H4)",
    "n": 2000, "sign_accuracy": 0.846, "sign_ci": (0.830, 0.862), "pearson_r": 0.162, "pearson_p": 3.7e-13,
    "pooled_r2": -0.06, "median_ratio": 1.08,
}


@dataclass(frozen=True)
class SignPredictionOptions:
    """The choices the paper leaves open, with this project's defaults (stated in every report)."""

    key: Literal["atom", "native", "query", "random"] = "atom"
    positions: Literal["firing", "any"] = "firing"
    n_trials: int = 2000
    rank_range: tuple[int, int] = (2, 1000)
    magnitude: float = 1.0
    min_firings: int = 5
    min_position: int = 1

    def __post_init__(self) -> None:
        if self.key not in ("atom", "native", "query", "random"):
            raise ValueError(f"key must be 'atom', 'native', 'query' or 'random', not {self.key!r}.")
        if self.positions not in ("firing", "any"):
            raise ValueError(f"positions must be 'firing' or 'any', not {self.positions!r}.")


def target_directions(model: HookedSSM, layer: int, head: int, targets: Tensor) -> Tensor:
    """``w*_T`` for each target: unit ``W_O[h] W_U[:, T]`` (``[n, d_v]``)."""
    directions = readout_matrix(model, layer, head)[:, targets.to(model.W_U.device)].T
    return directions / directions.norm(dim=-1, keepdim=True).clamp(min=1e-12)


def _plan(
    firings: Sequence[Firing], lengths: Sequence[int], options: SignPredictionOptions, generator: torch.Generator
) -> list[tuple[int, int, int]]:
    """``(feature, prompt, t0)`` triples: a seeded sample of at most ``n_trials``."""
    by_feature: dict[int, list[Firing]] = {}
    for f in firings:
        by_feature.setdefault(f.atom, []).append(f)
    pool: list[tuple[int, int, int]] = []
    for feature, trials in sorted(by_feature.items()):
        if options.positions == "firing":
            pool += [(feature, tr.prompt, tr.position) for tr in trials]
        else:
            for p in sorted({tr.prompt for tr in trials}):
                pool += [(feature, p, t) for t in range(options.min_position, lengths[p])]
    if not pool:
        raise ValueError(f"No feature fires at least {options.min_firings} times; lower min_firings or pass more tokens.")
    pick = torch.randperm(len(pool), generator=generator)[: options.n_trials].tolist()
    return sorted(pool[i] for i in pick)


@torch.no_grad()
def run_sign_prediction(
    model: HookedSSM,
    sae: SAE,
    tokens: Tensor | Sequence[Tensor],
    *,
    options: SignPredictionOptions = SignPredictionOptions(),
    layer: int | None = None,
    head: int | None = None,
    batch_size: int = 8,
    seed: int = 0,
    progress: bool = True,
) -> tuple[list[dict], dict]:
    """One row per trial (``predicted`` / ``measured`` logit change of ``target``, ``sign_correct``)
    and the summary (:func:`summarize_sign_prediction`)."""
    site = resolve_site(model, sae, layer, head)
    prompts = as_prompt_list(tokens)
    generator = torch.Generator().manual_seed(seed)
    firings = find_firings(model, sae, prompts, site, min_firings_per_atom=options.min_firings, max_per_atom=None,
                           min_position=options.min_position, batch_size=batch_size, seed=seed)
    plan = _plan(firings, [len(p) for p in prompts], options, generator)
    readout = readout_matrix(model, site.layer, site.head).float().cpu()

    # What each trial needs at t0 from one observing pass: q, k, the native write norm, a target.
    wanted: dict[int, list[int]] = {}
    for i, (_, p, _) in enumerate(plan):
        wanted.setdefault(p, []).append(i)
    q, k, norm, target = {}, {}, {}, {}
    for ids, batch in prompt_batches(prompts, batch_size, ids=sorted(wanted)):
        seen = observe_site(model, batch, site, leaves=("hook_q", "hook_write_factors"))
        for row, p in enumerate(ids):
            for i in wanted[p]:
                t0 = plan[i][2]
                q[i] = seen["hook_q"][row, t0].float().cpu()
                k[i] = seen["hook_write_factors"][row, t0, : model.cfg.d_k].float().cpu()  # the write's own key
                norm[i] = float(seen["write_norm"][row, t0])
                order = seen["logits"][row, t0].argsort(descending=True).cpu()
                hi = min(options.rank_range[1], order.numel())
                target[i] = int(order[int(torch.randint(options.rank_range[0] - 1, hi, (1,), generator=generator))])

    if options.key == "atom":
        u_all, _ = unit_factors(sae, torch.tensor([f for f, _, _ in plan]))
        keys = [u_all[i].float().cpu() for i in range(len(plan))]
    else:
        raw = {"native": k, "query": q}.get(options.key)
        keys = [raw[i] if raw is not None else torch.randn(model.cfg.d_k, generator=generator) for i in range(len(plan))]
        keys = [u / u.norm().clamp(min=1e-12) for u in keys]
    w_star = target_directions(model, site.layer, site.head, torch.tensor([target[i] for i in range(len(plan))])).float().cpu()
    scale = [options.magnitude * norm[i] for i in range(len(plan))]
    branches = [Branch(p, [add_write(site.layer, site.head, t0, scale[i] * torch.outer(keys[i], w_star[i]))], scored=[t0], end=t0)
                for i, (_, p, t0) in enumerate(plan)]
    tgt = torch.tensor([target[i] for i in range(len(plan))])
    logit_change = Reduced(lambda native, edited, index: (edited - native).gather(1, tgt.to(edited.device)[index, None])[:, 0])
    done = run_branches(model, prompts, branches, logit_change, batch_size, progress, "sign prediction")
    measured = torch.cat([r.scores["value"] for r in done]).cpu()
    rows = []
    for i, (feature, p, t0) in enumerate(plan):
        uq = float(keys[i] @ q[i])
        predicted = scale[i] * uq * float(readout[:, target[i]].norm())
        rows.append(dict(feature=feature, prompt=p, position=t0, target=target[i], key=options.key, u_dot_q=uq,
                         predicted=predicted, measured=float(measured[i]),
                         sign_correct=bool(np.sign(predicted) == np.sign(float(measured[i])))))
    summary = summarize_sign_prediction(rows)
    summary["variant"] = describe_options(options)
    summary["config"] = dict(dataclasses.asdict(options), layer=site.layer, head=site.head)
    return rows, summary


def summarize_sign_prediction(rows: Sequence[Mapping]) -> dict:
    """Sign accuracy with its Wilson 95% CI (scipy), Pearson r of predicted vs measured
    (``scipy.stats.pearsonr``), the pooled R^2 of the unfitted prediction (sklearn's
    ``r2_score``), the median measured / predicted ratio, and the accuracy per feature."""
    n = len(rows)
    if n == 0:
        return {"n": 0}
    correct = sum(r["sign_correct"] for r in rows)
    pred = np.array([r["predicted"] for r in rows])
    meas = np.array([r["measured"] for r in rows])
    ok = pred != 0
    pearson = stats.pearsonr(pred, meas) if n > 2 else None
    per_feature: dict[int, dict] = {}
    for feature in sorted({r["feature"] for r in rows}):
        group = [r["sign_correct"] for r in rows if r["feature"] == feature]
        per_feature[feature] = dict(n=len(group), sign_accuracy=sum(group) / len(group))
    return dict(
        n=n, sign_accuracy=correct / n, sign_ci=wilson_interval(correct, n),
        pearson_r=float("nan") if pearson is None else float(pearson.statistic),
        pearson_p=float("nan") if pearson is None else float(pearson.pvalue),
        pooled_r2=r_squared(meas, pred),
        median_ratio=float(np.median(meas[ok] / pred[ok])) if ok.any() else float("nan"),
        per_feature=per_feature,
    )


__all__ = ["PAPER_SIGN_PREDICTION", "SignPredictionOptions", "target_directions", "run_sign_prediction",
           "summarize_sign_prediction"]
