"""What the cache-intervention protocols (erasure, sign prediction, sustained installs,
amplification) share: the variant line of their report headers, a feature's decoded atom, and how
they hand branches to the intervention engine (:mod:`writesae_lens.interventions.engine`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from sae_lens import SAE
from torch import Tensor
from tqdm.auto import tqdm

from hooked_ssm import HookedSSM
from writesae_lens.interventions.atoms import contribution_norms, unit_atoms
from writesae_lens.interventions.engine import Branch, BranchResult, InterventionEngine, Scorer


def describe_options(options: object) -> str:
    """``name=value, ...`` of a protocol's options dataclass: the variant line of a report header."""
    return ", ".join(f"{f.name}={getattr(options, f.name)!r}" for f in dataclasses.fields(options))


def atom_per_unit_code(sae: SAE, feature: int, d_k: int, d_v: int) -> Float[Tensor, "d_k d_v"]:
    """What the decoder adds per unit of ``feature``'s code, as a key-major ``[d_k, d_v]`` matrix
    (``a * atom_per_unit_code`` is the feature's decoded contribution at code value ``a``)."""
    index = torch.tensor([feature])
    norm = contribution_norms(sae, torch.ones(1), index).float().cpu()
    return (unit_atoms(sae, index, d_k, d_v)[0].float().cpu() * norm).contiguous()


@dataclass
class Reduced:
    """An engine scorer: ``{"value": fn(base_logits, patched_logits, branch)}`` at each scored
    position (float64 logits; ``branch`` holds the caller's branch indices)."""

    fn: Callable[[Float[Tensor, "n vocab"], Float[Tensor, "n vocab"], Int[Tensor, "n"]], Tensor]
    needs_base: bool = True

    def __call__(self, patched: Tensor, base: Tensor | None, branch: Tensor, position: Tensor) -> dict[str, Tensor]:
        return {"value": self.fn(None if base is None else base.double(), patched.double(), branch)}


def run_branches(
    model: HookedSSM, prompts: Sequence[Tensor], branches: Sequence[Branch], scorer: Scorer, batch_size: int = 8,
    progress: bool = False, desc: str = "branches",
) -> list[BranchResult]:
    """``InterventionEngine(model).run(...)`` with a progress bar; results in branch order."""
    results: list[BranchResult | None] = [None] * len(branches)
    with tqdm(total=len(branches), disable=not progress, desc=desc) as bar:
        for index, done in InterventionEngine(model).iter_run(prompts, branches, scorer, batch_size):
            for i, result in zip(index, done):
                results[i] = result
            bar.update(len(index))
    return results  # type: ignore[return-value]
