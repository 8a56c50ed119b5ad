"""Thin helpers that train matrix SAEs with SAELens's own runner on a HookedSSM site.

``write_sae_runner_config`` builds a ``LanguageModelSAERunnerConfig`` for (layer, head, site) with
the paper's defaults (App. D); ``build_runner`` / ``train_write_sae`` run it through
:class:`~writesae_lens.runner.WriteSAETrainingRunner` (SAELens's ``LanguageModelSAETrainingRunner``
plus site statistics, crash-safe checkpoints and the factored write path) with
``override_model=<HookedSSM>`` and an in-memory dataset, offline, wandb off by default.
``build_runner`` follows the paper's recipe by default (a fixed input set, 80/20 split, epochs,
re-normalisation, resampling: :mod:`writesae_lens.recipe`).

**Factored write-site training** (``factored=True``, the default for ``architecture="writesae"``
on ``site="write"``): SAELens's activation store caches ``blocks.{l}.mixer.hook_write_factors``
(``[k | v]``, ``d_k + d_v`` floats per token instead of ``d_k * d_v``; the model never materialises
the write), and the SAE (``input_kind="write_factors"``) scores ``write_scale * k v^T`` from the
factors. The loss, its gradients and the codes equal those of the materialised path on
``hook_write`` with the same scale and centring (tested); the one difference is where the scale comes
from: estimated on the write (``sqrt(d_k d_v) / mean ||k v^T||_F`` over 8 prompt batches) by the
runner, not by SAELens's scaler on training batches (the same statistic on a different sample).
What you get back, and what the output folder holds, is the ordinary ``hook_write`` SAE. Periodic
checkpoints keep the training form (``SAE.load_from_disk`` gives a factor-input SAE; call
``.to_write_site()``), so that ``resume_from_checkpoint`` works. Pass ``factored=False`` for the
materialised path.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
from pathlib import Path
from typing import Any, Literal

from datasets import Dataset
from sae_lens import LanguageModelSAERunnerConfig, LoggingConfig
from sae_lens.saes.sae import TrainingSAE
from sae_lens.training.activations_store import ActivationsStore

from hooked_ssm import HookedSSM
from writesae_lens.recipe import PAPER_RECIPE, SiteCache, TrainingRecipe, cache_site, epochs_to_tokens
from writesae_lens.runner import WriteSAETrainingRunner, estimate_site_statistics
from writesae_lens.saes import ARCHITECTURES

Site = Literal["write", "state"]


def site_hook_name(layer: int, site: Site, factored: bool = False) -> str:
    """The hook the activation store reads: ``hook_write``, ``hook_state``, or ``hook_write_factors``."""
    if site not in ("write", "state"):
        raise ValueError(f"site must be 'write' or 'state', not {site!r}.")
    if factored and site != "write":
        raise ValueError("factored=True needs site='write': only a cache write is a rank-1 k v^T (a state is full rank).")
    return f"blocks.{layer}.mixer.hook_{site}" + ("_factors" if factored else "")


def _default_factored(site: Site, architecture: str, sae_overrides: dict[str, Any] | None) -> bool:
    # The factored path is exact for writesae on writes. A tied encoder cannot fold the write scale.
    return site == "write" and architecture == "writesae" and not (sae_overrides or {}).get("tied", False)


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
    factored: bool | None = None,
    **runner_overrides: Any,
) -> LanguageModelSAERunnerConfig:
    """Runner config for a matrix SAE on ``blocks.{layer}.mixer.hook_{site}``, head ``head``.

    Defaults follow the paper: Adam at 3e-4 with 50 warm-up steps and cosine decay to 3e-5,
    batches of 256 tokens, 2,048 atoms, k = 32, aux loss 1e-2 on 256 dead latents.
    ``architecture`` may also be SAELens's ``"topk"`` / ``"batchtopk"`` (the flat baseline).
    ``factored`` (default: True for ``"writesae"`` on ``site="write"`` unless tied) trains on
    ``hook_write_factors`` from the factors (see the module docstring); only ``"writesae"`` can.
    """
    if factored is None:
        factored = _default_factored(site, architecture, sae_overrides)
    if factored and architecture != "writesae":
        raise ValueError(
            f"factored=True needs architecture 'writesae' (bilinear encoder, rank-1 decoder): {architecture!r} "
            f"has a dense encoder or a flat decoder and must read the materialised write. Use factored=False."
        )
    hook_name = site_hook_name(layer, site, factored)
    if hook_name not in model.hook_dict:
        raise ValueError(f"{hook_name} is not a recurrent-mixer hook of this model (layer types: {model.cfg.layer_types}).")
    if not 0 <= head < model.cfg.n_heads:
        raise ValueError(f"head {head} is out of range: the mixer has {model.cfg.n_heads} heads.")
    d_k, d_v = model.cfg.d_k, model.cfg.d_v
    # Cache writes and states are small (norms ~0.1): SAELens rescales them to norm sqrt(d_in) during
    # training and folds the factor back in at the end. Without it Adam's bias steps swamp the
    # encoder's pre-activations and most latents die. For factor inputs the same scale is applied to
    # the write itself (write_scale, estimated by the runner), not by SAELens to [k | v].
    sae_kwargs: dict[str, Any] = dict(
        d_in=d_k * d_v, d_sae=d_sae, k=k, device=model.cfg.device, normalize_activations="expected_average_only_in"
    )
    if factored:
        sae_kwargs.update(d_in=d_k + d_v, normalize_activations="none", input_kind="write_factors", write_scale="auto")
    if architecture in ARCHITECTURES:
        sae_cfg = ARCHITECTURES[architecture][3](d_k=d_k, d_v=d_v, sparsity=sparsity, **{**sae_kwargs, **(sae_overrides or {})})
    elif architecture in ("topk", "batchtopk"):
        from sae_lens import BatchTopKTrainingSAEConfig, TopKTrainingSAEConfig

        flat_cls = TopKTrainingSAEConfig if architecture == "topk" else BatchTopKTrainingSAEConfig
        sae_cfg = flat_cls(**{**sae_kwargs, **(sae_overrides or {})})
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


def build_runner(
    model: HookedSSM,
    dataset: Dataset,
    layer: int,
    head: int,
    site: Site = "state",
    center: bool = True,
    config: LanguageModelSAERunnerConfig | None = None,
    recipe: TrainingRecipe | None = PAPER_RECIPE,
    site_cache: SiteCache | str | Path | None = None,
    cache_dir: str | Path | None = None,
    n_sequences: int | None = None,
    **config_kwargs: Any,
) -> WriteSAETrainingRunner:
    """SAELens's runner (as :class:`WriteSAETrainingRunner`) with ``override_model=model`` and
    ``override_dataset=dataset``, ready to ``run()``.

    ``dataset`` is a ``datasets.Dataset`` with a ``tokens`` or ``input_ids`` column (pre-tokenized)
    or a ``text`` column. ``center`` installs the site's mean matrix as the SAE's ``b_dec`` first
    (in the units the SAE trains in: SAELens's scale, or ``write_scale`` for factor inputs).

    ``recipe`` (default: the paper's, :data:`~writesae_lens.recipe.PAPER_RECIPE`): the head's inputs are
    sampled once (``n_sequences`` context windows of ``dataset``; default: all of them, or, with
    ``training_tokens``, as many as one epoch of that many tokens needs) into ``site_cache`` (a
    :class:`~writesae_lens.recipe.SiteCache` or its folder, reused when it exists; default: a new one
    under ``cache_dir`` or a new temporary folder, left for you to delete), cast to bf16, split 80/20
    by sequence with seed 42, and SAELens trains on the training 80% through its cached-activation
    store for ``recipe.epochs`` epochs (or ``training_tokens`` if given), re-normalising atoms and
    resampling dead ones on the recipe's schedule; the held-out 20% is
    ``runner.site_cache.load("heldout")``. ``recipe=None``: SAELens's plain
    streaming store for ``training_tokens`` tokens.
    """
    if recipe is None:
        cfg = config or write_sae_runner_config(model, layer, head, site, **config_kwargs)
        return WriteSAETrainingRunner(cfg, override_dataset=dataset, override_model=model, center=center)
    base = config or write_sae_runner_config(model, layer, head, site, **config_kwargs)
    if n_sequences is None and "training_tokens" in config_kwargs:  # sample no more than one epoch needs
        n_sequences = math.ceil(config_kwargs["training_tokens"] / (base.context_size * (1 - recipe.heldout_fraction))) + 1
    cache = _site_cache(model, dataset, base, recipe, site_cache, cache_dir, n_sequences)
    cached = dict(
        use_cached_activations=True, cached_activations_path=str(cache.split_path("train")),
        dead_feature_window=recipe.dead_after,
    )
    if config is not None:
        cfg = dataclasses.replace(config, **cached)
    else:
        tokens = config_kwargs.pop("training_tokens", None) or epochs_to_tokens(recipe.epochs, cache.n_tokens("train"))
        cfg = write_sae_runner_config(model, layer, head, site, training_tokens=tokens, **{**config_kwargs, **cached})
    return WriteSAETrainingRunner(
        cfg, override_dataset=dataset, override_model=model, center=center, recipe=recipe, site_cache=cache
    )


def sample_site(
    model: HookedSSM, dataset: Dataset, layer: int, head: int, site: Site, path: str | Path,
    recipe: TrainingRecipe = PAPER_RECIPE, n_sequences: int | None = None, **config_kwargs: Any,
) -> SiteCache:
    """The fixed input set :func:`build_runner` would train on (``config_kwargs`` as there), written to
    ``path`` (reused when it exists): one set shared by several runs through ``site_cache=``."""
    cfg = write_sae_runner_config(model, layer, head, site, **config_kwargs)
    return _site_cache(model, dataset, cfg, recipe, path, None, n_sequences)


def _site_cache(
    model: HookedSSM, dataset: Dataset, cfg: LanguageModelSAERunnerConfig, recipe: TrainingRecipe,
    site_cache: SiteCache | str | Path | None, cache_dir: str | Path | None, n_sequences: int | None,
) -> SiteCache:
    if isinstance(site_cache, SiteCache):
        cache = site_cache
    else:
        path = site_cache or Path(cache_dir or tempfile.mkdtemp(prefix="writesae-cache-")) / f"{cfg.hook_name}.h{cfg.hook_head_index}"
        store = ActivationsStore.from_config(model, dataclasses.replace(cfg, use_cached_activations=False), override_dataset=dataset)
        cache = cache_site(store, path, recipe, n_sequences)
    if cache.hook_name != cfg.hook_name or cache.d_in != cfg.sae.d_in:
        raise ValueError(
            f"The site cache {cache.path} holds {cache.hook_name} (d_in {cache.d_in}), but this SAE trains on "
            f"{cfg.hook_name} (d_in {cfg.sae.d_in}): pass the cache of the same site, or none to build one."
        )
    return cache


def train_write_sae(model: HookedSSM, dataset: Dataset, layer: int, head: int, site: Site = "state", **kwargs: Any) -> TrainingSAE:
    """Train through SAELens's runner; returns the trained SAE (also saved under ``output_path``),
    on ``hook_write`` / ``hook_state`` (an SAE trained on the write factors comes back in its
    ``hook_write`` form)."""
    return build_runner(model, dataset, layer, head, site, **kwargs).run()


__all__ = [
    "PAPER_RECIPE",
    "SiteCache",
    "TrainingRecipe",
    "WriteSAETrainingRunner",
    "build_runner",
    "estimate_site_statistics",
    "sample_site",
    "site_hook_name",
    "train_write_sae",
    "write_sae_runner_config",
]
