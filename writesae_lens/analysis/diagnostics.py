"""Why a substitution test comes out as it does: how much the model reads the head's memory, and
how far the firing atoms are from the writes they replace.

* :func:`state_ablation_kl`: the KL of erasing the head's whole state ``S_t`` at a position
  (``S_t <- 0`` through ``hook_state``; the edit propagates to every later position and layer),
  scored like the substitution test. Near zero, the model does not read that head's memory and no
  edit of one write there can matter.
* :func:`firing_cosines`: the Frobenius cosine between each firing's atom and the native write it
  replaces.
* :func:`linear_response`: the substitution test's outcome against that cosine. To second order
  the KL of a state edit ``delta`` is ``delta^T F delta / 2``; if ``F`` were isotropic, a
  matched-norm atom (``||D|| = ||D_nat||``) would cost ``||D - D_nat||^2 = 2 (1 - cos) ||D_nat||^2``
  against deletion's ``||D_nat||^2``: a predicted ratio ``KL_atom / KL_delete = 2 (1 - cos)``, so
  the atom wins when ``cos > 1/2``. The measured ratio beside it shows how far the model's
  sensitivity is from isotropic.
* :func:`atom_alone_kl` and :func:`model_metric`: the same second-order picture in the model's
  own metric, with no isotropy assumed. One more patched run per firing adds the matched-norm atom
  *on top of* the native write (``KL_add = Q(a)``, the model's sensitivity to the atom alone);
  with ``KL_delete = Q(E)`` and ``KL_atom = Q(a - E)`` the three give the atom's read strength
  ``r = sqrt(Q(a) / Q(E))`` (how much louder the model hears a matched-norm atom than the write it
  replaces) and the model-metric cosine ``rho = (Q(a) + Q(E) - Q(a - E)) / (2 sqrt(Q(a) Q(E)))``.
  The atom wins exactly when ``rho > r / 2``: an atom the model reads as strongly as the write
  (``r = 1``) must align to better than 1/2; a loud atom needs more, and no alignment rescues an
  atom read more than twice as strongly (``rho <= 1``). ``|rho| > 1`` flags where the quadratic
  picture fails (the edit is not small).
* :func:`~writesae_lens.analysis.oracle_curve.oracle_curve`: the model's side alone, with no
  dictionary: how often an oracle rank-1 write at Frobenius cosine ``c`` to the native write (same
  norm) beats deletion, for a range of ``c``; beside it, where this SAE's atoms sit.
* :func:`memory_diagnostics` runs them all; :func:`format_diagnostics` prints them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from jaxtyping import Float, Int
from scipy import stats
from torch import Tensor

from writesae_lens.analysis.oracle_curve import atoms_beside_curve, format_oracle_curve, oracle_curve
from writesae_lens.interventions.atoms import unit_atoms
from writesae_lens.interventions.engine import KL, Branch, InterventionEngine, add_write, kl_divergence
from writesae_lens.interventions.sites import resolve_site

CONDITIONS = ("atom", "delete", "random")


def _state_zeroing_hook(head: int):
    """A ``hook_state`` hook (one selected position) that sets the state of ``head`` to zero."""

    def hook(states: Float[Tensor, "batch 1 head dk_dv"], hook: Any) -> Tensor:
        states[:, 0, head] = 0
        return states

    return hook


@torch.no_grad()
def state_ablation_kl(
    model: Any,
    layer: int,
    head: int,
    tokens: Int[Tensor, "window pos"],
    *,
    positions_per_window: int = 8,
    min_position: int = 8,
    batch_size: int = 16,
    seed: int = 0,
) -> dict[str, Any]:
    """KL(p_ablated || p_base) of setting the whole state of ``(layer, head)`` to zero at random
    positions ``t`` (``positions_per_window`` per window, ``min_position <= t <= pos - 2``),
    scored at ``t + 1`` and at the window's last position (as the substitution test scores).

    Returns ``{"n", "median_next", "median_last", "mean_next", "mean_last", "kl_next", "kl_last"}``
    (the two lists are per ablation, float64 KLs)."""
    site = resolve_site(model, None, layer, head)
    n_windows, length = tokens.shape
    if length - 2 < min_position:
        raise ValueError(f"windows of {length} tokens leave no position >= min_position={min_position}; pass longer windows.")
    g = torch.Generator().manual_seed(seed)
    plan = [(w, int(t)) for w in range(n_windows)
            for t in torch.randint(min_position, length - 1, (positions_per_window,), generator=g)]
    base = model(tokens).double().log_softmax(-1)
    kl_next, kl_last = [0.0] * len(plan), [0.0] * len(plan)
    by_position: dict[int, list[int]] = {}
    for i, (_, t) in enumerate(plan):
        by_position.setdefault(t, []).append(i)
    hook = [(site.mixer_hook("hook_state"), _state_zeroing_hook(site.head))]
    for t, indices in sorted(by_position.items()):
        # One selected position: the state there is replaced and the recurrence continues from it.
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            rows = torch.tensor([plan[i][0] for i in chunk])
            logits = model.run_with_hooks(tokens[rows], fwd_hooks=hook, state_positions=[t]).double()
            for i, kn, kl in zip(chunk, kl_divergence(logits[:, t + 1], base[rows, t + 1]).tolist(),
                                 kl_divergence(logits[:, -1], base[rows, -1]).tolist()):
                kl_next[i], kl_last[i] = kn, kl
    return {
        "n": len(plan),
        "median_next": float(np.median(kl_next)),
        "median_last": float(np.median(kl_last)),
        "mean_next": float(np.mean(kl_next)),
        "mean_last": float(np.mean(kl_last)),
        "kl_next": kl_next,
        "kl_last": kl_last,
    }


@torch.no_grad()
def firing_cosines(model: Any, sae: Any, tokens: Int[Tensor, "window pos"], rows: Sequence[dict[str, Any]]) -> np.ndarray:
    """The Frobenius cosine between each row's atom (``row["atom"]``) and the native write at
    ``(row["prompt"], row["position"])`` (``prompt`` indexes ``tokens``), at the SAE's site."""
    site = resolve_site(model, sae)
    prompts = sorted({int(r["prompt"]) for r in rows})
    _, cache = model.run_with_cache(tokens[prompts], names_filter=site.write_hook)
    writes = cache[site.write_hook][:, :, site.head].float()  # [prompt, pos, dk*dv]
    where = {p: i for i, p in enumerate(prompts)}
    native = torch.stack([writes[where[int(r["prompt"])], int(r["position"])] for r in rows])
    d_k, d_v = model.cfg.d_k, model.cfg.d_v
    atoms = unit_atoms(sae, torch.tensor([int(r["atom"]) for r in rows]), d_k, d_v).float().cpu().flatten(1)
    return (torch.nn.functional.cosine_similarity(atoms, native.cpu(), dim=-1)).numpy()


def linear_response(rows: Sequence[dict[str, Any]], cosines: np.ndarray, n_bins: int = 4) -> dict[str, Any]:
    """The substitution outcome against the atom-write cosine, in ``n_bins`` quantile bins of the
    cosine: win rate, median measured ``KL_atom / KL_delete`` and median predicted ``2 (1 - cos)``;
    overall the Spearman correlation of predicted and measured ratios and how often the predicted
    winner (``cos > 1/2``) is the measured one."""
    if len(rows) != len(cosines) or not rows:
        raise ValueError(f"need one cosine per row (got {len(cosines)} cosines for {len(rows)} rows).")
    kl_atom = np.array([r["kl_atom"] for r in rows], dtype=np.float64)
    kl_delete = np.array([r["kl_delete"] for r in rows], dtype=np.float64)
    wins = kl_atom < kl_delete
    measured = kl_atom / np.maximum(kl_delete, np.finfo(np.float64).tiny)
    predicted = 2.0 * (1.0 - cosines)
    edges = np.quantile(cosines, np.linspace(0, 1, n_bins + 1))
    bin_of = np.clip(np.searchsorted(edges, cosines, side="right") - 1, 0, n_bins - 1)
    bins = []
    for b in range(n_bins):
        sel = bin_of == b
        if not sel.any():
            continue
        bins.append({
            "cos_low": float(edges[b]), "cos_high": float(edges[b + 1]), "n": int(sel.sum()),
            "mean_cos": float(cosines[sel].mean()), "win_rate": float(wins[sel].mean()),
            "median_predicted_ratio": float(np.median(predicted[sel])),
            "median_measured_ratio": float(np.median(measured[sel])),
        })
    rho = stats.spearmanr(predicted, measured).statistic if len(rows) > 2 else float("nan")
    return {
        "n": len(rows),
        "median_cos": float(np.median(cosines)),
        "fraction_cos_above_half": float((cosines > 0.5).mean()),
        "median_predicted_ratio": float(np.median(predicted)),
        "median_measured_ratio": float(np.median(measured)),
        "spearman_predicted_vs_measured": float(rho),
        "predicted_winner_agreement": float(((cosines > 0.5) == wins).mean()),
        "bins": bins,
    }


@torch.no_grad()
def atom_alone_kl(
    model: Any, sae: Any, tokens: Int[Tensor, "window pos"], rows: Sequence[dict[str, Any]], batch_size: int = 8
) -> dict[str, np.ndarray]:
    """``KL_add`` per substitution row: the row's atom, at the row's scale, added to the native
    write at the row's position (the write itself kept), scored at the positions the row was scored
    at (``"next"``: ``t + 1``; ``"last"``: the row's ``window_end``) in the row's KL direction."""
    site = resolve_site(model, sae)
    d_k, d_v = model.cfg.d_k, model.cfg.d_v
    atoms = unit_atoms(sae, torch.tensor([int(r["atom"]) for r in rows], dtype=torch.long), d_k, d_v).float().cpu()
    branches = []
    for r, atom in zip(rows, atoms):
        t, end = int(r["position"]), int(r["window_end"])
        branches.append(Branch(int(r["prompt"]), [add_write(site.layer, site.head, t, float(r["scale"]) * atom)],
                               scored=sorted({t + 1, end}), end=end))
    directions = {r.get("kl_direction", "patched_base") for r in rows}
    if len(directions) != 1:
        raise ValueError(f"rows mix KL directions {sorted(directions)}; pass rows of one run.")
    results = InterventionEngine(model).run(tokens, branches, KL(directions.pop()), batch_size)
    kl_next = [float(res.scores["kl"][0]) for res in results]  # t + 1 is the first scored position
    kl_last = [float(res.scores["kl"][-1]) for res in results]
    return {"next": np.array(kl_next, dtype=np.float64), "last": np.array(kl_last, dtype=np.float64)}


def model_metric(rows: Sequence[dict[str, Any]], kl_add: np.ndarray, suffix: str = "") -> dict[str, Any]:
    """Read strength ``r = sqrt(KL_add / KL_delete)`` and model-metric cosine ``rho`` per row (module
    docstring), from the rows' ``kl_atom{suffix}`` / ``kl_delete{suffix}`` and ``kl_add``."""
    kl_atom = np.array([r[f"kl_atom{suffix}"] for r in rows], dtype=np.float64)
    kl_delete = np.array([r[f"kl_delete{suffix}"] for r in rows], dtype=np.float64)
    # An edit the window's end no longer sees scores a KL of float64 rounding (|KL| ~ 1e-16, either sign).
    kl_add, kl_delete = np.maximum(kl_add, 0.0), np.maximum(kl_delete, 0.0)
    tiny = np.finfo(np.float64).tiny
    strength = np.sqrt(kl_add / np.maximum(kl_delete, tiny))
    rho = (kl_add + kl_delete - kl_atom) / np.maximum(2 * np.sqrt(kl_add * kl_delete), tiny)
    return {
        "n": len(rows),
        "median_read_strength": float(np.median(strength)),
        "fraction_atom_quieter": float((strength < 1).mean()),
        "median_rho": float(np.median(rho)),
        "fraction_rho_above_half": float((rho > 0.5).mean()),
        "fraction_rho_outside_unit": float((np.abs(rho) > 1).mean()),
        "win_rate": float((kl_atom < kl_delete).mean()),
        # what the wins would be if every atom were heard exactly as loudly as its write
        "win_rate_at_equal_strength": float((rho > 0.5).mean()),
    }


def condition_medians(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Median KL of each condition present in ``rows``."""
    return {c: float(np.median([r[f"kl_{c}"] for r in rows])) for c in CONDITIONS if rows and f"kl_{c}" in rows[0]}


def memory_diagnostics(
    model: Any,
    sae: Any,
    tokens: Int[Tensor, "window pos"],
    rows: Sequence[dict[str, Any]],
    *,
    positions_per_window: int = 8,
    seed: int = 0,
) -> dict[str, Any]:
    """Whole-state ablation KL at the SAE's head, median KL per condition, the cosine /
    linear-response table, the model-metric decomposition (at the window's end and at ``t + 1``)
    of the substitution ``rows`` (run on ``tokens`` with ``score="last"``) and the oracle curve at
    the rows' positions."""
    site = resolve_site(model, sae)
    ablation = state_ablation_kl(model, site.layer, site.head, tokens,
                                 positions_per_window=positions_per_window, seed=seed)
    kl_add = atom_alone_kl(model, sae, tokens, rows)
    cosines = firing_cosines(model, sae, tokens, rows)
    positions = [(r["prompt"], r["position"]) for r in rows]
    curve = oracle_curve(model, site.layer, site.head, tokens, positions, seed=seed)
    curve["atoms"] = atoms_beside_curve(curve, cosines)
    curve["by_side"] = {side: oracle_curve(model, site.layer, site.head, tokens, positions, side=side, seed=seed)["win_rate"]
                        for side in ("key", "value")}
    return {
        "layer": site.layer,
        "head": site.head,
        "state_ablation_kl": ablation["median_last"],
        "state_ablation": {k: v for k, v in ablation.items() if not k.startswith("kl_")},
        "median_kl": condition_medians(rows),
        "linear_response": linear_response(rows, cosines),
        "model_metric": {"last": model_metric(rows, kl_add["last"], "_last"),
                         "next": model_metric(rows, kl_add["next"], "_next")},
        "oracle_curve": curve,
    }


def format_diagnostics(diag: dict[str, Any]) -> str:
    """A plain-text report of :func:`memory_diagnostics`."""
    abl, lr = diag["state_ablation"], diag["linear_response"]
    medians = ", ".join(f"{c} {v:.3g}" for c, v in diag["median_kl"].items())
    lines = [
        f"Memory diagnostics, layer {diag['layer']} head {diag['head']}",
        f"  whole-state ablation KL (S_t <- 0; median over {abl['n']} positions): "
        f"{abl['median_last']:.3g} at the window's end, {abl['median_next']:.3g} at t+1",
        f"  median KL per condition: {medians}",
        f"  atom-write cosine: median {lr['median_cos']:.3f}, {100 * lr['fraction_cos_above_half']:.1f}% above 1/2",
        f"  KL_atom/KL_delete: linear response 2(1-cos) predicts {lr['median_predicted_ratio']:.3f} (median), "
        f"measured {lr['median_measured_ratio']:.3f}; Spearman {lr['spearman_predicted_vs_measured']:.3f}; "
        f"predicted winner right on {100 * lr['predicted_winner_agreement']:.1f}%",
        "  cosine bin        n   win rate   2(1-cos)   measured ratio",
    ]
    for b in lr["bins"]:
        lines.append(f"  [{b['cos_low']:+.2f}, {b['cos_high']:+.2f}]  {b['n']:4d}   {100 * b['win_rate']:6.1f}%   "
                     f"{b['median_predicted_ratio']:8.3f}   {b['median_measured_ratio']:8.3f}")
    lines.append("  in the model's own metric (one more run per firing: the atom added on top of the write):")
    lines.append("  scored at     read strength r   atom quieter   cosine rho   rho > 1/2   |rho| > 1   win rate")
    for where, label in (("last", "window end"), ("next", "t+1")):
        m = diag["model_metric"][where]
        lines.append(f"  {label:<12}  {m['median_read_strength']:15.3f}   {100 * m['fraction_atom_quieter']:11.1f}%"
                     f"   {m['median_rho']:+10.3f}   {100 * m['fraction_rho_above_half']:8.1f}%"
                     f"   {100 * m['fraction_rho_outside_unit']:8.1f}%   {100 * m['win_rate']:7.1f}%")
    lines.append("  (medians; the atom wins iff rho > r/2: r = sqrt(KL_add/KL_delete), "
                 "rho = (KL_add + KL_delete - KL_atom) / (2 sqrt(KL_add KL_delete)))")
    if "oracle_curve" in diag:
        lines += format_oracle_curve(diag["oracle_curve"])
    return "\n".join(lines)


__all__ = [
    "atom_alone_kl",
    "condition_medians",
    "firing_cosines",
    "format_diagnostics",
    "linear_response",
    "memory_diagnostics",
    "model_metric",
    "state_ablation_kl",
]
