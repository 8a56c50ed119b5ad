"""Firings: where the substitution test substitutes which atom (docs/method.md, "Firings").

A **firing** of feature ``i`` is a position ``t`` where its TopK code ``a_i(t)`` is non-zero. The
paper's test (AUDIT item 5) iterates, per feature ``i``, the positions where ``i`` fires and
substitutes ``i``'s own atom there: one position can be a firing of several features.
``selection="dominant"`` (the authors' pseudocode) keeps instead one firing per position, its
largest code's atom.

Population defaults (the paper's): features with at least ``min_firings_per_atom = 5`` firings,
at most ``max_per_atom = 30`` firings each (a seeded subsample). With ``max_firings`` the budget
is filled feature by feature (features in a seeded random order, each with all its capped
firings), so every tested feature keeps enough firings for the per-feature population test.

Each firing also carries its **control atom**: a feature of the same dictionary that does not fire
at ``t``, drawn with a generator seeded by the firing alone (the default random control).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from writesae_lens.interventions.atoms import contribution_norms
from writesae_lens.interventions.engine import as_prompt_list, prompt_batches
from writesae_lens.interventions.observe import observe_site
from writesae_lens.interventions.sites import Site, resolve_site

if TYPE_CHECKING:
    from sae_lens import SAE

    from hooked_ssm import HookedSSM

Selection = Literal["feature", "dominant"]


@dataclass
class Firing:
    """One evaluated firing: prompt ``prompt``, position ``position``, feature ``atom`` with code
    value ``coefficient``; ``contribution_norm`` is that atom's decoded Frobenius norm there (the
    "coefficient" scale) and ``native_norm`` the native write's Frobenius norm (the "native_norm"
    scale); ``control_atom`` a feature that does not fire at ``position`` (None: not known)."""

    prompt: int
    position: int
    layer: int
    head: int
    atom: int
    coefficient: float
    contribution_norm: float
    native_norm: float
    control_atom: int | None = None

    @property
    def key(self) -> tuple[int, int, int, int, int]:
        return (self.prompt, self.position, self.layer, self.head, self.atom)

    def as_dict(self) -> dict[str, int | float | None]:
        return dataclasses.asdict(self)


def firing_generator(seed: int, *key: int) -> torch.Generator:
    """A generator seeded by ``(seed, *key)`` alone, so a firing's random draws do not depend on the
    batch it was evaluated in, the order of conditions, or whether the run was resumed."""
    digest = hashlib.blake2b(repr((seed, *key)).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))


def _control_atom(codes_t: Float[Tensor, "d_sae"], seed: int, key: tuple[int, ...]) -> int | None:
    """A uniformly drawn feature whose code at this position is zero (rejection sampling: TopK
    codes leave almost every feature silent)."""
    generator = firing_generator(seed, *key, 1)
    for _ in range(256):
        j = int(torch.randint(0, codes_t.numel(), (1,), generator=generator))
        if codes_t[j] == 0:
            return j
    return None


def batch_firings(
    prompt_ids: Sequence[int],
    codes: Float[Tensor, "batch pos d_sae"],
    write_norm: Float[Tensor, "batch pos"],
    sae: SAE,
    site: Site,
    selection: Selection = "feature",
    min_position: int = 1,
    atoms: Iterable[int] | None = None,
    seed: int = 0,
) -> list[Firing]:
    """Firings of one observed batch at positions ``min_position .. L-2`` (the last position has
    no later output to score). ``atoms`` keeps only those features."""
    codes = codes[:, : codes.shape[1] - 1].cpu()
    codes[:, :min_position] = 0
    if selection == "dominant":
        values, index = codes.max(dim=-1)
        dominant = torch.zeros_like(codes)
        dominant.scatter_(-1, index[..., None], values[..., None])
        candidates = dominant
    elif selection == "feature":
        candidates = codes
    else:
        raise ValueError(f"selection must be 'feature' or 'dominant', not {selection!r}.")
    if atoms is not None:
        keep = torch.zeros(codes.shape[-1], dtype=torch.bool)
        keep[list(atoms)] = True
        candidates = candidates * keep
    row, pos, atom = torch.nonzero(candidates > 0, as_tuple=True)
    coefficient = codes[row, pos, atom]
    contribution = contribution_norms(sae, coefficient, atom).cpu()
    out = []
    for i in range(row.numel()):
        r, t, a = int(row[i]), int(pos[i]), int(atom[i])
        key = (int(prompt_ids[r]), t, site.layer, site.head, a)
        out.append(Firing(*key, float(coefficient[i]), float(contribution[i]), float(write_norm[r, t]),
                          _control_atom(codes[r, t], seed, key)))
    return out


def select_population(
    firings: Sequence[Firing],
    min_firings_per_atom: int = 5,
    max_per_atom: int | None = 30,
    max_firings: int | None = None,
    seed: int = 0,
) -> list[Firing]:
    """The paper's population: features with ``>= min_firings_per_atom`` firings, at most
    ``max_per_atom`` each (seeded subsample); with ``max_firings``, whole features in a seeded
    random order until the budget is full (the last one truncated only if it keeps
    ``min_firings_per_atom``). Sorted by ``(prompt, position, atom)``."""
    generator = torch.Generator().manual_seed(seed)
    by_atom: dict[int, list[Firing]] = {}
    for f in firings:
        by_atom.setdefault(f.atom, []).append(f)
    eligible = sorted(a for a, group in by_atom.items() if len(group) >= min_firings_per_atom)
    chosen: list[Firing] = []
    for j in torch.randperm(len(eligible), generator=generator).tolist():
        group = by_atom[eligible[j]]
        if max_per_atom is not None and len(group) > max_per_atom:
            group = [group[i] for i in sorted(torch.randperm(len(group), generator=generator)[:max_per_atom].tolist())]
        if max_firings is not None:
            room = max_firings - len(chosen)
            if room < max(min_firings_per_atom, 1):
                break
            group = group[:room]
        chosen += group
    return sorted(chosen, key=lambda f: (f.prompt, f.position, f.atom))


@torch.no_grad()
def find_firings(
    model: HookedSSM,
    sae: SAE,
    tokens: Tensor | Sequence[Tensor],
    site: Site | None = None,
    *,
    selection: Selection = "feature",
    min_firings_per_atom: int = 5,
    max_per_atom: int | None = 30,
    max_firings: int | None = None,
    min_position: int = 1,
    atoms: Iterable[int] | None = None,
    batch_size: int = 8,
    seed: int = 0,
) -> list[Firing]:
    """The firings the substitution test evaluates (see the module docstring): one observing
    pass per prompt batch, then :func:`select_population`. A fixed function of the inputs and
    ``seed``, so a resumed run selects the same firings."""
    site = site or resolve_site(model, sae)
    prompts = as_prompt_list(tokens)
    found: list[Firing] = []
    for ids, batch in prompt_batches(prompts, batch_size):
        seen = observe_site(model, batch, site, sae, logits=False)
        found += batch_firings(ids, seen["codes"], seen["write_norm"], sae, site, selection, min_position, atoms, seed)
    return select_population(found, min_firings_per_atom, max_per_atom, max_firings, seed)


__all__ = ["Selection", "Firing", "firing_generator", "batch_firings", "select_population", "find_firings"]
