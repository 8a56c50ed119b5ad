"""How close to the native write an atom must be before the model prefers it to deletion.

The substitution test asks whether a dictionary's atom, installed at the native write's Frobenius
norm in place of the write, moves the output less than deleting the write. Its answer mixes two
things: how close the atoms are to the writes (the dictionary) and how the model reads a rank-1
edit of its cache (the model). This module measures the model's part alone, with no dictionary.

At each position ``t`` the native write ``D = s k v^T`` (``||k|| = ||v|| = 1``; every family's write
is rank 1, so its top singular pair is exact) is replaced by an **oracle write** at Frobenius
cosine ``c`` to it and the same norm::

    D_c = s u w^T,   u = sqrt(c) k + sqrt(1 - c) n_k,   w = sqrt(c) v + sqrt(1 - c) n_v

with ``n_k``, ``n_v`` random unit directions orthogonal to ``k`` and ``v`` (the cosine is split
evenly between the key and the value side, ``<D_c, D> / ||D||^2 = c``). ``side="key"`` or
``"value"`` puts the whole deviation on one factor and keeps the other exact (``u = c k +
sqrt(1 - c^2) n_k, w = v``, or the mirror): which side of the write the model is sensitive to.
The **oracle curve** is the fraction of positions where ``D_c`` beats deletion, scored exactly as
the substitution test scores (``KL(p_patched || p_base)`` at ``t + 1`` and at the window's last
position). Where the curve stays
below a target win rate up to a cosine no dictionary reaches at its firings, no dictionary passes
the test on that model; the SAE's own atom-write cosines (``firing_cosines``) sit beside it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from writesae_lens.interventions.engine import KL, Branch, InterventionEngine, replace_write
from writesae_lens.interventions.firings import firing_generator
from writesae_lens.interventions.sites import resolve_site

DEFAULT_COSINES = (0.5, 0.7, 0.8, 0.9, 0.95, 0.99)
Side = Literal["both", "key", "value"]


def _orthogonal_unit(x: Float[Tensor, "d"], generator: torch.Generator) -> Float[Tensor, "d"]:
    """A random unit vector orthogonal to the unit vector ``x``."""
    n = torch.randn(x.shape[0], generator=generator, dtype=x.dtype)
    n = n - (n @ x) * x
    return n / n.norm()


def oracle_writes(
    native: Float[Tensor, "d_k d_v"], cosines: Sequence[float], generator: torch.Generator, side: Side = "both"
) -> Float[Tensor, "cosine d_k d_v"]:
    """Rank-1 writes with the Frobenius norm of the rank-1 ``native`` and Frobenius cosine
    ``cosines[i]`` to it: the cosine split evenly between the key and the value factor, or all on
    ``side`` (module docstring). One pair of noise directions serves every cosine, so the writes
    lie on one path."""
    left, sigma, right = torch.linalg.svd(native.double(), full_matrices=False)
    k, v, s = left[:, 0], right[0], sigma[0]
    n_k, n_v = _orthogonal_unit(k, generator), _orthogonal_unit(v, generator)
    out = []
    for c in cosines:
        if not 0.0 <= c <= 1.0:
            raise ValueError(f"cosines must lie in [0, 1], got {c}.")
        key_cos, value_cos = {"both": (c**0.5, c**0.5), "key": (c, 1.0), "value": (1.0, c)}[side]
        u = key_cos * k + (1.0 - key_cos**2) ** 0.5 * n_k
        w = value_cos * v + (1.0 - value_cos**2) ** 0.5 * n_v
        out.append(s * torch.outer(u, w))
    return torch.stack(out).to(native.dtype)


@torch.no_grad()
def oracle_curve(
    model: Any,
    layer: int,
    head: int,
    tokens: Int[Tensor, "window pos"],
    positions: Sequence[tuple[int, int]],
    cosines: Sequence[float] = DEFAULT_COSINES,
    *,
    side: Side = "both",
    seed: int = 0,
    batch_size: int = 8,
) -> dict[str, Any]:
    """The oracle curve (module docstring) at ``(layer, head)`` over ``positions`` (``(window,
    t)`` pairs; each scored at ``t + 1`` and at its window's last position), the deviation from
    the write on ``side``.

    Returns ``{"n", "side", "cosines", "win_rate": {"last": [...], "next": [...]}, "median_ratio": {...},
    "cosine_for": {"last": {target: c or None}, ...}}``: per cosine, the fraction of positions where
    the oracle write's KL is below deletion's and the median ``KL_oracle / KL_delete``; and the
    smallest tested cosine whose win rate reaches each target (0.5, 0.85)."""
    site = resolve_site(model, None, layer, head)
    positions = sorted({(int(p), int(t)) for p, t in positions})
    length = tokens.shape[1]
    if not positions:
        raise ValueError("oracle_curve needs at least one (window, position) pair.")
    if any(not 0 <= t < length - 1 for _, t in positions):
        raise ValueError(f"positions must satisfy 0 <= t < {length - 1} (a later position must be scored).")
    windows = sorted({p for p, _ in positions})
    _, cache = model.run_with_cache(tokens[windows], names_filter=site.write_hook)
    writes = cache[site.write_hook][:, :, site.head].view(len(windows), length, model.cfg.d_k, model.cfg.d_v).cpu()
    row_of = {p: i for i, p in enumerate(windows)}
    branches = []
    for p, t in positions:
        native = writes[row_of[p], t].double()
        candidates = [torch.zeros_like(native), *oracle_writes(native, cosines, firing_generator(seed, p, t), side)]
        branches += [Branch(p, [replace_write(layer, head, t, write.to(writes.dtype))], scored=sorted({t + 1, length - 1}),
                            end=length - 1) for write in candidates]
    results = InterventionEngine(model).run(tokens, branches, KL(), batch_size)
    per = len(cosines) + 1
    kl = {"next": np.array([float(r.scores["kl"][0]) for r in results]).reshape(len(positions), per),
          "last": np.array([float(r.scores["kl"][-1]) for r in results]).reshape(len(positions), per)}
    summary: dict[str, Any] = {"n": len(positions), "side": side, "cosines": [float(c) for c in cosines],
                               "win_rate": {}, "median_ratio": {}, "cosine_for": {}}
    for where, values in kl.items():
        delete, oracle = values[:, :1], values[:, 1:]
        wins = (oracle < delete).mean(axis=0)
        summary["win_rate"][where] = wins.tolist()
        summary["median_ratio"][where] = np.median(oracle / np.maximum(delete, np.finfo(np.float64).tiny), axis=0).tolist()
        summary["cosine_for"][where] = {
            str(target): next((float(c) for c, w in zip(cosines, wins) if w >= target), None) for target in (0.5, 0.85)
        }
    return summary


def atoms_beside_curve(curve: dict[str, Any], atom_cosines: np.ndarray) -> dict[str, Any]:
    """Where a dictionary's atoms sit on ``curve``: the median of their cosines to the writes they
    replace, and the share at or above the cosine the curve needs for 85% at the window's end."""
    need = curve["cosine_for"]["last"]["0.85"]
    return {"median_cos": float(np.median(atom_cosines)),
            "share_at_needed_cos": float((atom_cosines >= need).mean()) if need is not None else 0.0}


def format_oracle_curve(curve: dict[str, Any]) -> list[str]:
    """Report lines for :func:`oracle_curve` (with ``curve["atoms"]`` from :func:`atoms_beside_curve`
    and ``curve["by_side"]``, the ``win_rate`` of the ``side="key"`` / ``"value"`` curves, when present)."""
    rows = [(label, curve["win_rate"][where]) for where, label in (("last", "window end"), ("next", "t+1"))]
    for side, rates in curve.get("by_side", {}).items():  # the whole deviation on one factor
        rows += [(f"{side} side only, {label}", rates[where]) for where, label in (("last", "end"), ("next", "t+1"))]
    width = max(len(label) for label, _ in rows) + 2
    lines = [f"  oracle rank-1 writes at Frobenius cosine c to the native write, same norm (no SAE; "
             f"{curve['n']} positions): win rate against deletion",
             "  " + "cosine c".ljust(width) + "".join(f"{c:>8.2f}" for c in curve["cosines"])]
    for label, rates in rows:
        lines.append("  " + label.ljust(width) + "".join(f"{100 * w:7.1f}%" for w in rates))
    need = curve["cosine_for"]["last"]["0.85"]
    verdict = (f"an atom needs cosine >= {need:.2f} to its write on most firings to win 85% at the window's end"
               if need is not None else
               f"no tested cosine up to {curve['cosines'][-1]:.2f} wins 85% at the window's end")
    if "atoms" in curve:
        verdict += (f"; this SAE's atoms: median cosine {curve['atoms']['median_cos']:.3f}, "
                    f"{100 * curve['atoms']['share_at_needed_cos']:.1f}% at or above it")
    lines.append(f"  ({verdict})")
    return lines


__all__ = ["DEFAULT_COSINES", "Side", "atoms_beside_curve", "format_oracle_curve", "oracle_curve", "oracle_writes"]
