"""The substitution test (paper section 2 "replacement protocol", section 3.2, App. J;
docs/method.md, "The substitution test").

For each firing of feature ``i`` (prompt ``c``, position ``t``, layer ``l``, head ``h``) three
patched runs replace the native write ``D_nat(t)`` of head ``h`` at ``t`` only, and the change
propagates to every later position and layer:

- ``atom``: ``D = s * u_i w_i^T`` (feature ``i``'s unit-norm atom);
- ``delete``: ``D = 0``;
- ``random``: ``D = s * R`` with ``R`` a unit-norm random control (``random_control``: a silent
  feature's atom by default, Gaussian rank-1, or an empirical native write; see
  :mod:`writesae_lens.interventions.controls`).

Named options (every report header states them; defaults follow docs/method.md's table):

- ``scale``: ``"native_norm"`` (default, App. J: ``s = ||D_nat(t)||_F``) or ``"coefficient"``
  (section 2: ``s`` = the norm of ``a_i(t)`` times the unit atom);
- ``selection``: ``"feature"`` (default: feature ``i``'s own atom at ``i``'s firings) or
  ``"dominant"`` (the largest code's atom at each position); ``min_firings_per_atom`` (5) and
  ``max_per_atom`` (30) define the population;
- ``random_control``: ``"auto"`` (default: ``"native"`` at Mamba-2 layers, else ``"atom"``),
  ``"atom"``, ``"gaussian"``, ``"native"``;
- ``kl_direction``: ``"patched_base"`` (default, ``KL(p_patched || p_base)``) or
  ``"base_patched"``;
- ``score``: the headline position. ``"last"`` (default): the last position of the window, which
  ends at ``min(t + horizon, L - 1)`` (``horizon=None``: the prompt's end); the next position
  ``t + 1`` is scored too and reported beside it (``kl_*_next``). ``"next"``: ``t + 1`` only;
  ``"mean_after"``: the mean over ``t+1 .. end``; ``"current"``: ``t`` itself.

The atom **wins** when ``KL_atom < KL_delete``; the strict chain is ``KL_atom < KL_delete < KL_random``.

``method="fast"`` (default) runs the branches on the :class:`InterventionEngine` (one prefix walk
per prompt batch, batched branches); ``method="naive"`` re-runs every condition of every firing
from position 0 with ``run_with_hooks``, an independent reference (tested equal to 1e-6 in KL).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from writesae_lens.analysis.report import append_jsonl
from writesae_lens.analysis.stats import (
    bootstrap_ci,
    cluster_bootstrap_ci,
    median_mad,
    paired_cliffs_delta,
    signed_rank_test,
    wilson_interval,
)
from writesae_lens.interventions.atoms import unit_atoms
from writesae_lens.interventions.controls import RandomControl, control_directions, resolve_random_control
from writesae_lens.interventions.engine import KL, Branch, InterventionEngine, as_prompt_list, kl_divergence, replace_write
from writesae_lens.interventions.firings import Firing, Selection, find_firings
from writesae_lens.interventions.sites import Site, resolve_site
from writesae_lens.run_record import ResultsFile, describe_sae, run_record

if TYPE_CHECKING:
    from sae_lens import SAE

    from hooked_ssm import HookedSSM

CONDITIONS: tuple[str, ...] = ("atom", "delete", "random")
# Keyword arguments of the suite that change how fast it runs, not what its rows hold.
_NOT_RECORDED = ("batch_size", "max_rows", "progress", "layer", "head")
Scale = Literal["native_norm", "coefficient"]
Score = Literal["last", "next", "mean_after", "current"]
KLDirection = Literal["patched_base", "base_patched"]
Row = dict[str, object]


# ---------------------------------------------------------------- what is edited and scored
def window_end(t: int, length: int, score: Score, horizon: int | None) -> int:
    """Last position run for a firing at ``t`` in a prompt of ``length`` tokens."""
    if score == "next":
        return t + 1
    if score == "current":
        return t
    return length - 1 if horizon is None else min(t + horizon, length - 1)


def scored_positions(t: int, end: int, score: Score) -> list[int]:
    """The positions scored for the headline (and, with ``"last"``, the next position too)."""
    if score == "last":
        return sorted({t + 1, end}) if end > t else [end]
    if score == "next":
        return [t + 1]
    if score == "mean_after":
        return list(range(t + 1, end + 1))
    if score == "current":
        return [t]
    raise ValueError(f"score must be 'last', 'next', 'mean_after' or 'current', not {score!r}.")


def condition_writes(
    model: HookedSSM,
    sae: SAE,
    site: Site,
    prompts: Sequence[Tensor],
    firings: Sequence[Firing],
    scale: Scale = "native_norm",
    conditions: Sequence[str] = CONDITIONS,
    random_control: str = "atom",
    seed: int = 0,
) -> Float[Tensor, "firing condition dk_dv"]:
    """The replacement write of each condition for each firing, flattened key-major: the unit
    atom (or control) times the scale ``s``; ``delete`` is zero. The random control has the atom
    condition's Frobenius norm."""
    if scale not in ("native_norm", "coefficient"):
        raise ValueError(f"scale must be 'native_norm' or 'coefficient', not {scale!r}.")
    unknown = set(conditions) - set(CONDITIONS)
    if unknown:
        raise ValueError(f"Unknown conditions {sorted(unknown)}; choose from {CONDITIONS}.")
    d_k, d_v = model.cfg.d_k, model.cfg.d_v
    s = torch.tensor([f.native_norm if scale == "native_norm" else f.contribution_norm for f in firings])
    out = torch.zeros(len(firings), len(conditions), d_k * d_v)
    if "atom" in conditions:
        atoms = unit_atoms(sae, torch.tensor([f.atom for f in firings], dtype=torch.long), d_k, d_v).float().cpu()
        out[:, conditions.index("atom")] = s[:, None] * atoms.flatten(1)
    if "random" in conditions:
        directions = control_directions(model, sae, site, prompts, firings, random_control, seed)
        out[:, conditions.index("random")] = s[:, None] * directions
    return out


def _row(f: Firing, kls: Mapping[str, Tensor], scored: Sequence[int], t: int, score: Score, options: Mapping) -> Row:
    """One JSONL row: the firing, the options, ``kl_<condition>`` (headline) and, with
    ``score="last"``, ``kl_<condition>_next`` and ``kl_<condition>_last``."""
    row: Row = f.as_dict()
    row.update(options)
    row["scale"] = f.native_norm if options["scale_mode"] == "native_norm" else f.contribution_norm
    for name, values in kls.items():
        values = values.double()
        if score == "last":
            row[f"kl_{name}"] = float(values[-1])
            row[f"kl_{name}_last"] = float(values[-1])
            if t + 1 in scored:
                row[f"kl_{name}_next"] = float(values[list(scored).index(t + 1)])
        else:
            row[f"kl_{name}"] = float(values.mean())
    if "kl_atom" in row and "kl_delete" in row:
        row["atom_wins"] = bool(row["kl_atom"] < row["kl_delete"])
    if "kl_random" in row and "kl_delete" in row:
        row["delete_beats_random"] = bool(row["kl_delete"] < row["kl_random"])
    if all(f"kl_{c}" in row for c in CONDITIONS):
        row["chain"] = bool(row["kl_atom"] < row["kl_delete"] < row["kl_random"])
    return row


# ---------------------------------------------------------------- the runs
def _fast(model, site, prompts, firings, writes, conditions, ends, scored, kl_direction, max_rows, batch_size):
    """Yield ``(firing index, {condition: KL per scored position})`` as firings complete."""
    branches, owner = [], []
    for i, f in enumerate(firings):
        for c, condition in enumerate(conditions):
            branches.append(Branch(f.prompt, [replace_write(site.layer, site.head, f.position, writes[i, c])],
                                   scored=scored[i], end=ends[i]))
            owner.append((i, condition))
    pending: dict[int, dict[str, Tensor]] = {}
    engine = InterventionEngine(model, max_rows=max_rows)
    for index, results in engine.iter_run(prompts, branches, KL(kl_direction), batch_size):
        for b, result in zip(index, results):
            i, condition = owner[b]
            pending.setdefault(i, {})[condition] = result.scores["kl"]
            if len(pending[i]) == len(conditions):
                yield i, {c: pending[i][c] for c in conditions}
                del pending[i]


@torch.no_grad()
def _naive(model, site, prompts, firings, writes, conditions, ends, scored, kl_direction, max_rows, batch_size):
    """Reference: one ``run_with_hooks`` from position 0 per firing (its conditions as batch rows)."""
    for i, f in enumerate(firings):
        tokens = prompts[f.prompt][None].to(model.cfg.device)
        base = model(tokens)[:, scored[i]]

        def replace(act, hook, i=i, t=f.position):
            act[:, t, site.head] = writes[i].to(act)
            return act

        rows = tokens[:, : ends[i] + 1].expand(len(conditions), -1)
        logits = model.run_with_hooks(rows, fwd_hooks=[(site.write_hook, replace)])[:, scored[i]]
        pair = (logits, base.expand_as(logits)) if kl_direction == "patched_base" else (base.expand_as(logits), logits)
        kls = kl_divergence(*pair).cpu()
        yield i, {c: kls[k] for k, c in enumerate(conditions)}


def substitute_firings(
    model: HookedSSM,
    sae: SAE,
    tokens: Tensor | Sequence[Tensor],
    firings: Sequence[Firing],
    site: Site | None = None,
    scale: Scale = "native_norm",
    score: Score = "last",
    horizon: int | None = None,
    conditions: Sequence[str] = CONDITIONS,
    random_control: RandomControl = "auto",
    kl_direction: KLDirection = "patched_base",
    method: Literal["fast", "naive"] = "fast",
    batch_size: int = 8,
    max_rows: int | None = None,
    seed: int = 0,
    out: str | Path | ResultsFile | None = None,
    progress: bool = True,
) -> list[Row]:
    """Run the patched passes for the given ``firings``; one row per firing (module docstring).
    Rows are appended to ``out`` (JSONL, or a :class:`ResultsFile`) as they complete, each whole."""
    site = site or resolve_site(model, sae)
    conditions = tuple(conditions)
    prompts = as_prompt_list(tokens)
    if kl_direction not in ("patched_base", "base_patched"):
        raise ValueError(f"kl_direction must be 'patched_base' or 'base_patched', not {kl_direction!r}.")
    control = resolve_random_control(model, site, random_control)
    for f in firings:
        if not 0 <= f.prompt < len(prompts) or not 0 <= f.position < len(prompts[f.prompt]) - 1:
            raise ValueError(f"Firing at position {f.position} of prompt {f.prompt}: needs an existing prompt and "
                             "0 <= t < length - 1.")
    ends = [window_end(f.position, len(prompts[f.prompt]), score, horizon) for f in firings]
    scored = [scored_positions(f.position, end, score) for f, end in zip(firings, ends)]
    writes = condition_writes(model, sae, site, prompts, firings, scale, conditions, control, seed)
    options = dict(scale_mode=scale, score=score, horizon=horizon, random_control=control, kl_direction=kl_direction)
    run = {"fast": _fast, "naive": _naive}[method]
    rows: list[Row] = []
    bar = tqdm(total=len(firings), disable=not progress, desc=f"substitution L{site.layer}H{site.head}")
    for i, kls in run(model, site, prompts, firings, writes, conditions, ends, scored, kl_direction, max_rows, batch_size):
        row = _row(firings[i], kls, scored[i], firings[i].position, score, options)
        row["window_end"] = ends[i]
        rows.append(row)
        if isinstance(out, ResultsFile):
            out.append([row])
        elif out is not None:
            append_jsonl(out, [row])
        bar.update(1)
    bar.close()
    return sorted(rows, key=_row_key)


def _row_key(r: Mapping) -> tuple:
    return (r["prompt"], r["position"], r["layer"], r["head"], r["atom"])


def run_substitution_test(
    model: HookedSSM,
    sae: SAE,
    layer: int | None = None,
    head: int | None = None,
    tokens: Tensor | Sequence[Tensor] | None = None,
    *,
    firings: Sequence[Firing] | None = None,
    scale: Scale = "native_norm",
    score: Score = "last",
    horizon: int | None = None,
    conditions: Sequence[str] = CONDITIONS,
    random_control: RandomControl = "auto",
    kl_direction: KLDirection = "patched_base",
    selection: Selection = "feature",
    min_firings_per_atom: int = 5,
    max_per_atom: int | None = 30,
    max_firings: int | None = None,
    min_position: int = 1,
    atoms: Iterable[int] | None = None,
    method: Literal["fast", "naive"] = "fast",
    batch_size: int = 8,
    max_rows: int | None = None,
    seed: int = 0,
    out: str | Path | ResultsFile | None = None,
    resume: bool = False,
    progress: bool = True,
    provenance: Mapping[str, object] | None = None,
) -> tuple[list[Row], dict[str, object]]:
    """The paper's substitution test of ``sae`` at ``(layer, head)`` over ``tokens``.

    Args:
        tokens: token windows, ``[n, pos]`` or a list of 1-D tensors (prompt ids are their indices).
        firings: evaluate these instead of finding them (see :func:`find_firings`).
        scale, score, horizon, conditions, random_control, kl_direction, method: module docstring.
        selection, min_firings_per_atom, max_per_atom, max_firings, min_position, atoms, seed:
            which firings (see :mod:`writesae_lens.interventions.firings`); ``min_firings_per_atom``
            also defines the population test's atoms.
        out: JSONL file that receives one row per firing as it completes, headed by the run's
            record (model, SAE and its weights' hash, site, seed, settings, tokens, versions;
            :mod:`writesae_lens.run_record`); started afresh unless ``resume``.
        resume: skip the firings already in ``out``; refused (``ResumeMismatchError`` naming the
            differing settings) when ``out`` was made by another run.
        provenance: more settings to record with the run (e.g. the command line's arguments).

    Returns:
        ``(rows, summary)``: one dict per firing (``prompt``, ``position``, ``atom``, ``kl_atom``,
        ``kl_delete``, ``kl_random``, ``atom_wins``, ``chain``, ...) and :func:`summarize_substitution`.
    """
    if tokens is None:
        raise ValueError("Pass tokens= (token windows, e.g. from writesae_lens.interventions.token_windows).")
    site = resolve_site(model, sae, layer, head)
    selected = "given" if firings is not None else selection
    atoms = None if atoms is None else sorted(int(a) for a in atoms)
    control = resolve_random_control(model, site, random_control)
    options = dict(scale_mode=scale, score=score, random_control=control, kl_direction=kl_direction)
    # Explicit firings are not recorded: a row depends on its firing and these settings only, so a
    # resume may add firings (e.g. continue with a longer list).
    settings = dict(options, horizon=horizon, conditions=list(conditions), selection=selection,
                    min_firings_per_atom=min_firings_per_atom, max_per_atom=max_per_atom, max_firings=max_firings,
                    min_position=min_position, atoms=atoms, method=method, **(provenance or {}))
    record = run_record("substitution", settings, model=model, sae=sae, seed=seed, tokens=as_prompt_list(tokens),
                        site=dict(layer=site.layer, head=site.head, kind=site.kind))
    previous: list[Row] = []
    if out is not None:  # opened first: a mismatched resume fails before any work
        out = out if isinstance(out, ResultsFile) else ResultsFile(out, record, resume)
        previous = [r for r in out.previous_rows if (r["layer"], r["head"]) == (site.layer, site.head)]
    if firings is None:
        firings = find_firings(model, sae, tokens, site, selection=selection, min_firings_per_atom=min_firings_per_atom,
                               max_per_atom=max_per_atom, max_firings=max_firings, min_position=min_position,
                               atoms=atoms, batch_size=batch_size, seed=seed)
    done = {_row_key(r) for r in previous}
    firings = [f for f in firings if f.key not in done]
    rows = substitute_firings(model, sae, tokens, firings, site, scale, score, horizon, conditions, control,
                              kl_direction, method, batch_size, max_rows, seed, out, progress)
    rows = sorted(previous + rows, key=_row_key)
    summary = summarize_substitution(rows, min_firings_per_atom=min_firings_per_atom, seed=seed)
    summary["config"] = dict(layer=site.layer, head=site.head, site=site.kind, **options, horizon=horizon,
                             selection=selected,
                             min_firings_per_atom=min_firings_per_atom, max_per_atom=max_per_atom)
    summary["population"]["max_firings_per_atom"] = max_per_atom
    summary["run"] = record
    return rows, summary


def run_substitution_suite(
    model: HookedSSM,
    saes: Sequence[SAE],
    tokens: Tensor | Sequence[Tensor],
    *,
    out: str | Path | None = None,
    resume: bool = False,
    **kwargs: object,
) -> tuple[list[Row], dict[str, object]]:
    """:func:`run_substitution_test` for several SAEs (e.g. the paper's L1 / L9 / L17 H4) on the
    same tokens; rows of all sites together (one JSONL file when ``out`` is given, resumable), and
    one summary with ``per_layer`` rows."""
    record = run_record("substitution_suite", {k: v for k, v in kwargs.items() if k not in _NOT_RECORDED},
                        model=model, seed=kwargs.get("seed", 0), tokens=as_prompt_list(tokens))
    record["saes"] = [describe_sae(sae) for sae in saes]
    results = None if out is None else ResultsFile(out, record, resume)
    rows: list[Row] = []
    summary: dict[str, object] = {}
    for sae in saes:
        site = resolve_site(model, sae, kwargs.get("layer"), kwargs.get("head"))
        site_kwargs = {k: v for k, v in kwargs.items() if k not in ("layer", "head")}
        site_rows, summary = run_substitution_test(model, sae, site.layer, site.head, tokens, out=results,
                                                   **site_kwargs)
        rows += [r for r in site_rows if (r["layer"], r["head"]) == (site.layer, site.head)]
    config = {k: v for k, v in summary.get("config", {}).items() if k not in ("layer", "head")}
    summary = summarize_substitution(rows, min_firings_per_atom=int(kwargs.get("min_firings_per_atom", 5)),
                                     seed=int(kwargs.get("seed", 0)))
    summary["config"] = dict(sites=sorted({(r["layer"], r["head"]) for r in rows}), **config)
    summary["population"]["max_firings_per_atom"] = kwargs.get("max_per_atom", 30)
    summary["run"] = record
    return rows, summary


# ---------------------------------------------------------------- summary
def _win_stats(atom: np.ndarray, delete: np.ndarray) -> dict[str, object]:
    wins = atom < delete
    return dict(n=int(wins.size), wins=int(wins.sum()), win_rate=float(wins.mean()),
                win_ci=wilson_interval(int(wins.sum()), wins.size))


def summarize_substitution(
    rows: Sequence[Mapping[str, object]],
    min_firings_per_atom: int = 5,
    n_boot: int = 2000,
    seed: int = 0,
    per_layer: bool = True,
) -> dict[str, object]:
    """The paper's statistics of the rows (docs/method.md, "Substitution report"):

    ``win_rate`` / ``win_ci`` (Wilson 95%) of ``KL_atom < KL_delete``; ``win_ci_prompt_bootstrap``
    (prompts resampled, ``scipy.stats.bootstrap``); ``chain_rate``; ``median_kl`` ± MAD/sqrt(n);
    ``ratio_of_medians``; ``wilcoxon``: the one-sided signed-rank test of ``KL_atom < KL_delete``
    (``scipy.stats.wilcoxon``, ``alternative="less"``); ``paired_cliffs_delta``: ``P(atom < delete)
    - P(atom > delete)`` over the pairs; ``population``: the mean over features with
    ``>= min_firings_per_atom`` firings of their win rates, bootstrap 95% CI over features;
    ``next_position`` (with ``score="last"``): the win statistics at ``t + 1``."""
    n = len(rows)
    summary: dict[str, object] = {"n": n, "population": {"n_atoms": 0, "min_firings_per_atom": min_firings_per_atom}}
    if n == 0:
        return summary
    conditions = [c for c in CONDITIONS if f"kl_{c}" in rows[0]]
    kl = {c: np.array([r[f"kl_{c}"] for r in rows], dtype=float) for c in conditions}
    summary["median_kl"], summary["median_kl_se"] = {}, {}
    for c in conditions:
        summary["median_kl"][c], summary["median_kl_se"][c] = median_mad(kl[c])
    if "atom" in kl:
        base = summary["median_kl"]["atom"]
        summary["ratio_of_medians"] = {c: summary["median_kl"][c] / base if base > 0 else float("nan") for c in conditions}
    if "atom" in kl and "delete" in kl:
        wins = kl["atom"] < kl["delete"]
        summary.update(_win_stats(kl["atom"], kl["delete"]))
        summary["win_ci_prompt_bootstrap"] = cluster_bootstrap_ci(wins.astype(float), [r["prompt"] for r in rows],
                                                                  n_resamples=n_boot, seed=seed)
        summary["wilcoxon"] = dict(signed_rank_test(kl["atom"], kl["delete"], alternative="less"),
                                   hypothesis="kl_atom < kl_delete")
        summary["paired_cliffs_delta"] = paired_cliffs_delta(kl["delete"], kl["atom"])
        by_atom: dict[int, list[bool]] = {}
        for r, win in zip(rows, wins):
            by_atom.setdefault(int(r["atom"]), []).append(bool(win))
        alive = {a: float(np.mean(w)) for a, w in by_atom.items() if len(w) >= min_firings_per_atom}
        rates = np.array(list(alive.values()))
        summary["population"] = dict(
            n_atoms=len(alive), min_firings_per_atom=min_firings_per_atom,
            mean_win_rate=float(rates.mean()) if rates.size else float("nan"),
            ci=bootstrap_ci(rates, n_resamples=n_boot, seed=seed) if rates.size else (float("nan"), float("nan")),
        )
        if "kl_atom_next" in rows[0] and "kl_delete_next" in rows[0]:
            with_next = [r for r in rows if "kl_atom_next" in r]
            summary["next_position"] = _win_stats(np.array([r["kl_atom_next"] for r in with_next]),
                                                  np.array([r["kl_delete_next"] for r in with_next]))
        if per_layer:
            layers: dict[int, list[int]] = {}
            for i, r in enumerate(rows):
                layers.setdefault(int(r["layer"]), []).append(i)
            summary["per_layer"] = {layer: _win_stats(kl["atom"][idx], kl["delete"][idx]) for layer, idx in sorted(layers.items())}
    if set(CONDITIONS) <= set(conditions):
        chain = (kl["atom"] < kl["delete"]) & (kl["delete"] < kl["random"])
        summary["chain_rate"] = float(chain.mean())
        summary["chain_ci"] = wilson_interval(int(chain.sum()), n)
        summary["delete_beats_random_rate"] = float((kl["delete"] < kl["random"]).mean())
    return summary


__all__ = [
    "CONDITIONS",
    "window_end",
    "scored_positions",
    "condition_writes",
    "substitute_firings",
    "run_substitution_test",
    "run_substitution_suite",
    "summarize_substitution",
]
