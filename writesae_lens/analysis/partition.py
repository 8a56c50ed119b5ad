"""Register / bundle partition of a dictionary's atoms (paper section 3.1, Figure 2a; METHOD.md section 7).

For every alive atom ``i`` (at least ``min_firings`` firings), the **median cosine** between the
atom (``u_i w_i^T``) and the native write ``D_nat(t) = b_t k_t v_t^T`` over its firing positions
``t`` (code ``a_i(t) > 0``). A two-component 1-D Gaussian mixture on those medians is compared with
the one-component null by BIC (scikit-learn's ``GaussianMixture`` and its ``bic``;
``delta_bic = BIC(2) - BIC(1)``, negative favours two classes).
**Registers** are the atoms assigned to the high-cosine component (their decoded direction matches
a native rank-1 write); **bundles** are the other alive atoms; the rest are dead ("null"). When
the null wins (``delta_bic >= 0``) there are no registers (``partitioned=False``).

The cosine is signed by default (TopK codes are positive, so an atom that reproduces the write
has cosine near +1); ``absolute=True`` uses ``|cos|``, and ``transform="log"`` fits the mixture on
``log |median cos|`` (the paper plots the register axis on a log scale).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from sklearn.mixture import GaussianMixture

from writesae_lens.analysis.report import format_partition_table

if TYPE_CHECKING:
    from sae_lens import SAE

    from hooked_ssm import HookedSSM


@torch.no_grad()
def atom_write_cosines(
    sae: SAE, codes: Tensor, writes: Tensor, d_k: int, d_v: int, dominant_only: bool = False, chunk: int = 512
) -> tuple[np.ndarray, np.ndarray]:
    """``(atoms, cosines)`` for every active ``(position, atom)`` pair of ``codes [n, d_sae]``:
    the cosine between the atom and the native write ``writes [n, d_k*d_v]`` at that position."""
    codes = codes.reshape(-1, codes.shape[-1])
    writes = writes.reshape(-1, writes.shape[-1]).float()
    rank1 = hasattr(sae, "atoms") and hasattr(sae, "U_dec")
    if rank1:
        U, W = (x.float().to(writes.device) for x in sae.atoms())
    else:
        flat = sae.W_dec.detach().float().to(writes.device)
        flat = flat / flat.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    k = 1 if dominant_only else max(int((codes > 0).sum(-1).max()), 1)
    atoms_out, cos_out = [], []
    for start in range(0, codes.shape[0], chunk):
        c = codes[start : start + chunk].to(writes.device)
        values, index = c.topk(k, dim=-1)
        D = writes[start : start + chunk]
        norm = D.norm(dim=-1).clamp(min=1e-30)
        if rank1:
            mats = D.view(-1, d_k, d_v)
            dots = ((mats @ W[index].transpose(1, 2)) * U[index].transpose(1, 2)).sum(1)  # [n, k]
        else:
            dots = (flat[index] * D[:, None, :]).sum(-1)
        cos = dots / norm[:, None]
        keep = (values > 0) & (norm[:, None] > 1e-30)
        atoms_out.append(index[keep].cpu().numpy())
        cos_out.append(cos[keep].cpu().numpy())
    return np.concatenate(atoms_out), np.concatenate(cos_out)


@torch.no_grad()
def register_bundle_partition(
    model: HookedSSM,
    sae: SAE,
    tokens: Tensor | Sequence[Tensor],
    layer: int | None = None,
    head: int | None = None,
    *,
    min_firings: int = 5,
    absolute: bool = False,
    transform: Literal["none", "log"] = "none",
    dominant_only: bool = False,
    min_position: int = 0,
    batch_size: int = 8,
    seed: int = 0,
    progress: bool = True,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Partition the atoms of ``sae`` into registers / bundles / dead over ``tokens``.

    Returns ``(rows, summary)``: one row per atom (``n_firings``, ``median_cos``, ``cls`` in
    ``{"register", "bundle", "dead"}``, ``p_register``) and the counts, ``delta_bic``, the mixture
    parameters and the mean median-cosine of each class.
    """
    # Imported here: the interventions import the analysis package (its statistics and run records).
    from writesae_lens.interventions.engine import as_prompt_list, prompt_batches
    from writesae_lens.interventions.observe import observe_site
    from writesae_lens.interventions.sites import resolve_site

    site = resolve_site(model, sae, layer, head)
    d_k, d_v = model.cfg.d_k, model.cfg.d_v
    prompts = as_prompt_list(tokens)
    per_atom: dict[int, list[np.ndarray]] = {}
    batches = list(prompt_batches(prompts, batch_size))
    for ids, batch in tqdm(batches, disable=not progress, desc="partition"):
        seen = observe_site(model, batch, site, sae, logits=False)
        codes = seen["codes"][:, min_position:]
        writes = seen["write"][:, min_position:]
        atoms, cos = atom_write_cosines(sae, codes, writes, d_k, d_v, dominant_only)
        order = np.argsort(atoms, kind="stable")
        atoms, cos = atoms[order], cos[order]
        bounds = np.flatnonzero(np.diff(atoms)) + 1
        for group_atoms, group_cos in zip(np.split(atoms, bounds), np.split(cos, bounds)):
            if group_atoms.size:
                per_atom.setdefault(int(group_atoms[0]), []).append(group_cos)
    cosines = {atom: np.concatenate(parts) for atom, parts in per_atom.items()}
    rows, summary = partition_atoms(cosines, sae.cfg.d_sae, min_firings, absolute, transform, seed)
    summary.update(layer=site.layer, head=site.head, site=site.kind)
    return rows, summary


def compare_mixtures(values: np.ndarray, seed: int = 0, n_init: int = 10) -> dict[str, Any]:
    """One- vs two-component 1-D Gaussian mixtures (``sklearn.mixture.GaussianMixture``):
    ``delta_bic = BIC(2) - BIC(1)``, the two-component fit's parameters (components sorted by
    mean) and each value's responsibility of the high component (``p_high``)."""
    x = np.asarray(values, dtype=float).reshape(-1, 1)
    one = GaussianMixture(1, random_state=seed).fit(x)
    two = GaussianMixture(2, n_init=n_init, random_state=seed).fit(x)
    order = np.argsort(two.means_.ravel())
    return dict(
        delta_bic=float(two.bic(x) - one.bic(x)), bic_one=float(one.bic(x)), bic_two=float(two.bic(x)),
        mixture=dict(weights=two.weights_[order].tolist(), means=two.means_.ravel()[order].tolist(),
                     variances=two.covariances_.ravel()[order].tolist()),
        p_high=two.predict_proba(x)[:, order[1]],
    )


def partition_atoms(
    cosines: dict[int, np.ndarray],
    d_sae: int,
    min_firings: int = 5,
    absolute: bool = False,
    transform: Literal["none", "log"] = "none",
    seed: int = 0,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The partition from each atom's firing-level cosines (``{atom: array}``; absent = never fired)."""
    rows: list[dict[str, Any]] = []
    medians: dict[int, float] = {}
    for atom in range(d_sae):
        values = np.asarray(cosines.get(atom, np.zeros(0)), dtype=float)
        if absolute:
            values = np.abs(values)
        med = float(np.median(values)) if values.size else math.nan
        rows.append(dict(atom=atom, n_firings=int(values.size), median_cos=med, cls="dead", p_register=0.0))
        if values.size >= min_firings:
            medians[atom] = med
    summary: dict[str, Any] = dict(
        n_atoms=d_sae, alive=len(medians), dead=d_sae - len(medians), registers=0, bundles=len(medians),
        min_firings=min_firings, absolute=absolute, transform=transform, partitioned=False,
    )
    alive = sorted(medians)
    for atom in alive:
        rows[atom]["cls"] = "bundle"
    if len(alive) >= 3:
        x = np.array([medians[a] for a in alive])
        if transform == "log":
            x = np.log(np.abs(x).clip(min=1e-12))
        fit = compare_mixtures(x, seed=seed)
        partitioned = bool(fit["delta_bic"] < 0)  # the one-component null is kept otherwise
        for atom, p in zip(alive, fit["p_high"]):
            rows[atom]["p_register"] = float(p)
            rows[atom]["cls"] = "register" if (partitioned and p > 0.5) else "bundle"
        summary.update(partitioned=partitioned, **{k: fit[k] for k in ("delta_bic", "bic_one", "bic_two", "mixture")})
    regs = [medians[a] for a in alive if rows[a]["cls"] == "register"]
    buns = [medians[a] for a in alive if rows[a]["cls"] == "bundle"]
    summary.update(
        registers=len(regs), bundles=len(buns),
        register_mean_cos=float(np.mean(regs)) if regs else math.nan,
        bundle_mean_cos=float(np.mean(buns)) if buns else math.nan,
    )
    return rows, summary


__all__ = ["atom_write_cosines", "compare_mixtures", "partition_atoms", "register_bundle_partition", "format_partition_table"]
