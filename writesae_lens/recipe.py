"""The paper's training recipe (App. D) on top of SAELens's runner.

What SAELens already does is used as is: its activation store reads a **cached activation dataset**
(``use_cached_activations``, the format of its ``CacheActivationsRunner``: one ``Array2D(context,
d_in)`` column named after the hook, plus ``token_ids``) and loops over it epoch after epoch; its
trainer counts, per latent, the steps since it last fired (``dead_feature_window``) and gives dead
latents the TopK auxiliary loss. What it lacks is added here:

- :func:`cache_site`: the fixed set of states (or writes) of **one head**, sampled once through
  SAELens's ``ActivationsStore`` (which selects the head; SAELens's ``CacheActivationsRunner`` keeps
  every head), cast to bf16 and back (the paper's fp32 SAE on bf16-cast inputs), split 80/20 **by
  sequence** with seed 42 (held-out sequences share no context with training ones) and written in
  SAELens's cached-activation format;
- :func:`renormalize_decoder_`: decoder atoms back to unit norm every ``renorm_every`` steps;
- :func:`resample_dead_atoms_`: atoms silent for ``dead_after`` steps re-initialised every
  ``resample_every`` steps, each on the residual of a high-error input of the current batch
  (sampled with probability proportional to its squared error, as in Bricken et al. 2023; the paper
  does not say which inputs), their Adam moments zeroed.

:class:`TrainingRecipe`'s defaults are the paper's; ``writesae_lens.training.build_runner`` takes one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import datasets
import numpy as np
import torch
from jaxtyping import Float
from sae_lens.saes.sae import SAE
from sae_lens.training.activations_store import ActivationsStore
from torch import Tensor

from writesae_lens.atomic_io import publish_directory

Split = Literal["train", "heldout"]
TOKEN_IDS = "token_ids"


@dataclass(frozen=True)
class TrainingRecipe:
    """The paper's recipe (App. D). ``epochs`` is used when ``training_tokens`` is not given."""

    epochs: float = 20
    heldout_fraction: float = 0.2
    split_seed: int = 42
    renorm_every: int = 100
    resample_every: int = 250
    dead_after: int = 100  # steps without firing before an atom counts as dead (SAELens's dead_feature_window)
    input_dtype: str = "bfloat16"  # inputs are rounded to this dtype; the SAE stays fp32

    def __post_init__(self) -> None:
        if not 0 < self.heldout_fraction < 1:
            raise ValueError(f"heldout_fraction must be in (0, 1), not {self.heldout_fraction}.")
        if self.epochs <= 0 or self.renorm_every < 0 or self.resample_every < 0 or self.dead_after <= 0:
            raise ValueError("epochs and dead_after must be positive; renorm_every / resample_every >= 0 (0 = off).")
        getattr(torch, self.input_dtype)  # a clear AttributeError for a dtype torch does not have


PAPER_RECIPE = TrainingRecipe()


@dataclass(frozen=True)
class SiteCache:
    """A head's fixed set of inputs on disk: ``<path>/train`` and ``<path>/heldout`` (SAELens's format)."""

    path: Path
    hook_name: str
    context_size: int
    d_in: int

    def split_path(self, split: Split) -> Path:
        return self.path / split

    def n_tokens(self, split: Split) -> int:
        return len(datasets.load_from_disk(str(self.split_path(split)))) * self.context_size

    def load(self, split: Split) -> Float[Tensor, "tokens d_in"]:
        data = datasets.load_from_disk(str(self.split_path(split))).with_format("torch", columns=[self.hook_name])
        return data[:][self.hook_name].reshape(-1, self.d_in).float()

    @classmethod
    def open(cls, path: str | Path) -> SiteCache:
        """A cache written by :func:`cache_site`."""
        train = datasets.load_from_disk(str(Path(path) / "train"))
        hook = next(c for c in train.column_names if c != TOKEN_IDS)
        context, d_in = train.features[hook].shape
        return cls(Path(path), hook, context, d_in)


@torch.no_grad()
def cache_site(
    store: ActivationsStore, path: str | Path, recipe: TrainingRecipe = PAPER_RECIPE, n_sequences: int | None = None
) -> SiteCache:
    """Run the model once over ``store``'s dataset (``n_sequences`` context windows, default: all of
    them) and write the hooked head's inputs, split and bf16-cast, to ``path`` (see the module docstring).

    An existing complete cache at ``path`` is reused (its folder is published only once written)."""
    path = Path(path)
    if (path / "heldout").is_dir():
        return SiteCache.open(path)
    acts, tokens = [], []
    count = 0
    while n_sequences is None or count < n_sequences:
        try:
            batch = store.get_batch_tokens(raise_at_epoch_end=True)
        except StopIteration:
            break
        batch_acts = store.get_activations(batch).reshape(batch.shape[0], batch.shape[1], -1)
        acts.append(batch_acts.to(getattr(torch, recipe.input_dtype)).float().cpu())
        tokens.append(batch.cpu())
        count += batch.shape[0]
    store.reset_input_dataset()
    if not acts:
        raise ValueError("The dataset gave no context window: it must hold at least store_batch_size_prompts of them.")
    all_acts, all_tokens = torch.cat(acts)[:n_sequences], torch.cat(tokens)[:n_sequences]
    n, context, d_in = all_acts.shape
    n_heldout = max(1, round(n * recipe.heldout_fraction))
    if n - n_heldout < 1:
        raise ValueError(f"{n} sequence(s) cannot be split {1 - recipe.heldout_fraction:.0%}/{recipe.heldout_fraction:.0%}.")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(recipe.split_seed))
    features = datasets.Features({
        store.hook_name: datasets.Array2D(shape=(context, d_in), dtype="float32"),
        TOKEN_IDS: datasets.Sequence(datasets.Value("int32"), length=context),
    })
    staging = path.parent / f".incomplete-{path.name}"
    for split, index in (("train", order[n_heldout:]), ("heldout", order[:n_heldout])):
        data = datasets.Dataset.from_dict(
            {store.hook_name: all_acts[index].numpy(), TOKEN_IDS: all_tokens[index].numpy().astype(np.int32)},
            features=features,
        )
        data.save_to_disk(str(staging / split))
    publish_directory(staging, path)
    return SiteCache(path, store.hook_name, context, d_in)


# ---------------------------------------------------------------- maintenance during training
@torch.no_grad()
def renormalize_decoder_(sae: SAE) -> None:
    """Decoder atoms to unit norm. For an SAE that rescales its codes by decoder norm the norm moves
    into the encoder, which leaves its function unchanged (matrix SAEs' ``fold_and_get_W_dec_norm``,
    SAELens's ``fold_W_dec_norm``); otherwise (and for a tied WriteSAE, whose encoder is its decoder)
    the atoms are simply normalised, as the paper's column re-norm does."""
    fold = sae.cfg.rescale_acts_by_decoder_norm and not getattr(sae.cfg, "tied", False)
    if hasattr(sae, "normalize_decoder_"):
        sae.fold_and_get_W_dec_norm() if fold else sae.normalize_decoder_()
    elif fold:
        sae.fold_W_dec_norm()
    else:
        sae.W_dec.data /= sae.W_dec.data.norm(dim=-1, keepdim=True).clamp(min=1e-8)


def _reconstruction_target(sae: SAE, sae_in: Tensor) -> Tensor:
    """What ``sae(sae_in)`` reconstructs: the input, or the write ``vec(k v^T)`` for write-factor inputs."""
    if not getattr(sae, "reads_write_factors", False):
        return sae_in
    k, v = sae.split_factors(sae_in)
    return (k[:, :, None] * v[:, None, :]).flatten(1)


def _atom_dim(name: str) -> int | None:
    """The dimension of a parameter that indexes atoms (``W_enc`` is ``[d_in, d_sae]``); None: shared."""
    if name in ("b_dec", "threshold", "topk_threshold"):
        return None
    return 1 if name == "W_enc" else 0


@torch.no_grad()
def resample_dead_atoms_(
    sae: SAE, dead: Tensor, sae_in: Float[Tensor, "batch d_in"], optimizer: torch.optim.Optimizer | None,
    generator: torch.Generator | None = None, encoder_scale: float = 0.2,
) -> int:
    """Re-initialise the ``dead`` atoms (bool mask) on residuals of ``sae_in``; returns how many.

    Each dead atom gets the direction of one input's residual (``x - sae(x)``), inputs drawn with
    probability proportional to their squared error: a rank-1 atom gets that residual's leading
    singular pair, a flat atom the residual itself (unit norm). Its encoder row becomes the same
    direction at ``encoder_scale`` times the mean norm of the live encoder rows, its ``b_enc`` 0, and
    its Adam moments 0."""
    index = dead.nonzero().squeeze(-1)
    if index.numel() == 0 or sae_in.shape[0] == 0:
        return 0
    target = _reconstruction_target(sae, sae_in).to(sae.dtype)
    residual = target - sae(sae_in.to(sae.dtype)).reshape(target.shape)
    weights = residual.pow(2).sum(-1)
    if not torch.isfinite(weights).all() or weights.sum() == 0:
        return 0
    rows = torch.multinomial(weights, index.numel(), replacement=bool(weights.count_nonzero() < index.numel()),
                             generator=generator)
    direction = residual[rows] / residual[rows].norm(dim=-1, keepdim=True).clamp(min=1e-12)
    live = ~dead
    params = dict(sae.named_parameters())
    if "U_dec" in params:  # rank-1 decoder: the leading singular pair of each residual
        left, _, right = torch.linalg.svd(direction.view(-1, sae.cfg.d_k, sae.cfg.d_v))
        u, w = left[:, :, 0], right[:, 0, :]
        if params["U_dec"].dim() == 3:  # rank-r atoms: the pair as the first component, the others 0
            params["U_dec"][index] = 0
            params["U_dec"][index, 0], params["V_dec"][index, 0] = u, w
        else:
            params["U_dec"][index], params["V_dec"][index] = u, w
        enc_u, enc_w = u, w
    else:
        params["W_dec"][index] = direction
        enc_u = enc_w = None
    if "A_enc" in params:  # bilinear encoder: a_i^T X b_i, the same rank-1 direction
        if enc_u is None:
            left, _, right = torch.linalg.svd(direction.view(-1, sae.cfg.d_k, sae.cfg.d_v))
            enc_u, enc_w = left[:, :, 0], right[:, 0, :]
        scale = encoder_scale * (params["A_enc"][live].norm(dim=-1) * params["B_enc"][live].norm(dim=-1)).mean()
        params["A_enc"][index] = enc_u * _finite(scale)
        params["B_enc"][index] = enc_w
    elif "W_enc" in params:
        scale = encoder_scale * params["W_enc"][:, live].norm(dim=0).mean()
        params["W_enc"][:, index] = direction.T * _finite(scale)
    params["b_enc"][index] = 0
    if optimizer is not None:
        _reset_adam_rows(optimizer, params, index)
    return int(index.numel())


def _finite(scale: Tensor) -> Tensor:
    return scale if torch.isfinite(scale) and scale > 0 else torch.ones_like(scale)


def _reset_adam_rows(optimizer: torch.optim.Optimizer, params: dict[str, Tensor], index: Tensor) -> None:
    for name, param in params.items():
        dim, state = _atom_dim(name), optimizer.state.get(param, {})
        if dim is None:
            continue
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                state[key].index_fill_(dim, index, 0.0)


class RecipeSchedule:
    """Runs the recipe's maintenance after SAELens's trainer steps (installed by the runner)."""

    def __init__(self, recipe: TrainingRecipe, seed: int = 0):
        self.recipe = recipe
        self.generator = torch.Generator().manual_seed(seed)
        self.n_resampled = 0

    def after_step(self, trainer, batch: Tensor) -> None:
        step = trainer.n_training_steps + 1  # the trainer increments it after step() returns
        recipe, sae = self.recipe, trainer.sae
        if recipe.resample_every and step % recipe.resample_every == 0:
            sae_in = trainer.activation_scaler(batch.to(sae.device))
            self.n_resampled += resample_dead_atoms_(sae, trainer.dead_neurons, sae_in, trainer.optimizer,
                                                     self.generator)
            trainer.n_forward_passes_since_fired[trainer.dead_neurons] = 0  # give the new atoms a fresh window
        if recipe.renorm_every and step % recipe.renorm_every == 0:
            renormalize_decoder_(sae)


def epochs_to_tokens(epochs: float, n_train_tokens: int) -> int:
    return max(1, math.ceil(epochs * n_train_tokens))


__all__ = [
    "PAPER_RECIPE",
    "RecipeSchedule",
    "SiteCache",
    "TrainingRecipe",
    "cache_site",
    "epochs_to_tokens",
    "renormalize_decoder_",
    "resample_dead_atoms_",
]
