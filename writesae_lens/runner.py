"""``WriteSAETrainingRunner``: SAELens's ``LanguageModelSAETrainingRunner`` (its trainer, optimiser,
logging and checkpoint contents unchanged) with what matrix SAEs on HookedSSM sites need around it:

- **site statistics**: before training, one pass over a few prompt batches gives the site's mean
  matrix (installed as ``b_dec`` with ``center=True``) and, for SAEs reading write factors, resolves
  ``write_scale="auto"`` to ``sqrt(d_k d_v) / mean ||k v^T||_F``, what SAELens's
  ``"expected_average_only_in"`` computes on ``hook_write``;
- **the SAE you get back**: ``run()`` returns (and the output folder holds) the ``hook_write`` form of
  an SAE trained on ``hook_write_factors`` (``sae.to_write_site()``); in-training evals (wandb on)
  evaluate that form, head-aware;
- **the paper's recipe** (``recipe=``, :mod:`writesae_lens.recipe`): decoder re-normalisation and
  dead-atom resampling run after each of SAELens's trainer steps on their schedule;
- **crash-safe checkpoints**: SAELens writes a checkpoint's files one by one into its final folder,
  so a crash mid-save leaves a folder that looks like a checkpoint but holds a truncated weights file
  or no trainer state. Here the trainer writes each checkpoint into a hidden staging folder
  (``<checkpoint_path>/.incomplete-<id>/<name>``), and the folder is renamed to
  ``<checkpoint_path>/<name>`` only once every file is written and flushed. The final output folder
  gets the same treatment (files renamed in, ``cfg.json`` last). On SIGINT/SIGTERM SAELens saves only
  the activation store's state under the checkpoint name; here that becomes a full checkpoint.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from jaxtyping import Float
from sae_lens import LanguageModelSAETrainingRunner
from sae_lens.constants import SAE_CFG_FILENAME
from sae_lens.training.activations_store import ActivationsStore
from torch import Tensor

from writesae_lens.atomic_io import publish_directory, publish_files
from writesae_lens.evals import install_head_aware_evaluator
from writesae_lens.recipe import RecipeSchedule, SiteCache, TrainingRecipe

STAGING_PREFIX = ".incomplete-"


@torch.no_grad()
def site_statistics(
    batches: Iterable[Float[Tensor, "... d_in"]], factors: tuple[int, int] | None = None, hook: str = "the site"
) -> tuple[Float[Tensor, " dk_dv"], float]:
    """Mean matrix (the paper's ``M``, flattened) and mean Frobenius norm of a site's activations.
    ``factors=(d_k, d_v)``: the batches hold ``[k | v]`` and the statistics are those of the writes
    ``k v^T`` (``sum_t k_t v_t^T = K^T V``, ``||k v^T|| = |k||v|``)."""
    total, norm_total, count = None, 0.0, 0
    for batch in batches:
        acts = batch.flatten(0, -2).double()
        if factors is None:
            batch_sum, norms = acts.sum(0), acts.norm(dim=-1)
        else:
            k, v = acts[:, : factors[0]], acts[:, factors[0] :]
            batch_sum, norms = (k.T @ v).flatten(), k.norm(dim=-1) * v.norm(dim=-1)
        total = batch_sum if total is None else total + batch_sum
        norm_total += norms.sum().item()
        count += acts.shape[0]
    if not count or norm_total == 0:
        raise ValueError(
            f"{hook} is zero on every sampled token: there is nothing to normalise or train on. Check the layer, "
            f"head and dataset."
        )
    return (total / count).float(), norm_total / count


def estimate_site_statistics(
    store: ActivationsStore, n_batches: int = 8, factors: tuple[int, int] | None = None
) -> tuple[torch.Tensor, float]:
    """:func:`site_statistics` over ``n_batches`` prompt batches of the store's model and dataset."""
    batches = (store.get_activations(store.get_batch_tokens()) for _ in range(n_batches))
    return site_statistics(batches, factors, f"The site {store.hook_name} (head {store.hook_head_index})")


class WriteSAETrainingRunner(LanguageModelSAETrainingRunner):
    """SAELens's runner for matrix SAEs on HookedSSM sites (see the module docstring).

    Args (beyond SAELens's ``cfg, override_dataset, override_model, override_sae``):
        center: install the site's mean matrix as ``b_dec`` (inputs centred on ``M``), in the units the
            SAE trains in.
        n_statistics_batches: prompt batches for the mean / ``write_scale`` estimate (without ``site_cache``).
        recipe: the paper's maintenance (decoder re-norm, dead-atom resampling) after SAELens's steps.
        site_cache: the fixed training set ``cfg.cached_activations_path`` belongs to; the site statistics
            are computed on it exactly.
    """

    def __init__(
        self,
        cfg: Any,
        override_dataset: Any = None,
        override_model: Any = None,
        override_sae: Any = None,
        center: bool = False,
        n_statistics_batches: int = 8,
        recipe: TrainingRecipe | None = None,
        site_cache: SiteCache | None = None,
    ):
        super().__init__(cfg, override_dataset=override_dataset, override_model=override_model, override_sae=override_sae)
        self.site_cache = site_cache
        self.schedule = RecipeSchedule(recipe, seed=cfg.seed) if recipe is not None else None
        install_head_aware_evaluator(self)
        self._trainer: Any = None
        self._staging: Path | None = None
        self._checkpoint_base: Path | None = None
        self._prepare_site(center, n_statistics_batches)

    @property
    def reads_write_factors(self) -> bool:
        return bool(getattr(self.sae, "reads_write_factors", False))

    def _prepare_site(self, center: bool, n_batches: int) -> None:
        sae = self.sae
        auto_scale = self.reads_write_factors and sae.cfg.write_scale == "auto"
        center = center and hasattr(sae, "set_input_mean")
        if not (auto_scale or center):
            return
        factors = (sae.cfg.d_k, sae.cfg.d_v) if self.reads_write_factors else None
        if self.site_cache is not None:  # the fixed training set itself, exactly
            mean, mean_norm = site_statistics([self.site_cache.load("train")], factors, self.site_cache.hook_name)
        else:
            mean, mean_norm = estimate_site_statistics(self.activations_store, n_batches, factors)
        if self.reads_write_factors:
            if auto_scale:
                sae.cfg.write_scale = (sae.cfg.d_k * sae.cfg.d_v) ** 0.5 / mean_norm
            scale = sae.write_scale()
        elif sae.cfg.normalize_activations == "expected_average_only_in":
            # SAELens re-estimates its own factor on its own batches (within ~1% of this one).
            scale = sae.cfg.d_in**0.5 / mean_norm
        else:
            scale = 1.0
        if center:
            sae.set_input_mean(mean * scale)
        self.activations_store.reset_input_dataset()

    # ------------------------------------------------------------------ the SAE handed back
    def run(self) -> Any:
        """Train; returns the trained SAE (its ``hook_write`` form when it was trained on the factors)."""
        sae = super().run()
        return sae.to_write_site() if self.reads_write_factors else sae

    def save_final_sae(self, sae: Any, output_path: str, log_feature_sparsity: torch.Tensor | None = None) -> None:
        out = Path(output_path)
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out, prefix=STAGING_PREFIX) as tmp:
            super().save_final_sae(sae, tmp, log_feature_sparsity)
            publish_files(Path(tmp), out, last=SAE_CFG_FILENAME)

    # ------------------------------------------------------------------ crash-safe checkpoints
    def run_trainer_with_interruption_handling(self, trainer: Any) -> Any:
        base = trainer.cfg.checkpoint_path
        self._trainer = trainer
        if base is not None:
            self._checkpoint_base = Path(base)
            self._staging = self._checkpoint_base / f"{STAGING_PREFIX}{uuid.uuid4().hex[:12]}"
            # The trainer writes every checkpoint (periodic, final, interrupted) into the staging folder;
            # save_checkpoint below publishes it once complete.
            trainer.cfg = dataclasses.replace(trainer.cfg, checkpoint_path=str(self._staging))
        if self.schedule is not None:
            trainer.step = _after_each_step(trainer, self.schedule)
        try:
            return super().run_trainer_with_interruption_handling(trainer)
        finally:
            if base is not None:
                trainer.cfg = dataclasses.replace(trainer.cfg, checkpoint_path=base)
            if self._staging is not None:
                shutil.rmtree(self._staging, ignore_errors=True)  # only unpublished (incomplete) folders
            self._trainer = self._staging = self._checkpoint_base = None

    def save_checkpoint(self, checkpoint_path: Path | None) -> None:
        if checkpoint_path is None:
            return
        path = Path(checkpoint_path)
        if self._staging is not None and path.parent == self._staging:
            # Called by the trainer after it wrote the SAE, sparsity and trainer state here.
            super().save_checkpoint(path)
            publish_directory(path, self._checkpoint_base / path.name)  # type: ignore[operator]
        elif self._trainer is not None and self._staging is not None:
            # SAELens's SIGINT/SIGTERM handler: it would save only the activation store's state under
            # this name (no weights). Save a full checkpoint instead (which calls back the branch above).
            self._trainer.save_checkpoint(checkpoint_name=path.name)
        else:
            super().save_checkpoint(path)


def _after_each_step(trainer: Any, schedule: RecipeSchedule) -> Callable[[Tensor], Any]:
    step = trainer.step

    def step_then_maintain(batch: Tensor) -> Any:
        output = step(batch)
        schedule.after_step(trainer, batch)
        return output

    return step_then_maintain


__all__ = ["WriteSAETrainingRunner", "estimate_site_statistics", "site_statistics"]
