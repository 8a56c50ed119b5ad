"""Sustained installs during greedy decoding (paper section 4 "Generation edit", Fig. 5, Table 3,
App. I.6 Tables 20-21; docs/method.md section 6).

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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from hooked_ssm import HookedSSM
from writesae_lens.interventions.firings import Site, resolve_site
from writesae_lens.interventions.protocol import describe_options, wilson_ci
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


def install_hooks(
    model: HookedSSM,
    site: Site,
    starts: Sequence[int],
    w_star: Float[Tensor, "rows d_v"],
    multipliers: Sequence[float],
    options: InstallOptions,
) -> list[tuple[str, Callable]]:
    """Hooks that add ``m_r * n_t * u_t w*_r^T`` to row ``r``'s write at absolute positions
    ``starts[r] .. starts[r] + n_positions - 1``, valid across the calls of ``model.generate``
    (they read ``model.current_position_offset``). ``n_t`` is ``||k_t v_t^T||_F`` or the native
    write's norm (``options.norm``), ``u_t`` the unit native key (or query) at ``t``."""
    head = site.head
    d_k = model.cfg.d_k
    captured: dict[str, Tensor] = {}
    strength = _WRITE_STRENGTH.get(model.cfg.layer_types[site.layer])

    def keep(name: str) -> Callable:
        def hook(act: Tensor, hook: object) -> None:
            captured[name] = act[:, :, head].detach()
        return hook

    def write(act: Tensor, hook: object) -> Tensor:
        offset = model.current_position_offset
        for row in range(act.shape[0]):
            for p in range(starts[row], starts[row] + options.n_positions):
                rel = p - offset
                if not 0 <= rel < act.shape[1]:
                    continue
                native = act[row, rel, head].float()
                size = native.norm()
                if options.norm == "kv" and strength is not None:
                    size = size / captured[strength][row, rel].float().clamp(min=1e-12)
                u = captured["hook_write_factors"][row, rel, :d_k] if options.key == "native" else captured["hook_q"][row, rel]
                u = u.float() / u.float().norm().clamp(min=1e-12)
                act[row, rel, head] += (multipliers[row] * size * torch.outer(u, w_star[row].to(u)).flatten()).to(act)
        return act

    leaves = ["hook_write_factors", "hook_q", *([strength] if strength else [])]
    return [*((site.mixer_hook(leaf), keep(leaf)) for leaf in leaves), (site.write_hook, write)]


@torch.no_grad()
def _decode(
    model: HookedSSM, prompts: Int[Tensor, "rows pos"], max_new_tokens: int, hooks: Sequence[tuple[str, Callable]] = ()
) -> tuple[Int[Tensor, "rows new"], Float[Tensor, "rows vocab"]]:
    """Greedy continuation and the first generated step's log-probabilities, with ``hooks`` live."""
    with model.hooks(fwd_hooks=list(hooks)):
        first = model(prompts)[:, -1].double().log_softmax(-1)
        tokens = model.generate(prompts, max_new_tokens=max_new_tokens, do_sample=False, stop_at_eos=False,
                                verbose=False, return_type="tokens")
    return tokens[:, prompts.shape[1]:], first


def _rank_of(logp: Float[Tensor, "rows vocab"], targets: Tensor) -> Tensor:
    return (logp > logp.gather(1, targets[:, None])).sum(-1) + 1


@torch.no_grad()
def run_installs(
    model: HookedSSM,
    contexts: Int[Tensor, "n pos"],
    *,
    layer: int,
    head: int,
    options: InstallOptions = InstallOptions(),
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = True,
) -> tuple[list[dict], dict]:
    """The paper's sweep over ``contexts`` (``[n, pos]``): per context, targets per stratum, each
    crossed with every start position and multiplier. One row per trial."""
    site = resolve_site(model, None, layer, head)
    device = model.cfg.device
    contexts = contexts.to(device)
    generator = torch.Generator().manual_seed(seed)
    starts = start_positions(contexts.shape[1], options)
    native_tokens, native_first = _decode(model, contexts, options.max_new_tokens)
    targets = pick_targets(model, contexts, native_first, options, generator)

    plan = [(c, stratum, target, start, m)
            for stratum in options.strata for c in range(len(contexts)) for target in targets[stratum][c]
            for start in starts for m in options.multipliers]
    rows: list[dict] = []
    bar = tqdm(total=len(plan), disable=not progress, desc="installs")
    for b0 in range(0, len(plan), batch_size):
        chunk = plan[b0 : b0 + batch_size]
        ctx = torch.tensor([c for c, *_ in chunk], device=device)
        tgt = torch.tensor([t for _, _, t, _, _ in chunk], device=device)
        hooks = install_hooks(model, site, [s for *_, s, _ in chunk], target_directions(model, site.layer, site.head, tgt),
                              [m for *_, m in chunk], options)
        tokens, first = _decode(model, contexts[ctx], options.max_new_tokens, hooks)
        included = (tokens == tgt[:, None]).any(-1)
        native_included = (native_tokens[ctx] == tgt[:, None]).any(-1)
        rank, native_rank = _rank_of(first, tgt), _rank_of(native_first[ctx], tgt)
        logp, native_logp = first.gather(1, tgt[:, None])[:, 0], native_first[ctx].gather(1, tgt[:, None])[:, 0]
        for i, (c, stratum, target, start, m) in enumerate(chunk):
            rows.append(dict(
                context=c, stratum=stratum, target=target, start=start, multiplier=float(m),
                included=bool(included[i]), native_included=bool(native_included[i]),
                rank=int(rank[i]), native_rank=int(native_rank[i]),
                logp=float(logp[i]), native_logp=float(native_logp[i]), logp_lift=float(logp[i] - native_logp[i]),
            ))
        bar.update(len(chunk))
    bar.close()
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
                n=n, native_inclusion=native / n, native_ci=wilson_ci(native, n), inclusion=edited / n,
                inclusion_ci=wilson_ci(edited, n), lift_pp=100 * (edited - native) / n,
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
           "pick_targets", "install_hooks", "run_installs", "summarize_installs"]
