"""Sustained installs during greedy decoding (paper section 4 "Generation edit", Fig. 5, Table 3,
App. I.6 Tables 20-21; docs/method.md, "Cache interventions").

A trial writes the direction ``u w*_T^T`` (``w*_T`` the unit value-side direction that raises
token ``T``, see :mod:`~writesae_lens.interventions.sign_prediction`; ``u`` the unit native key
``k_t`` by default) into the head's cache at **three consecutive prompt positions**
``start, start+1, start+2``, added to the native write with magnitude ``m * ||k_t v_t^T||_F`` at each
(``norm="kv"``: the paper's unscaled outer product, App. I.6; ``norm="write"``: ``||D_nat(t)||_F``,
which is ``beta_t ||k_t v_t^T||`` on Gated DeltaNet and ``dt_t ||B_t x_t^T||`` on Mamba-2), then
decodes ``max_new_tokens`` = 20 tokens greedily. The metric is **target inclusion**: ``T`` appears
at least once in the continuation. Also reported: the first generated step's log-probability lift
and rank shift of ``T``.

The paper's sweep is 30 prompts x 5 start positions x 8 targets x 3 magnitudes (m = 1.5, 3, 6):
per prompt two targets in each of four strata, each crossed with the five starts (300 trials per
stratum and magnitude, 1,200 pooled). The strata are defined by the unmodified model's ranking of
the token at the first generated step and by the vocabulary the token comes from:

- ``frequent``: among the most frequent tokens of the given text (``frequent_share`` of the
  vocabulary), out of context (absent from the prompt) and ranked at least ``out_of_context_rank``
  (paper ~17,000);
- ``mid``: ranked within ``mid_ranks`` (paper 100-1000);
- ``rare``: never seen in the given text and ranked at least ``rare_rank`` (paper 10,000);
- ``semantic``: the ``semantic_size`` nearest tokens (cosine of unembedding columns) to
  ``semantic_seed``, out of context and ranked at least ``out_of_context_rank``.

Rank thresholds scale with the vocabulary (``rank_scale="vocab"``: times ``d_vocab / 151,936``,
the paper's tokenizer; ``"absolute"`` keeps the paper's numbers): on the toy models (4,096 tokens)
the mid stratum is ranks 3-27 and the out-of-context threshold 458. A context without an eligible
token in a stratum contributes no trial there (counted in the summary's ``skipped``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from hooked_ssm import HookedSSM
from writesae_lens.interventions.engine import Branch, Edit, install
from writesae_lens.analysis.stats import wilson_interval
from writesae_lens.interventions.observe import observe_site
from writesae_lens.interventions.protocol import describe_options, run_branches
from writesae_lens.interventions.sites import Site, resolve_site
from writesae_lens.interventions.sign_prediction import target_directions

#: The paper's tokenizer size (Qwen3.5, "152K BPE"): rank thresholds scale by ``d_vocab / PAPER_VOCAB``.
PAPER_VOCAB = 151_936

#: The paper's numbers (Qwen3.5-0.8B L9 H4; Table 3, App. I.6 Tables 20-21).
PAPER_INSTALLS: dict[str, object] = {
    "label": "paper (Qwen3.5-0.8B L9 H4)",
    "per_stratum_n": 300, "pooled_n": 1200, "native_pooled_inclusion": 0.083,
    "pooled_inclusion": {1.5: 0.167, 3.0: 0.25, 6.0: 0.167},
    "at_m3": {
        "frequent": {"edited": 0.0, "native": 0.0, "median_rank_shift": 17526},
        "mid": {"edited": 1.0, "native": 0.333, "median_rank_shift": 517},
        "rare": {"edited": 0.0, "native": 0.0, "median_rank_shift": 16800},
        "semantic": {"edited": 0.0, "native": 0.0, "median_rank_shift": 4039},
    },
    "rank_improved_m3": 0.774, "first_step_logp_lift_m3": 1.27, "non_monotone": True,
}

STRATA = ("frequent", "mid", "rare", "semantic")

#: Which hook holds the scalar that multiplies ``k v^T`` in the native write, per mixer type.
_WRITE_STRENGTH = {"gated_deltanet": "hook_beta", "mamba2": "hook_dt"}


@dataclass(frozen=True)
class InstallOptions:
    """The choices the paper leaves open, with this project's defaults (stated in every report)."""

    multipliers: tuple[float, ...] = (1.5, 3.0, 6.0)
    norm: Literal["kv", "write"] = "kv"
    n_positions: int = 3
    n_starts: int = 5
    starts: Literal["tail", "spread"] = "tail"
    targets_per_stratum: int = 2
    strata: tuple[str, ...] = STRATA
    key: Literal["native", "query"] = "native"
    max_new_tokens: int = 20
    rank_scale: Literal["vocab", "absolute"] = "vocab"
    mid_ranks: tuple[int, int] = (100, 1000)
    out_of_context_rank: int = 17_000
    rare_rank: int = 10_000
    frequent_share: float = 0.01
    semantic_seed: str | int = " number"
    semantic_size: int = 64

    def __post_init__(self) -> None:
        if unknown := set(self.strata) - set(STRATA):
            raise ValueError(f"Unknown strata {sorted(unknown)}; choose among {STRATA}.")
        if self.norm not in ("kv", "write"):
            raise ValueError(f"norm must be 'kv' (m ||k v^T||, the paper's) or 'write' (m ||beta k v^T||), not {self.norm!r}.")
        if self.key not in ("native", "query"):
            raise ValueError(f"key must be 'native' or 'query', not {self.key!r}.")

    def ranks(self, d_vocab: int) -> dict[str, int]:
        """The rank thresholds for a vocabulary of ``d_vocab`` tokens (1-based ranks)."""
        scale = d_vocab / PAPER_VOCAB if self.rank_scale == "vocab" else 1.0
        at = lambda r: max(1, math.ceil(r * scale))  # noqa: E731
        return dict(mid_lo=at(self.mid_ranks[0]), mid_hi=at(self.mid_ranks[1]), out_of_context=at(self.out_of_context_rank),
                    rare=at(self.rare_rank))


def start_positions(length: int, options: InstallOptions, min_position: int = 1) -> list[int]:
    """The ``n_starts`` first positions of the installs in a prompt of ``length`` tokens: the
    latest ones (``"tail"``: the last install ends at the last prompt token) or evenly spread."""
    last = length - options.n_positions
    if last - min_position + 1 < options.n_starts:
        raise ValueError(f"A prompt of {length} tokens has fewer than {options.n_starts} starts for "
                         f"{options.n_positions} consecutive installs; use longer prompts.")
    if options.starts == "tail":
        return list(range(last - options.n_starts + 1, last + 1))
    return sorted({int(round(x)) for x in np.linspace(min_position, last, options.n_starts)})


def semantic_class(model: HookedSSM, seed: str | int, size: int) -> Int[Tensor, "size"]:
    """The ``size`` tokens whose unembedding columns are closest (cosine) to ``seed``'s."""
    if isinstance(seed, str):
        ids = model.to_tokens(seed, prepend_bos=False)[0]
        if ids.numel() == 0:
            raise ValueError(f"semantic_seed {seed!r} tokenizes to nothing; pass another word or a token id.")
        seed = int(ids[0])
    unembed = model.W_U.detach().float()
    unembed = unembed / unembed.norm(dim=0, keepdim=True).clamp(min=1e-12)
    return (unembed.T @ unembed[:, seed]).topk(min(size, unembed.shape[1])).indices.cpu()


def pick_targets(
    model: HookedSSM,
    contexts: Int[Tensor, "n pos"],
    first_step: Float[Tensor, "n vocab"],
    options: InstallOptions,
    generator: torch.Generator,
) -> dict[str, list[list[int]]]:
    """Per stratum, per context, ``targets_per_stratum`` distinct tokens drawn among the eligible
    ones (fewer when fewer are eligible)."""
    d_vocab = first_step.shape[-1]
    thresholds = options.ranks(d_vocab)
    counts = torch.bincount(contexts.flatten().cpu(), minlength=d_vocab)
    frequent = torch.zeros(d_vocab, dtype=torch.bool)
    frequent[counts.topk(max(1, round(options.frequent_share * d_vocab))).indices] = True
    frequent &= counts > 0
    semantic = torch.zeros(d_vocab, dtype=torch.bool)
    if "semantic" in options.strata:
        semantic[semantic_class(model, options.semantic_seed, options.semantic_size)] = True
    rank = first_step.argsort(dim=-1, descending=True).argsort(dim=-1).cpu() + 1  # 1-based rank of each token
    out: dict[str, list[list[int]]] = {s: [] for s in options.strata}
    for c in range(len(contexts)):
        absent = torch.ones(d_vocab, dtype=torch.bool)
        absent[contexts[c].cpu()] = False
        far = absent & (rank[c] >= thresholds["out_of_context"])
        eligible = {
            "frequent": frequent & far,
            "mid": (rank[c] >= thresholds["mid_lo"]) & (rank[c] <= thresholds["mid_hi"]),
            "rare": (counts == 0) & absent & (rank[c] >= thresholds["rare"]),
            "semantic": semantic & far,
        }
        for stratum in options.strata:
            pool = torch.nonzero(eligible[stratum]).flatten()
            pick = torch.randperm(pool.numel(), generator=generator)[: options.targets_per_stratum]
            out[stratum].append(sorted(pool[pick].tolist()))
    return out


@torch.no_grad()
def observe_installs(model: HookedSSM, site: Site, contexts: Int[Tensor, "n pos"], options: InstallOptions) -> dict[str, Tensor]:
    """What the installs' sizes and key sides need from the unmodified run, per context and position:
    ``"size"`` (``||k_t v_t^T||_F`` or the native write's norm) and ``"key"`` (the unit native key
    or query). An install at layer ``l`` cannot change what layer ``l`` computes from its input, so
    these are also the values inside the edited run."""
    strength = _WRITE_STRENGTH.get(model.cfg.layer_types[site.layer])
    leaves = ("hook_write_factors", "hook_q", *([strength] if strength else []))
    seen = observe_site(model, contexts, site, leaves=leaves, logits=False)
    size = seen["write_norm"].float()
    if options.norm == "kv" and strength is not None:
        size = size / seen[strength].float().clamp(min=1e-12)
    key = seen["hook_write_factors"][..., : model.cfg.d_k] if options.key == "native" else seen["hook_q"]
    key = key.float() / key.float().norm(dim=-1, keepdim=True).clamp(min=1e-12)
    return dict(size=size.cpu(), key=key.cpu())


def install_edits(
    site: Site, observed: Mapping[str, Tensor], context: int, start: int, w_star: Float[Tensor, "d_v"], multiplier: float,
    n_positions: int,
) -> list[Edit]:
    """``multiplier * size_t * u_t w*^T`` added to the write at ``start .. start + n_positions - 1``."""
    positions = list(range(start, start + n_positions))
    deltas = [multiplier * observed["size"][context, t] * torch.outer(observed["key"][context, t], w_star.float().cpu())
              for t in positions]
    return install(site.layer, site.head, positions, deltas)


@dataclass
class TargetRank:
    """Engine scorer for decoding steps: log-probability and 1-based rank of ``targets[branch]``."""

    targets: Int[Tensor, "branch"]
    needs_base: bool = False

    def __call__(self, patched: Tensor, base: Tensor | None, branch: Tensor, position: Tensor) -> dict[str, Tensor]:
        logp = patched.double().log_softmax(-1)
        mine = logp.gather(1, self.targets.to(logp.device)[branch, None])
        return {"logprob": mine[:, 0], "rank": (logp > mine).sum(-1) + 1}


@torch.no_grad()
def run_installs(
    model: HookedSSM,
    contexts: Int[Tensor, "n pos"],
    *,
    layer: int,
    head: int,
    options: InstallOptions = InstallOptions(),
    batch_size: int = 8,
    seed: int = 0,
    progress: bool = True,
) -> tuple[list[dict], dict]:
    """The paper's sweep over ``contexts`` (``[n, pos]``): per context, targets per stratum, each
    crossed with every start position and multiplier, plus one unedited continuation per context.
    One row per trial."""
    site = resolve_site(model, None, layer, head)
    contexts = contexts.to(model.cfg.device)
    generator = torch.Generator().manual_seed(seed)
    starts = start_positions(contexts.shape[1], options)
    first_step = model(contexts)[:, -1].double().log_softmax(-1)
    targets = pick_targets(model, contexts, first_step, options, generator)
    observed = observe_installs(model, site, contexts, options)

    plan = [(c, stratum, target, start, m)
            for stratum in options.strata for c in range(len(contexts)) for target in targets[stratum][c]
            for start in starts for m in options.multipliers]
    target_ids = sorted({t for _, _, t, _, _ in plan})
    w_star = dict(zip(target_ids, target_directions(model, site.layer, site.head, torch.tensor(target_ids, dtype=torch.long))))
    branches = [Branch(c, [], generate=options.max_new_tokens) for c in range(len(contexts))]  # unedited
    branches += [Branch(c, install_edits(site, observed, c, start, w_star[target], m, options.n_positions),
                        generate=options.max_new_tokens) for c, _, target, start, m in plan]
    scorer = TargetRank(torch.tensor([0] * len(contexts) + [t for _, _, t, _, _ in plan]))
    done = run_branches(model, list(contexts), branches, scorer, batch_size, progress, "installs")
    native = done[: len(contexts)]
    rows: list[dict] = []
    for (c, stratum, target, start, m), result in zip(plan, done[len(contexts):]):
        logp, native_logp = float(result.generated_scores["logprob"][0]), float(first_step[c, target])
        rows.append(dict(
            context=c, stratum=stratum, target=target, start=start, multiplier=float(m),
            included=bool((result.generated == target).any()), native_included=bool((native[c].generated == target).any()),
            rank=int(result.generated_scores["rank"][0]), native_rank=int((first_step[c] > first_step[c, target]).sum() + 1),
            logp=logp, native_logp=native_logp, logp_lift=logp - native_logp,
        ))
    summary = summarize_installs(rows, options)
    summary["skipped"] = {s: sum(options.targets_per_stratum - len(t) for t in targets[s]) for s in options.strata}
    summary["config"] = dict(dataclasses.asdict(options), layer=site.layer, head=site.head, n_contexts=len(contexts),
                             starts=starts, thresholds=options.ranks(model.cfg.d_vocab))
    return rows, summary


def summarize_installs(rows: Sequence[Mapping], options: InstallOptions = InstallOptions()) -> dict:
    """Per stratum (and pooled) and multiplier: n, native and edited inclusion (Wilson 95% CIs
    from scipy), lift in points, share of trials whose first-step rank improved, median rank
    shift (native - edited), median first-step log-prob lift; and whether the pooled inclusion is
    non-monotone in ``m`` (with the best ``m``)."""
    groups: dict[str, dict[float, list[Mapping]]] = {}
    for r in rows:
        for name in (r["stratum"], "pooled"):
            groups.setdefault(name, {}).setdefault(r["multiplier"], []).append(r)
    strata: dict[str, dict[float, dict]] = {}
    for name, by_m in groups.items():
        strata[name] = {}
        for m, group in sorted(by_m.items()):
            n = len(group)
            edited = sum(r["included"] for r in group)
            native = sum(r["native_included"] for r in group)
            strata[name][m] = dict(
                n=n, native_inclusion=native / n, native_ci=wilson_interval(native, n), inclusion=edited / n,
                inclusion_ci=wilson_interval(edited, n), lift_pp=100 * (edited - native) / n,
                rank_improved=float(np.mean([r["rank"] < r["native_rank"] for r in group])),
                median_rank_shift=float(np.median([r["native_rank"] - r["rank"] for r in group])),
                median_logp_lift=float(np.median([r["logp_lift"] for r in group])),
            )
    pooled = [strata.get("pooled", {})[m]["inclusion"] for m in sorted(strata.get("pooled", {}))]
    steps = np.diff(pooled)
    ms = sorted(strata.get("pooled", {}))
    return dict(
        variant=describe_options(options), strata=strata,
        non_monotone=bool(len(steps) > 1 and (steps > 0).any() and (steps < 0).any()),
        best_multiplier=None if not pooled else ms[int(np.argmax(pooled))],
    )


__all__ = ["PAPER_INSTALLS", "PAPER_VOCAB", "STRATA", "InstallOptions", "start_positions", "semantic_class",
           "pick_targets", "observe_installs", "install_edits", "TargetRank", "run_installs", "summarize_installs"]
