"""The substitution test's random control (docs/method.md, "Random control").

Each returns unit-Frobenius-norm directions, one per firing; the test scales them to the atom
condition's norm ("matched norm"). Every draw is seeded by the firing alone (its key and the run's
seed), so it does not depend on batching, the order of conditions or resuming.

- ``"atom"`` (default): the atom of a feature of the same dictionary that does not fire at ``t``
  (the authors' script: "matched-norm atom of a non-firing feature"; :class:`Firing.control_atom`).
- ``"gaussian"``: a fresh rank-1 ``r s^T`` with Gaussian directions (the paper's "fresh atom").
- ``"native"``: a native write drawn from the empirical distribution of native writes at this
  site (a uniformly drawn position of a uniformly drawn prompt): the paper's control for Mamba-2,
  whose writes are not isotropic (AUDIT item 7). ``"auto"`` picks it for Mamba-2 layers and
  ``"atom"`` otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from writesae_lens.interventions.atoms import has_rank1_decoder, unit_atoms
from writesae_lens.interventions.engine import prompt_batches
from writesae_lens.interventions.firings import Firing, firing_generator
from writesae_lens.interventions.observe import observe_site
from writesae_lens.interventions.sites import Site

if TYPE_CHECKING:
    from sae_lens import SAE

    from hooked_ssm import HookedSSM

RandomControl = Literal["auto", "atom", "gaussian", "native"]
RANDOM_CONTROLS: tuple[str, ...] = ("auto", "atom", "gaussian", "native")


def resolve_random_control(model: HookedSSM, site: Site, kind: RandomControl) -> str:
    """``"auto"`` -> ``"native"`` at a Mamba-2 layer, else ``"atom"``."""
    if kind not in RANDOM_CONTROLS:
        raise ValueError(f"random_control must be one of {RANDOM_CONTROLS}, not {kind!r}.")
    if kind != "auto":
        return kind
    return "native" if model.cfg.layer_types[site.layer] == "mamba2" else "atom"


def random_rank1(d_k: int, d_v: int, generator: torch.Generator) -> Float[Tensor, "d_k d_v"]:
    """A fresh random unit-Frobenius-norm rank-1 matrix ``r s^T`` (Gaussian directions)."""
    r = torch.randn(d_k, generator=generator, dtype=torch.float64)
    s = torch.randn(d_v, generator=generator, dtype=torch.float64)
    return torch.outer(r / r.norm(), s / s.norm()).float()


def control_directions(
    model: HookedSSM,
    sae: SAE,
    site: Site,
    prompts: Sequence[Tensor],
    firings: Sequence[Firing],
    kind: str,
    seed: int = 0,
    batch_size: int = 8,
) -> Float[Tensor, "firing dk_dv"]:
    """Unit-norm random-control writes for ``firings`` (``kind`` resolved: atom / gaussian / native)."""
    d_k, d_v = model.cfg.d_k, model.cfg.d_v
    if kind == "gaussian":
        return torch.stack([random_rank1(d_k, d_v, firing_generator(seed, *f.key)).flatten() for f in firings])
    if kind == "atom":
        index = []
        for f in firings:
            if f.control_atom is None:  # a firing built by hand: any other feature, seeded
                n_atoms = (sae.U_dec if has_rank1_decoder(sae) else sae.W_dec).shape[0]
                other = int(torch.randint(0, n_atoms - 1, (1,), generator=firing_generator(seed, *f.key, 1)))
                index.append(other + (other >= f.atom))
            else:
                index.append(f.control_atom)
        return unit_atoms(sae, torch.tensor(index, dtype=torch.long), d_k, d_v).float().cpu().flatten(1)
    if kind == "native":
        return _native_writes(model, site, prompts, firings, seed, batch_size)
    raise ValueError(f"Unknown random control {kind!r}.")


@torch.no_grad()
def _native_writes(model, site, prompts, firings, seed, batch_size) -> Tensor:
    """One native write per firing from a uniformly drawn (prompt, position), unit-normalised."""
    sources = []
    for f in firings:
        generator = firing_generator(seed, *f.key, 2)
        p = int(torch.randint(0, len(prompts), (1,), generator=generator))
        sources.append((p, int(torch.randint(0, len(prompts[p]), (1,), generator=generator))))
    out = torch.zeros(len(firings), model.cfg.d_k * model.cfg.d_v)
    wanted = sorted({p for p, _ in sources})
    for ids, batch in prompt_batches(prompts, batch_size, ids=wanted):
        writes = observe_site(model, batch, site, logits=False)["write"].float().cpu()
        row = {p: r for r, p in enumerate(ids)}
        for i, (p, t) in enumerate(sources):
            if p in row:
                out[i] = writes[row[p], t]
    return out / out.norm(dim=-1, keepdim=True).clamp(min=1e-30)


__all__ = ["RandomControl", "RANDOM_CONTROLS", "resolve_random_control", "random_rank1", "control_directions"]
