"""Thin helpers that train matrix SAEs with SAELens's own runner on a HookedSSM site.

``write_sae_runner_config`` builds a ``LanguageModelSAERunnerConfig`` for (layer, head, site) with
the paper's defaults (App. D); ``train_write_sae`` runs SAELens's ``LanguageModelSAETrainingRunner``
with ``override_model=<HookedSSM>`` and an in-memory dataset, offline, wandb off by default.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from datasets import Dataset
from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner, LoggingConfig
from sae_lens.saes.sae import TrainingSAE
from sae_lens.training.activations_store import ActivationsStore

from hooked_ssm import HookedSSM
from writesae_lens.saes import ARCHITECTURES

Site = Literal["write", "state"]


def site_hook_name(layer: int, site: Site) -> str:
    if site not in ("write", "state"):
        raise ValueError(f"site must be 'write' or 'state', not {site!r}.")
    return f"blocks.{layer}.mixer.hook_{site}"


def write_sae_runner_config(
    model: HookedSSM,
    layer: int,
    head: int,
    site: Site = "state",
    architecture: str = "writesae",
    d_sae: int = 2048,
    k: float = 32,
    sparsity: Literal["topk", "batchtopk"] = "topk",
    training_tokens: int = 1_000_000,
    context_size: int = 256,
    train_batch_size_tokens: int = 256,
    lr: float = 3e-4,
    lr_warm_up_steps: int = 50,
    output_path: str | None = None,
    checkpoint_path: str | None = None,
    n_checkpoints: int = 0,
    log_to_wandb: bool = False,
    sae_overrides: dict[str, Any] | None = None,
    **runner_overrides: Any,
) -> LanguageModelSAERunnerConfig:
    """Runner config for a matrix SAE on ``blocks.{layer}.mixer.hook_{site}``, head ``head``.

    Defaults follow the paper: Adam at 3e-4 with 50 warm-up steps and cosine decay to 3e-5,
    batches of 256 tokens, 2,048 atoms, k = 32, aux loss 1e-2 on 256 dead latents.
    ``architecture`` may also be SAELens's ``"topk"`` / ``"batchtopk"`` (the flat baseline).
    """
    hook_name = site_hook_name(layer, site)
    if hook_name not in model.hook_dict:
        raise ValueError(f"{hook_name} is not a recurrent-mixer hook of this model (layer types: {model.cfg.layer_types}).")
    if not 0 <= head < model.cfg.n_heads:
        raise ValueError(f"head {head} is out of range: the mixer has {model.cfg.n_heads} heads.")
    d_k, d_v = model.cfg.d_k, model.cfg.d_v
    # Cache writes and states are small (norms ~0.1): SAELens rescales them to norm sqrt(d_in) during
    # training and folds the factor back in at the end. Without it Adam's bias steps swamp the
    # encoder's pre-activations and most latents die.
    sae_kwargs: dict[str, Any] = dict(
        d_in=d_k * d_v, d_sae=d_sae, k=k, device=model.cfg.device, normalize_activations="expected_average_only_in"
    )
    if architecture in ARCHITECTURES:
        sae_cfg = ARCHITECTURES[architecture][3](d_k=d_k, d_v=d_v, sparsity=sparsity, **sae_kwargs, **(sae_overrides or {}))
    elif architecture in ("topk", "batchtopk"):
        from sae_lens import BatchTopKTrainingSAEConfig, TopKTrainingSAEConfig

        flat_cls = TopKTrainingSAEConfig if architecture == "topk" else BatchTopKTrainingSAEConfig
        sae_cfg = flat_cls(**sae_kwargs, **(sae_overrides or {}))
    else:
        raise ValueError(f"Unknown architecture {architecture!r}; choose from {[*ARCHITECTURES, 'topk', 'batchtopk']}.")
    # The mixing buffer holds n_batches_in_buffer * context_size tokens and must fit a batch.
    n_batches_in_buffer = max(2, -(-2 * train_batch_size_tokens // context_size))
    steps = max(1, training_tokens // train_batch_size_tokens)
    settings: dict[str, Any] = dict(
        sae=sae_cfg,
        model_name=model.cfg.model_name,
        model_class_name="HookedSSM",
        hook_name=hook_name,
        hook_head_index=head,
        dataset_path="in-memory",
        is_dataset_tokenized=True,
        streaming=False,
        context_size=context_size,
        prepend_bos=model.cfg.default_prepend_bos,
        training_tokens=training_tokens,
        train_batch_size_tokens=train_batch_size_tokens,
        store_batch_size_prompts=16,
        n_batches_in_buffer=n_batches_in_buffer,
        lr=lr,
        lr_scheduler_name="cosineannealing",
        lr_warm_up_steps=min(lr_warm_up_steps, steps // 2),
        lr_decay_steps=steps - min(lr_warm_up_steps, steps // 2),
        lr_end=lr / 10,
        device=str(model.cfg.device),
        logger=LoggingConfig(log_to_wandb=log_to_wandb),
        n_checkpoints=n_checkpoints,
        checkpoint_path=checkpoint_path,
        output_path=output_path,
        dead_feature_window=min(1000, max(10, steps // 4)),
        feature_sampling_window=min(2000, max(20, steps // 2)),
        n_batches_for_norm_estimate=min(100, steps),
        verbose=False,
    )
    settings.update(runner_overrides)
    return LanguageModelSAERunnerConfig(**settings)


@torch.no_grad()
def estimate_site_statistics(store: ActivationsStore, n_batches: int = 8) -> tuple[torch.Tensor, float]:
    """Mean matrix (the paper's ``M``) and mean norm of the hooked site over ``n_batches`` prompt batches."""
    total, norm_total, count = None, 0.0, 0
    for _ in range(n_batches):
        acts = store.get_activations(store.get_batch_tokens()).flatten(0, -2).float()
        total = acts.sum(0) if total is None else total + acts.sum(0)
        norm_total += acts.norm(dim=-1).sum().item()
        count += acts.shape[0]
    return total / count, norm_total / count


def build_runner(
    model: HookedSSM,
    dataset: Dataset,
    layer: int,
    head: int,
    site: Site = "state",
    center: bool = True,
    config: LanguageModelSAERunnerConfig | None = None,
    **config_kwargs: Any,
) -> LanguageModelSAETrainingRunner:
    """SAELens's runner with ``override_model=model`` and ``override_dataset=dataset``, ready to ``run()``.

    ``dataset`` is a ``datasets.Dataset`` with a ``tokens`` or ``input_ids`` column (pre-tokenized)
    or a ``text`` column. ``center`` installs the site's mean matrix as the SAE's ``b_dec`` first.
    """
    cfg = config or write_sae_runner_config(model, layer, head, site, **config_kwargs)
    runner = LanguageModelSAETrainingRunner(cfg, override_dataset=dataset, override_model=model)
    if center and hasattr(runner.sae, "set_input_mean"):
        mean, mean_norm = estimate_site_statistics(runner.activations_store)
        # The SAE trains on activations SAELens scales by sqrt(d_in) / mean norm (re-estimated on
        # its own batches, within ~1% of this one), so the mean is installed in those units.
        scale = runner.sae.cfg.d_in**0.5 / mean_norm if cfg.sae.normalize_activations == "expected_average_only_in" else 1.0
        runner.sae.set_input_mean(mean * scale)
        runner.activations_store.reset_input_dataset()
    return runner


def train_write_sae(model: HookedSSM, dataset: Dataset, layer: int, head: int, site: Site = "state", **kwargs: Any) -> TrainingSAE:
    """Train through SAELens's runner; returns the trained SAE (also saved under ``output_path``)."""
    return build_runner(model, dataset, layer, head, site, **kwargs).run()


__all__ = ["write_sae_runner_config", "build_runner", "train_write_sae", "estimate_site_statistics", "site_hook_name"]
