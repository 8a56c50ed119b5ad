"""The substitution test (paper section 2 "replacement protocol", section 3.2, App. J; METHOD.md section 4).

For each firing (prompt ``c``, position ``t``, layer ``l``, head ``h``, dominant atom ``j``) three
patched forward passes replace the native write ``D_nat(t) = b_t k_t v_t^T`` of head ``h`` at ``t``
only, and let the change propagate to every later position and layer:

- ``atom``: ``D = s * u_j w_j^T`` (unit-norm atom);
- ``delete``: ``D = 0``;
- ``random``: ``D = s * r q^T`` with fresh Gaussian unit directions ``r, q`` (same Frobenius
  norm as the atom condition; seeded by the firing alone, so it is reproducible).

``scale="native_norm"`` (default, App. J) sets ``s = ||D_nat(t)||_F``; ``scale="coefficient"``
(section 2) sets ``s`` to the Frobenius norm of the atom's decoded contribution, ``a_j(t)`` times its
unit form. Each condition is scored by ``KL(p_patched || p_base)`` of the next-token distribution:

- ``score="last"`` (default): at the last position of the evaluated window. The window ends at
  ``min(t + horizon, L - 1)``; ``horizon=None`` (default) means the end of the prompt;
- ``score="next"``: at position ``t + 1`` (the first position whose input token comes after the
  edited write; its distribution predicts token ``t + 2``);
- ``score="mean_after"``: the mean over positions ``t+1 .. window end``;
- ``score="current"``: at position ``t`` itself (the read right after the edited write; it
  predicts token ``t + 1``).

The atom **wins** when ``KL_atom < KL_delete``; the strict chain is ``KL_atom < KL_delete < KL_random``.

**Fast path** (``method="fast"``, default). The prompt's unpatched prefix ``0..t-1`` is run once
(incrementally, with a ``RecurrentState``), and every condition continues from a copy of that
state over positions ``t..window end`` only. The conditions of one firing, and the firings of
different prompts at the same position, share one batched forward. Each condition starts from
its own copy of the state, so results do not depend on the order or grouping of conditions.
``method="naive"`` re-runs the prefix for each firing (``run_with_hooks`` on ``0..window end``);
the two agree to float32 round-off (tested to 1e-6 in KL).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from hooked_ssm.state import RecurrentState
from writesae_lens.analysis.report import append_jsonl, format_summary_table, read_jsonl
from writesae_lens.analysis.stats import (
    bootstrap_ci,
    cliffs_delta,
    cluster_bootstrap_ci,
    median_mad,
    wilcoxon_signed_rank,
    wilson_interval,
)
from writesae_lens.interventions.firings import (
    Firing,
    Site,
    as_prompt_list,
    branch_logits,
    continue_run,
    find_firings,
    firing_generator,
    prompt_batches,
    random_rank1,
    resolve_site,
    unit_atoms,
    write_replacement_hook,
)

CONDITIONS: tuple[str, ...] = ("atom", "delete", "random")
Scale = Literal["native_norm", "coefficient"]
Score = Literal["last", "next", "mean_after", "current"]


# ---------------------------------------------------------------- pieces
def kl_divergence(logits_p: Float[Tensor, "... vocab"], logits_q: Float[Tensor, "... vocab"]) -> Tensor:
    """``KL(p || q)`` of the softmax distributions, computed in float64."""
    log_p = F.log_softmax(logits_p.double(), dim=-1)
    log_q = F.log_softmax(logits_q.double(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def window_end(t: int, length: int, score: Score, horizon: int | None) -> int:
    """Last position run for a firing at ``t`` in a prompt of ``length`` tokens."""
    if score == "next":
        return t + 1
    if score == "current":
        return t
    return length - 1 if horizon is None else min(t + horizon, length - 1)


def scored_positions(t: int, end: int, score: Score) -> list[int]:
    if score == "last":
        return [end]
    if score == "next":
        return [t + 1]
    if score == "mean_after":
        return list(range(t + 1, end + 1))
    if score == "current":
        return [t]
    raise ValueError(f"score must be 'last', 'next', 'mean_after' or 'current', not {score!r}.")


def condition_writes(
    firings: Sequence[Firing],
    sae: Any,
    d_k: int,
    d_v: int,
    scale: Scale = "native_norm",
    conditions: Sequence[str] = CONDITIONS,
    seed: int = 0,
) -> Float[Tensor, "firing condition dk_dv"]:
    """The replacement write of each condition for each firing, flattened key-major."""
    if scale not in ("native_norm", "coefficient"):
        raise ValueError(f"scale must be 'native_norm' or 'coefficient', not {scale!r}.")
    unknown = set(conditions) - set(CONDITIONS)
    if unknown:
        raise ValueError(f"Unknown conditions {sorted(unknown)}; choose from {CONDITIONS}.")
    s = torch.tensor([f.native_norm if scale == "native_norm" else f.contribution_norm for f in firings])
    out = torch.zeros(len(firings), len(conditions), d_k * d_v)
    if "atom" in conditions:
        atoms = unit_atoms(sae, torch.tensor([f.atom for f in firings]), d_k, d_v).float().cpu()
        out[:, conditions.index("atom")] = (s[:, None, None] * atoms).flatten(1)
    if "random" in conditions:
        rand = torch.stack([random_rank1(d_k, d_v, firing_generator(seed, *f.key)) for f in firings])
        out[:, conditions.index("random")] = (s[:, None, None] * rand).flatten(1)
    return out


def _row(f: Firing, kls: Sequence[float], conditions: Sequence[str], scale: str, s: float, score: str, end: int) -> dict[str, Any]:
    row: dict[str, Any] = f.as_dict()
    row.update(scale_mode=scale, scale=s, score=score, window_end=end)
    for name, kl in zip(conditions, kls):
        row[f"kl_{name}"] = float(kl)
    if "atom" in conditions and "delete" in conditions:
        row["atom_wins"] = bool(row["kl_atom"] < row["kl_delete"])
    if "random" in conditions and "delete" in conditions:
        row["delete_beats_random"] = bool(row["kl_delete"] < row["kl_random"])
    if set(CONDITIONS) <= set(conditions):
        row["chain"] = bool(row["kl_atom"] < row["kl_delete"] < row["kl_random"])
    return row


# ---------------------------------------------------------------- the runs
@torch.no_grad()
def _fast_batch(model, site, prompt_tokens, rows_of, firings_of, writes_of, base_logits, score, horizon, max_rows, n_cond):
    """Yield ``(firings, kl [n, n_cond], end)`` per position group of one equal-length batch.

    The prefix advances incrementally from one firing position to the next (all prompts of the
    batch at once); each group's branch is its rows of that state, repeated once per condition:
    one hooked step at ``t`` (the replaced write), then a plain continuation to the window end.
    """
    length = prompt_tokens.shape[1]
    state = RecurrentState.empty(model.cfg.layer_types)
    done = 0
    per_chunk = max(1, max_rows // n_cond)
    for t in sorted(rows_of):
        continue_run(model, prompt_tokens[:, done:t], state, return_type=None)
        done = t
        end = window_end(t, length, score, horizon)
        positions = scored_positions(t, end, score)
        members = rows_of[t]
        for start in range(0, len(members), per_chunk):
            chunk = members[start : start + per_chunk]
            batch_rows = torch.tensor(chunk).repeat_interleave(n_cond)
            writes = torch.cat([writes_of[t][i] for i in range(start, start + len(chunk))])
            hook = write_replacement_hook(site.head, 0, writes)
            # Only the scored positions are unembedded.
            logits = branch_logits(model, site, prompt_tokens, state, batch_rows, t, end, hook, positions=positions)
            base = base_logits[batch_rows][:, positions]
            kl = kl_divergence(logits, base).mean(-1).view(len(chunk), n_cond)
            yield [firings_of[t][i] for i in range(start, start + len(chunk))], kl.cpu(), end


@torch.no_grad()
def _naive_batch(model, site, prompt_tokens, rows_of, firings_of, writes_of, base_logits, score, horizon, max_rows, n_cond):
    """Reference: one full ``run_with_hooks`` from position 0 per firing (conditions batched)."""
    length = prompt_tokens.shape[1]
    for t in sorted(rows_of):
        end = window_end(t, length, score, horizon)
        positions = scored_positions(t, end, score)
        for i, row in enumerate(rows_of[t]):
            hook = write_replacement_hook(site.head, t, writes_of[t][i])
            tokens = prompt_tokens[row : row + 1, : end + 1].expand(n_cond, -1).to(model.cfg.device)
            logits = model.run_with_hooks(tokens, fwd_hooks=[(site.write_hook, hook)])
            base = base_logits[row : row + 1, positions].expand(n_cond, -1, -1)
            kl = kl_divergence(logits[:, positions], base).mean(-1).view(1, n_cond)
            yield [firings_of[t][i]], kl.cpu(), end


def substitute_firings(
    model: Any,
    sae: Any,
    tokens: Tensor | Sequence[Tensor],
    firings: Sequence[Firing],
    site: Site | None = None,
    scale: Scale = "native_norm",
    score: Score = "last",
    horizon: int | None = None,
    conditions: Sequence[str] = CONDITIONS,
    method: Literal["fast", "naive"] = "fast",
    batch_size: int = 8,
    max_rows: int = 48,
    seed: int = 0,
    out: str | Path | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Run the patched passes for the given ``firings``; one row per firing (see module docstring).

    Rows are appended to ``out`` (JSONL) as they complete. ``max_rows`` caps the batch rows of one
    patched forward (conditions x firings).
    """
    site = site or resolve_site(model, sae)
    conditions = tuple(conditions)
    prompts = as_prompt_list(tokens)
    d_k, d_v = model.cfg.d_k, model.cfg.d_v
    run_batch = {"fast": _fast_batch, "naive": _naive_batch}[method]
    by_prompt: dict[int, list[Firing]] = {}
    for f in firings:
        if f.position >= len(prompts[f.prompt]) - 1 or f.position < 0:
            raise ValueError(f"Firing at position {f.position} of prompt {f.prompt}: needs 0 <= t < length - 1.")
        by_prompt.setdefault(f.prompt, []).append(f)
    rows: list[dict[str, Any]] = []
    bar = tqdm(total=len(firings), disable=not progress, desc=f"substitution L{site.layer}H{site.head}")
    for ids, batch in prompt_batches(prompts, batch_size, ids=sorted(by_prompt)):
        with torch.no_grad():
            base_logits = model(batch.to(model.cfg.device))
        rows_of: dict[int, list[int]] = {}
        firings_of: dict[int, list[Firing]] = {}
        for row, prompt in enumerate(ids):
            for f in by_prompt[prompt]:
                rows_of.setdefault(f.position, []).append(row)
                firings_of.setdefault(f.position, []).append(f)
        writes_of = {t: list(condition_writes(fs, sae, d_k, d_v, scale, conditions, seed)) for t, fs in firings_of.items()}
        for group, kl, end in run_batch(model, site, batch, rows_of, firings_of, writes_of, base_logits, score, horizon, max_rows, len(conditions)):
            new = [
                _row(f, kl[i].tolist(), conditions, scale, f.native_norm if scale == "native_norm" else f.contribution_norm, score, end)
                for i, f in enumerate(group)
            ]
            rows += new
            if out is not None:
                append_jsonl(out, new)
            bar.update(len(new))
    bar.close()
    return rows


def run_substitution_test(
    model: Any,
    sae: Any,
    layer: int | None = None,
    head: int | None = None,
    tokens: Tensor | Sequence[Tensor] | None = None,
    *,
    firings: Sequence[Firing] | None = None,
    scale: Scale = "native_norm",
    score: Score = "last",
    horizon: int | None = None,
    conditions: Sequence[str] = CONDITIONS,
    method: Literal["fast", "naive"] = "fast",
    min_position: int = 1,
    atoms: Iterable[int] | None = None,
    max_firings: int | None = None,
    max_per_atom: int | None = None,
    batch_size: int = 8,
    max_rows: int = 48,
    seed: int = 0,
    out: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    min_firings_per_atom: int = 1,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The paper's substitution test of ``sae`` at ``(layer, head)`` over ``tokens``.

    Args:
        tokens: token windows, ``[n, pos]`` or a list of 1-D tensors (prompt ids are their indices).
        firings: evaluate these instead of finding them (see :func:`find_firings`).
        scale, score, horizon, conditions, method: see the module docstring.
        min_position, atoms, max_firings, max_per_atom, seed: firing selection (seeded subsample).
        out: JSONL file that receives one row per firing as it completes (truncated first
            unless ``resume``).
        resume: skip the firings already in ``out`` and return them with the new ones.
        min_firings_per_atom: atoms with fewer firings are left out of the population test.

    Returns:
        ``(rows, summary)``: one dict per firing (ids, ``kl_atom``, ``kl_delete``, ``kl_random``,
        ``atom_wins``, ``chain``, ...) and :func:`summarize_substitution` of all rows.
    """
    if tokens is None:
        raise ValueError("Pass tokens= (token windows, e.g. from writesae_lens.interventions.token_windows).")
    site = resolve_site(model, sae, layer, head)
    if firings is None:
        firings = find_firings(model, sae, tokens, site, batch_size, min_position, atoms, max_firings, max_per_atom, seed)
    previous: list[dict[str, Any]] = []
    if out is not None:
        out = Path(out)
        if resume and out.exists():
            previous = read_jsonl(out)
            clash = [r for r in previous if (r.get("scale_mode"), r.get("score")) != (scale, score)]
            if clash:
                raise ValueError(
                    f"{out} holds rows run with scale={clash[0].get('scale_mode')!r}, score={clash[0].get('score')!r}; "
                    f"cannot resume with scale={scale!r}, score={score!r}. Use another out= file."
                )
            done = {(r["prompt"], r["position"], r["layer"], r["head"]) for r in previous}
            firings = [f for f in firings if f.key not in done]
            # Rewrite the file with the complete rows only (drops a partial last line).
            out.write_text("")
            append_jsonl(out, previous)
        else:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text("")
    rows = substitute_firings(
        model, sae, tokens, firings, site, scale, score, horizon, conditions, method, batch_size, max_rows, seed, out, progress
    )
    rows = sorted(previous + rows, key=lambda r: (r["prompt"], r["position"], r["layer"], r["head"]))
    summary = summarize_substitution(rows, min_firings_per_atom=min_firings_per_atom, seed=seed)
    summary["config"] = dict(layer=site.layer, head=site.head, site=site.kind, scale=scale, score=score,
                             horizon=horizon)
    return rows, summary


def run_substitution_suite(
    model: Any,
    saes: Sequence[Any],
    tokens: Tensor | Sequence[Tensor],
    *,
    out: str | Path | None = None,
    resume: bool = False,
    **kwargs: Any,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """:func:`run_substitution_test` for several SAEs (e.g. the paper's L1 / L9 / L17 H4) on the
    same tokens; rows of all sites together (one JSONL file when ``out`` is given, resumable), and
    one summary with ``per_layer`` rows."""
    if out is not None and not resume:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text("")
    rows: list[dict[str, Any]] = []
    for sae in saes:
        site = resolve_site(model, sae, kwargs.get("layer"), kwargs.get("head"))
        site_kwargs = {k: v for k, v in kwargs.items() if k not in ("layer", "head")}
        site_rows, _ = run_substitution_test(model, sae, site.layer, site.head, tokens, out=out, resume=out is not None,
                                             **site_kwargs)
        rows += [r for r in site_rows if (r["layer"], r["head"]) == (site.layer, site.head)]
    summary = summarize_substitution(rows, min_firings_per_atom=kwargs.get("min_firings_per_atom", 1),
                                     seed=kwargs.get("seed", 0))
    summary["config"] = dict(sites=sorted({(r["layer"], r["head"]) for r in rows}),
                             scale=kwargs.get("scale", "native_norm"), score=kwargs.get("score", "last"))
    return rows, summary


# ---------------------------------------------------------------- summary
def summarize_substitution(
    rows: Sequence[Mapping[str, Any]],
    min_firings_per_atom: int = 1,
    n_boot: int = 2000,
    seed: int = 0,
    per_layer: bool = True,
) -> dict[str, Any]:
    """Win rate (Wilson CI, cluster bootstrap by atom), strict-chain rate, median KLs +- MAD/sqrt(n),
    ratio of medians, paired Wilcoxon (atom vs delete), Cliff's delta (delete vs atom: > 0 when the
    atom's KL is lower) and the per-atom population test (mean over alive atoms of their win rate,
    bootstrap CI over atoms)."""
    n = len(rows)
    summary: dict[str, Any] = {"n": n}
    if n == 0:
        return summary
    conditions = [c for c in CONDITIONS if f"kl_{c}" in rows[0]]
    kl = {c: np.array([r[f"kl_{c}"] for r in rows], dtype=float) for c in conditions}
    summary["median_kl"], summary["median_kl_se"] = {}, {}
    for c in conditions:
        summary["median_kl"][c], summary["median_kl_se"][c] = median_mad(kl[c])
    if "atom" in kl:
        base = summary["median_kl"]["atom"]
        summary["ratio_of_medians"] = {c: (summary["median_kl"][c] / base if base > 0 else math.nan) for c in conditions}
    if "atom" in kl and "delete" in kl:
        wins = kl["atom"] < kl["delete"]
        summary["wins"] = int(wins.sum())
        summary["win_rate"] = float(wins.mean())
        summary["win_ci"] = wilson_interval(int(wins.sum()), n)
        atoms = [r["atom"] for r in rows]
        summary["win_ci_cluster"] = cluster_bootstrap_ci(wins.astype(float), atoms, n_resamples=n_boot, seed=seed)
        summary["wilcoxon"] = wilcoxon_signed_rank(kl["atom"], kl["delete"])
        summary["cliffs_delta"] = cliffs_delta(kl["delete"], kl["atom"])
        by_atom: dict[int, list[bool]] = {}
        for atom, win in zip(atoms, wins):
            by_atom.setdefault(int(atom), []).append(bool(win))
        alive = {a: float(np.mean(w)) for a, w in by_atom.items() if len(w) >= min_firings_per_atom}
        rates = np.array(list(alive.values()))
        summary["population"] = dict(
            n_atoms=len(alive),
            mean_win_rate=float(rates.mean()) if rates.size else math.nan,
            ci=bootstrap_ci(rates, n_resamples=n_boot, seed=seed) if rates.size else (math.nan, math.nan),
            min_firings_per_atom=min_firings_per_atom,
        )
        if per_layer:
            layers: dict[int, list[bool]] = {}
            for r, win in zip(rows, wins):
                layers.setdefault(int(r["layer"]), []).append(bool(win))
            summary["per_layer"] = {
                layer: dict(n=len(w), win_rate=float(np.mean(w)), win_ci=wilson_interval(int(np.sum(w)), len(w)))
                for layer, w in sorted(layers.items())
            }
    if set(CONDITIONS) <= set(conditions):
        chain = (kl["atom"] < kl["delete"]) & (kl["delete"] < kl["random"])
        summary["chain_rate"] = float(chain.mean())
        summary["chain_ci"] = wilson_interval(int(chain.sum()), n)
        summary["delete_beats_random_rate"] = float((kl["delete"] < kl["random"]).mean())
    return summary


__all__ = [
    "CONDITIONS",
    "kl_divergence",
    "condition_writes",
    "substitute_firings",
    "run_substitution_test",
    "run_substitution_suite",
    "summarize_substitution",
    "format_summary_table",
]
