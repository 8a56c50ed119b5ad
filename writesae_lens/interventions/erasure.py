"""Cache-slot erasure (paper section 4 "Cache-slot erasure" and App. I.4; docs/method.md, "Cache interventions").

The protocol, in the paper's order:

1. **Feature detection, before the run.** Delete the write at feature ``i``'s firings (positions
   where its code ``a_i(t) > 0``) on *detection* prompts and sum ``log p_native - log p_erased`` of
   the next-token distribution at ``t`` over those firings, per token id. The highest-scoring token
   is the feature's **preferred token**; it is the target of every later trial (the paper: F412 ->
   id 98818, 14.5 nats summed). By default the detection prompts are a held-out share of the
   prompts, disjoint from the evaluation ones (option ``detect_on="same"``: the same prompts, as
   the paper's records do not say otherwise), or pass ``target=`` a token id.
2. **Erasure at natural firings** (n = 150 evaluation firings): ``delta log p`` of the preferred
   token after the erasure; median with a 95% bootstrap CI, mean, paired Wilcoxon signed-rank
   test (scipy), median rank of the token before and after.
3. **Control: the same write at non-firing positions** (n = 150 positions where ``a_i(t) = 0``):
   *add* ``m a* u_i w_i^T`` (``a*`` = the median natural activation of the feature, ``u_i w_i^T``
   its decoder atom) at ``m`` in ``control_doses`` (paper Table 19: 1, 2, 4 x a*); the sign is
   the paper's: the atom is written, not removed.
4. **Dose sweep**: the first ``dose_n`` control positions (paper n = 50) at each of the six
   ``dose_sweep`` magnitudes, with a least-squares line of ``delta log p`` on the magnitude
   (``scipy.stats.linregress``; the paper: "weakly monotone, no significant linear fit").

What "erase" removes (``erase=``): ``"write"`` (default; App. I.4 "deleting the write", the
native write at ``t`` replaced by zero) or ``"contribution"`` (only the feature's decoded
contribution ``a_i(t) u_i w_i^T`` is subtracted from the write; section 4 "erasing one atom's
contribution").
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from jaxtyping import Float
from sae_lens import SAE
from scipy import stats
from torch import Tensor

from hooked_ssm import HookedSSM
from writesae_lens.analysis.stats import bootstrap_ci, signed_rank_test
from writesae_lens.interventions.engine import Branch, Edit, add_write, as_prompt_list, replace_write
from writesae_lens.interventions.firings import Firing, find_firings
from writesae_lens.interventions.protocol import Reduced, atom_per_unit_code, describe_options, run_branches
from writesae_lens.interventions.sites import resolve_site
from writesae_lens.sae_checks import check_atoms

#: The paper's numbers (Qwen3.5-0.8B L9 H4, feature F412; App. I.4 Tables 18-19).
PAPER_ERASURE: dict[str, object] = {
    "label": "paper (Qwen3.5-0.8B L9 H4, F412)",
    "firing": {"n": 150, "median_delta_logp": -0.116, "median_ci": (-0.265, -0.042), "mean_delta_logp": -0.349,
               "wilcoxon_p": 1.07e-6, "native_median_rank": 68485, "patched_median_rank": 77444},
    "control": {1.0: {"n": 150, "median_delta_logp": 3.1e-5, "wilcoxon_p": 0.67},
                2.0: {"n": 150, "median_delta_logp": 0.008, "wilcoxon_p": 0.28},
                4.0: {"n": 150, "median_delta_logp": 0.016, "wilcoxon_p": 0.15}},
    "dose_sweep": {"n": 50, "n_magnitudes": 6, "linear_fit": "not significant"},
    "detection": {"preferred_token_summed_nats": 14.5, "median_activation": 0.31},
}


@dataclass(frozen=True)
class ErasureOptions:
    """The choices the paper leaves open, with this project's defaults (stated in every report)."""

    erase: Literal["write", "contribution"] = "write"
    n: int = 150
    target: Literal["detected"] | int = "detected"
    detect_on: Literal["held_out", "same"] = "held_out"
    detection_share: float = 0.5
    max_detection_firings: int = 150
    control_doses: tuple[float, ...] = (1.0, 2.0, 4.0)
    control_n: int = 150
    dose_sweep: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
    dose_n: int = 50
    wilcoxon_alternative: Literal["two-sided", "less", "greater"] = "two-sided"
    min_position: int = 1

    def __post_init__(self) -> None:
        if self.erase not in ("write", "contribution"):
            raise ValueError(f"erase must be 'write' or 'contribution', not {self.erase!r}.")
        if self.detect_on not in ("held_out", "same"):
            raise ValueError(f"detect_on must be 'held_out' or 'same', not {self.detect_on!r}.")
        if self.target != "detected" and not isinstance(self.target, int):
            raise ValueError(f"target must be 'detected' or a token id, not {self.target!r}.")
        if not 0 < self.detection_share < 1:
            raise ValueError(f"detection_share must be in (0, 1), not {self.detection_share}.")


def split_prompts(n_prompts: int, options: ErasureOptions, seed: int) -> tuple[list[int], list[int]]:
    """``(detection prompts, evaluation prompts)``: a seeded disjoint split, or all prompts twice."""
    if options.detect_on == "same" or not isinstance(options.target, str):
        every = list(range(n_prompts))
        return every, every
    if n_prompts < 2:
        raise ValueError("detect_on='held_out' needs at least 2 prompts (or pass detect_on='same' / target=ID).")
    order = torch.randperm(n_prompts, generator=torch.Generator().manual_seed(seed)).tolist()
    cut = min(max(1, round(options.detection_share * n_prompts)), n_prompts - 1)
    return sorted(order[:cut]), sorted(order[cut:])


def preferred_token(drops: Float[Tensor, "n vocab"]) -> tuple[int, float]:
    """The paper's feature detection: per token id, the sum over firings of
    ``log p_native - log p_erased`` (``drops``); the argmax and its summed value (nats)."""
    score = drops.double().sum(0)
    best = int(score.argmax())
    return best, float(score[best])


def _sample(items: Sequence[Firing], n: int, generator: torch.Generator) -> list[Firing]:
    pick = torch.randperm(len(items), generator=generator)[:n].tolist()
    return sorted((items[i] for i in pick), key=lambda tr: (tr.prompt, tr.position))


def _rank(logp: Float[Tensor, "n vocab"], token: int) -> Tensor:
    """1-based rank of ``token`` in each row (1 = the most likely)."""
    return ((logp > logp[:, token : token + 1]).sum(-1) + 1).to(logp.dtype)


@torch.no_grad()
def run_erasure(
    model: HookedSSM,
    sae: SAE,
    tokens: Tensor | Sequence[Tensor],
    *,
    feature: int,
    options: ErasureOptions = ErasureOptions(),
    layer: int | None = None,
    head: int | None = None,
    batch_size: int = 8,
    seed: int = 0,
    progress: bool = True,
) -> tuple[list[dict], dict]:
    """Run the erasure protocol on ``feature`` of ``sae``. Returns one row per evaluated trial
    (``condition``: ``"firing"``, ``"control"`` or ``"dose"``; ``delta_logp`` of the preferred
    token at the next-token distribution of the edited position) and the summary (its
    ``"detection"`` entry: the detection prompts, firings used and summed nats)."""
    site = resolve_site(model, sae, layer, head)
    check_atoms(sae, feature, "feature")
    prompts = as_prompt_list(tokens)
    detect_ids, eval_ids = split_prompts(len(prompts), options, seed)
    generator = torch.Generator().manual_seed(seed)
    firing = find_firings(model, sae, prompts, site, atoms=[feature], min_firings_per_atom=1, max_per_atom=None,
                          min_position=options.min_position, batch_size=batch_size, seed=seed)
    fired = {(f.prompt, f.position) for f in firing}
    quiet = [Firing(p, t, site.layer, site.head, feature, 0.0, 0.0, math.nan)  # the same positions the firings range over
             for p, prompt in enumerate(prompts) for t in range(options.min_position, len(prompt) - 1) if (p, t) not in fired]
    if not firing:
        raise ValueError(f"Feature {feature} never fires on these tokens; pick an alive feature.")
    a_star = float(np.median([tr.coefficient for tr in firing]))
    atom = atom_per_unit_code(sae, feature, model.cfg.d_k, model.cfg.d_v)  # [d_k, d_v]

    def erase_edit(trial: Firing) -> Edit:
        if options.erase == "write":
            return replace_write(site.layer, site.head, trial.position, torch.zeros_like(atom))
        return add_write(site.layer, site.head, trial.position, -trial.coefficient * atom)

    def add_edit(trial: Firing, dose: float) -> Edit:
        return add_write(site.layer, site.head, trial.position, dose * a_star * atom)

    def branch(trial: Firing, edit: Edit) -> Branch:
        """Scored at the edited position: the next-token distribution right after the write."""
        return Branch(trial.prompt, [edit], scored=[trial.position], end=trial.position)

    rows: list[dict] = []
    detection_info: dict[str, object] = {}
    target = options.target
    if target == "detected":
        pool = [tr for tr in firing if tr.prompt in set(detect_ids)]
        if not pool:
            raise ValueError(f"Feature {feature} does not fire on the detection prompts; use more prompts or detect_on='same'.")
        detection = _sample(pool, options.max_detection_firings, generator)
        drop = Reduced(lambda native, edited, _: (native.log_softmax(-1) - edited.log_softmax(-1)).float())
        done = run_branches(model, prompts, [branch(tr, erase_edit(tr)) for tr in detection], drop, batch_size,
                            progress, "feature detection")
        target, summed = preferred_token(torch.cat([r.scores["value"] for r in done]))
        detection_info = dict(n=len(detection), prompts=detect_ids, summed_nats=summed)
    target = int(target)

    eval_set = set(eval_ids)
    evaluation = _sample([tr for tr in firing if tr.prompt in eval_set], options.n, generator)
    controls = _sample([tr for tr in quiet if tr.prompt in eval_set], options.control_n, generator)
    if not evaluation:
        raise ValueError(f"Feature {feature} does not fire on the evaluation prompts; pass more prompts.")
    plan: list[tuple[str, float, Firing, Edit]] = [("firing", 0.0, tr, erase_edit(tr)) for tr in evaluation]
    for m in options.control_doses:
        plan += [("control", m, tr, add_edit(tr, m)) for tr in controls]
    for m in options.dose_sweep:
        plan += [("dose", m, tr, add_edit(tr, m)) for tr in controls[: options.dose_n]]

    def at_target(native: Tensor, edited: Tensor, _: Tensor) -> Tensor:
        native, edited = native.log_softmax(-1), edited.log_softmax(-1)
        return torch.stack([native[:, target], edited[:, target], _rank(native, target), _rank(edited, target)], dim=-1)

    done = run_branches(model, prompts, [branch(tr, edit) for _, _, tr, edit in plan], Reduced(at_target), batch_size,
                        progress, f"erasure of feature {feature}")
    scored = torch.cat([r.scores["value"] for r in done])
    for i, (condition, dose, trial, _) in enumerate(plan):
        rows.append(dict(
            condition=condition, dose=dose, prompt=trial.prompt, position=trial.position, layer=site.layer,
            head=site.head, feature=feature, coefficient=trial.coefficient, token=target,
            delta_logp=float(scored[i, 1] - scored[i, 0]), native_logp=float(scored[i, 0]),
            native_rank=int(scored[i, 2]), patched_rank=int(scored[i, 3]),
        ))
    summary = summarize_erasure(rows, options, seed=seed)
    summary["detection"] = detection_info
    summary["config"] = dict(dataclasses.asdict(options), layer=site.layer, head=site.head, feature=feature,
                             target=target, a_star=a_star, evaluation_prompts=eval_ids)
    return rows, summary


def summarize_erasure(rows: Sequence[Mapping], options: ErasureOptions = ErasureOptions(), seed: int = 0) -> dict:
    """Per condition (and dose): n, median ``delta_logp`` with a bootstrap 95% CI, mean, the
    Wilcoxon signed-rank test against 0 (``options.wilcoxon_alternative``), median ranks; for the
    dose sweep the per-magnitude medians and ``scipy.stats.linregress`` of delta on magnitude."""

    def describe(group: Sequence[Mapping]) -> dict:
        x = np.array([r["delta_logp"] for r in group])
        return dict(n=int(x.size), median_delta_logp=float(np.median(x)), median_ci=bootstrap_ci(x, np.median, seed=seed),
                    mean_delta_logp=float(x.mean()),
                    wilcoxon=signed_rank_test(x, np.zeros_like(x), options.wilcoxon_alternative),
                    native_median_rank=float(np.median([r["native_rank"] for r in group])),
                    patched_median_rank=float(np.median([r["patched_rank"] for r in group])))

    out: dict = {"variant": describe_options(options)}
    firing = [r for r in rows if r["condition"] == "firing"]
    if firing:
        out["firing"] = describe(firing)
    out["control"] = {m: describe([r for r in rows if r["condition"] == "control" and r["dose"] == m])
                      for m in sorted({r["dose"] for r in rows if r["condition"] == "control"})}
    sweep = [r for r in rows if r["condition"] == "dose"]
    if sweep:
        doses = np.array([r["dose"] for r in sweep])
        deltas = np.array([r["delta_logp"] for r in sweep])
        fit = stats.linregress(doses, deltas) if np.unique(doses).size > 1 else None
        out["dose_sweep"] = dict(
            n_positions=len({(r["prompt"], r["position"]) for r in sweep}),
            median_by_dose={float(m): float(np.median(deltas[doses == m])) for m in np.unique(doses)},
            linregress=None if fit is None else dict(slope=float(fit.slope), intercept=float(fit.intercept),
                                                     rvalue=float(fit.rvalue), p_value=float(fit.pvalue)),
        )
    return out


__all__ = ["PAPER_ERASURE", "ErasureOptions", "split_prompts", "preferred_token", "run_erasure", "summarize_erasure"]
