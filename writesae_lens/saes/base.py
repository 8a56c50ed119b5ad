"""What every matrix-input SAE shares: config fields, the SAELens ``SAE`` / ``TrainingSAE`` plumbing
(encode, decode, folds, BatchTopK's threshold, the dead-latent aux loss, atomic saves).

Each architecture lives in its own file (``write_sae.py``, ``matrix.py``, ``bilinear.py``) as a config,
an ``SAE`` and a ``TrainingSAE``; its weights are declared there by one small class that implements
:class:`MatrixWeights` from the plain functions of ``weights.py``. The classes here only call that
interface, so none of them knows which encoder or decoder it runs.

Sparsity is TopK (``k`` per token) or BatchTopK (``k`` on average over a batch; a learned global
threshold at inference), with SAELens's dead-latent auxiliary loss. Input centring uses SAELens's
``b_dec`` subtraction: :meth:`MatrixSAEMixin.set_input_mean` installs the mean matrix ``M`` of the
site, as the paper trains on ``vec(S_t - M)``.

``input_kind="write_factors"`` (``"writesae"`` only, see ``write_factors.py``) makes an SAE read the
factors ``[k | v]`` of a rank-1 write (``blocks.{l}.mixer.hook_write_factors``) instead of the
flattened matrix; ``b_dec`` and the atoms still live in the ``d_k x d_v`` write space.

Saving (``save_model`` / ``save_inference_model``) writes each file under a temporary name and
renames it into place, weights first and ``cfg.json`` last, so an interrupted save never leaves a
truncated file under the final name.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn as nn
from jaxtyping import Float
from sae_lens.saes.batchtopk_sae import BatchTopK
from sae_lens.saes.sae import TrainCoefficientConfig, TrainStepInput, TrainStepOutput
from sae_lens.saes.topk_sae import TopK, calculate_topk_aux_acts
from torch import Tensor

from writesae_lens.atomic_io import save_files_atomically

Sparsity = Literal["topk", "batchtopk"]
# "matrix": the SAE reads vec(X), d_k*d_v per head. "write_factors": it reads [k | v] (d_k + d_v) with
# X = k v^T, e.g. blocks.{l}.mixer.hook_write_factors (architecture "writesae" only).
InputKind = Literal["matrix", "write_factors"]


class RankBreakingFoldError(ValueError):
    """A fold (e.g. covariance whitening) would make rank-1 atoms full rank."""


@dataclass(kw_only=True)
class MatrixSAEFields:
    """Fields every matrix SAE config carries (inference and training)."""

    d_k: int
    d_v: int
    k: float = 32
    sparsity: Sparsity = "topk"
    rescale_acts_by_decoder_norm: bool = False
    input_kind: InputKind = "matrix"
    # input_kind="write_factors" only: the SAE works on write_scale * k v^T (SAELens's
    # "expected_average_only_in" scaling, applied to the write rather than to [k | v]). "auto" is
    # resolved from data by writesae_lens's runner before training; None means 1.
    write_scale: float | Literal["auto"] | None = None

    # Only an SAE whose encoder and decoder both factor (bilinear, rank-1) can score k v^T from [k | v].
    FACTOR_INPUTS: ClassVar[bool] = False

    def __post_init__(self) -> None:
        # Mixed in before SAEConfig / TrainingSAEConfig: run their checks, then the matrix ones.
        super().__post_init__()
        self.check_matrix_fields(self.d_in, self.normalize_activations)

    def check_matrix_fields(self, d_in: int, normalize_activations: str) -> None:
        if self.input_kind == "write_factors":
            self._check_factor_fields(d_in, normalize_activations)
        elif self.input_kind != "matrix":
            raise ValueError(f"input_kind must be 'matrix' or 'write_factors', not {self.input_kind!r}.")
        elif self.write_scale is not None:
            raise ValueError(
                "write_scale applies to input_kind='write_factors' only; an SAE reading vec(X) is scaled by "
                "SAELens's normalize_activations='expected_average_only_in'."
            )
        elif d_in != self.d_k * self.d_v:
            raise ValueError(
                f"d_in ({d_in}) must equal d_k * d_v ({self.d_k} * {self.d_v} = {self.d_k * self.d_v}): "
                "matrix SAEs read one flattened d_k x d_v matrix per head."
            )
        if self.sparsity not in ("topk", "batchtopk"):
            raise ValueError(f"sparsity must be 'topk' or 'batchtopk', not {self.sparsity!r}.")
        if normalize_activations in ("covariance_whitening", "layer_norm", "constant_norm_rescale"):
            raise RankBreakingFoldError(
                f"normalize_activations={normalize_activations!r} is not supported by matrix SAEs: whitening "
                "folds M^-1 into the decoder (atoms stop being rank 1) and per-token norms break the aux loss. "
                "Use 'none' or 'expected_average_only_in'."
            )

    def _check_factor_fields(self, d_in: int, normalize_activations: str) -> None:
        if not self.FACTOR_INPUTS:
            raise ValueError(
                f"input_kind='write_factors' needs an SAE whose encoder and decoder both factor (bilinear "
                f"encoder, rank-1 decoder): architecture 'writesae'. {type(self).__name__} has a dense encoder "
                f"or a flat decoder, so it must read the materialised write: use input_kind='matrix' on "
                f"blocks.{{l}}.mixer.hook_write."
            )
        if d_in != self.d_k + self.d_v:
            raise ValueError(
                f"d_in ({d_in}) must equal d_k + d_v ({self.d_k} + {self.d_v} = {self.d_k + self.d_v}) with "
                f"input_kind='write_factors': the SAE reads [k | v] per head (blocks.{{l}}.mixer.hook_write_factors)."
            )
        if normalize_activations != "none":
            raise ValueError(
                f"normalize_activations={normalize_activations!r} cannot be used with input_kind='write_factors': "
                f"SAELens would multiply [k | v] by one factor s, which scales the write k v^T by s^2, with s "
                f"estimated from the norm of [k | v] instead of the write's. Use normalize_activations='none' and "
                f"write_scale='auto' (writesae_lens.training.build_runner estimates it on the write, as "
                f"'expected_average_only_in' would on hook_write) or a number."
            )
        scale = self.write_scale
        if scale is not None and scale != "auto" and not (isinstance(scale, (int, float)) and 0 < scale < float("inf")):
            raise ValueError(f"write_scale must be None, 'auto' or a positive finite number, not {scale!r}.")


@dataclass(kw_only=True)
class MatrixTrainingFields:
    """Training-only fields (recorded in the saved SAE's metadata)."""

    aux_loss_coefficient: float = 1e-2  # lambda_aux of the paper (App. D)
    aux_k: int = 256  # k_aux: dead latents asked to explain the residual
    topk_threshold_lr: float = 0.01  # BatchTopK's moving-average threshold
    learn_b_dec: bool = False  # the paper keeps the mean M fixed


class ThresholdActivation(nn.Module):
    """Inference form of BatchTopK: keep activations above the learned global threshold."""

    def __init__(self, sae: nn.Module):
        super().__init__()
        self._sae = [sae]  # not a submodule: avoid a reference cycle in named_modules

    def forward(self, x: Tensor) -> Tensor:
        return torch.where(x > self._sae[0].threshold, x, torch.zeros_like(x))


# ---------------------------------------------------------------- the SAE behaviour shared by all
class MatrixWeights(ABC):
    """An architecture's encoder and decoder: what :class:`MatrixSAEMixin` needs from it."""

    @abstractmethod
    def init_encoder_decoder(self, init_norm: float | None) -> None:
        """Create the encoder / decoder parameters and ``b_enc`` (atoms of norm ``init_norm``)."""

    @abstractmethod
    def hidden_pre(self, sae_in: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_sae"]:
        """Encoder pre-activations of a (centred) input, before sparsity."""

    @abstractmethod
    def atom_norms(self) -> Float[Tensor, " d_sae"]:
        """Frobenius norm of each decoder atom."""

    @abstractmethod
    def decode_atoms(self, acts: Float[Tensor, "... d_sae"]) -> Float[Tensor, "... dk_dv"]:
        """``sum_i acts_i atom_i`` (no bias)."""

    @abstractmethod
    def scale_encoder_(self, scale: Tensor) -> None:
        """Multiply the encoder's output for atom ``i`` by ``scale[i]`` (or all by a scalar), in place."""

    @abstractmethod
    def scale_decoder_(self, scale: Tensor) -> None:
        """Multiply atom ``i`` by ``scale[i]`` (or all by a scalar), in place."""

    @abstractmethod
    def normalize_decoder_(self) -> Float[Tensor, " d_sae"]:
        """Make every atom unit-norm in place; returns the former norms."""

    @abstractmethod
    def fold_norms_into(self, state_dict: dict[str, Tensor], norms: Float[Tensor, " d_sae"]) -> None:
        """Rewrite a saved state dict so its atoms are unit norm and ``norms`` sit in the encoder."""


class MatrixSAEMixin:
    """Encode/decode, folds and helpers; used by both the inference and the training classes."""

    def _init_matrix_weights(self, init_norm: float | None, threshold_name: str = "threshold") -> None:
        # b_dec lives in the d_k x d_v write/state space whatever the input (d_in is d_k + d_v for factors).
        self.b_dec = nn.Parameter(torch.zeros(self.cfg.d_k * self.cfg.d_v, dtype=self.dtype, device=self.device))
        self.init_encoder_decoder(init_norm)
        if self.cfg.sparsity == "batchtopk":
            self.register_buffer(threshold_name, torch.zeros((), dtype=torch.double, device=self.device))

    def initialize_weights(self) -> None:
        self._init_matrix_weights(init_norm=1.0)

    def get_activation_fn(self):
        if self.cfg.sparsity == "topk":
            return TopK(int(self.cfg.k))
        return ThresholdActivation(self)

    def _pre_and_acts(self, x: Tensor) -> tuple[Tensor, Tensor]:
        sae_in = self.process_sae_in(x)
        hidden_pre = self.hook_sae_acts_pre(self.hidden_pre(sae_in))
        if self.cfg.rescale_acts_by_decoder_norm:
            hidden_pre = hidden_pre * self.atom_norms()
        return self.hook_sae_acts_post(self.activation_fn(hidden_pre)), hidden_pre

    def encode(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_sae"]:
        return self._pre_and_acts(x)[0]

    def _decode_no_bias(self, acts: Tensor) -> Tensor:
        if self.cfg.rescale_acts_by_decoder_norm:
            acts = acts / self.atom_norms().clamp(min=1e-8)
        return self.decode_atoms(acts)

    def decode(self, feature_acts: Float[Tensor, "... d_sae"]) -> Float[Tensor, "... d_in"]:
        sae_out = self.hook_sae_recons(self._decode_no_bias(feature_acts) + self.b_dec)
        sae_out = self.run_time_activation_norm_fn_out(sae_out)
        return self.reshape_fn_out(sae_out, self.d_head)

    @torch.no_grad()
    def get_W_dec_norm(self) -> Tensor:
        return self.atom_norms().clamp(min=1e-8)

    @torch.no_grad()
    def fold_and_get_W_dec_norm(self) -> Tensor:
        """Make every atom unit-norm and move its norm into the encoder (outputs unchanged)."""
        norms = self.normalize_decoder_()
        self.scale_encoder_(norms)
        self.b_enc.data.mul_(norms)
        return norms

    def fold_W_dec_norm(self) -> None:
        if not self.cfg.rescale_acts_by_decoder_norm:
            raise NotImplementedError(
                "Folding decoder norms changes which latents win the TopK unless the SAE was trained "
                "with rescale_acts_by_decoder_norm=True."
            )
        self.fold_and_get_W_dec_norm()

    @torch.no_grad()
    def fold_activation_norm_scaling_factor(self, scaling_factor: float) -> None:
        scale = torch.tensor(scaling_factor, dtype=self.dtype, device=self.device)
        self.scale_encoder_(scale)
        self.scale_decoder_(1.0 / scale)
        self.b_dec.data.div_(scale)
        if self.cfg.sparsity == "batchtopk" and self.cfg.rescale_acts_by_decoder_norm:
            self._threshold_tensor().div_(scaling_factor)
        self.cfg.normalize_activations = "none"

    def fold_activation_whitening(self, mean: Tensor, whitening_matrix: Tensor, unwhitening_matrix: Tensor) -> None:
        raise RankBreakingFoldError(
            "Covariance whitening cannot be folded into a matrix SAE: W_dec M^-1 is no longer rank 1 "
            "(and a bilinear encoder stops being bilinear). Train with normalize_activations='none'."
        )

    def _threshold_tensor(self) -> Tensor:
        return self.threshold

    @torch.no_grad()
    def set_input_mean(self, mean: Float[Tensor, "d_in"]) -> None:
        """Centre inputs on the site's mean matrix ``M`` (the SAE reads ``vec(X - M)``, adds ``M`` back).

        ``mean`` is flattened key-major (``d_k*d_v``), in the units the SAE works in (for factor inputs:
        already multiplied by ``write_scale``)."""
        d = self.cfg.d_k * self.cfg.d_v
        if mean.shape != (d,):
            raise ValueError(f"mean must have shape ({d},) (d_k*d_v, flattened key-major), got {tuple(mean.shape)}.")
        self.b_dec.data.copy_(mean.to(self.b_dec))
        self.cfg.apply_b_dec_to_input = True


    def process_state_dict_for_loading(self, state_dict: dict[str, Any]) -> None:
        # BatchTopK's threshold is "topk_threshold" in training checkpoints and "threshold" in inference
        # saves: accept either, so SAE.load_from_disk also opens training checkpoints.
        own = next((n for n in ("threshold", "topk_threshold") if n in self._buffers), None)
        other = {"threshold": "topk_threshold", "topk_threshold": "threshold"}.get(own or "")
        if own is not None and own not in state_dict and other in state_dict:
            state_dict[own] = state_dict.pop(other)

    def save_model(self, path: str | Path) -> tuple[Path, Path]:
        return save_files_atomically(path, super().save_model)  # type: ignore[misc]


class MatrixTrainingMixin(MatrixSAEMixin):
    """What the TrainingSAE classes add: hidden pre-activations, the aux loss, BatchTopK's threshold."""

    def get_activation_fn(self):
        if self.cfg.sparsity == "topk":
            return TopK(int(self.cfg.k))
        return BatchTopK(self.cfg.k)

    def initialize_weights(self) -> None:
        self._init_matrix_weights(self.cfg.decoder_init_norm, threshold_name="topk_threshold")
        self.b_dec.requires_grad_(self.cfg.learn_b_dec)

    def _threshold_tensor(self) -> Tensor:
        return self.topk_threshold

    def encode_with_hidden_pre(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self._pre_and_acts(x)

    def get_coefficients(self) -> dict[str, float | TrainCoefficientConfig]:
        return {}

    def calculate_aux_loss(
        self, step_input: TrainStepInput, feature_acts: Tensor, hidden_pre: Tensor, sae_out: Tensor
    ) -> dict[str, Tensor]:
        """Dead latents reconstruct the residual of the live ones (Gao et al.; SAELens's TopK aux loss)."""
        dead = step_input.dead_neuron_mask
        if dead is None or (n_dead := int(dead.sum())) == 0:
            return {"auxiliary_reconstruction_loss": sae_out.new_tensor(0.0)}
        k_aux = min(self.cfg.aux_k, n_dead)
        aux_acts = calculate_topk_aux_acts(k_aux=k_aux, hidden_pre=hidden_pre, dead_neuron_mask=dead)
        residual = (step_input.sae_in - sae_out).detach()
        loss = (self._decode_no_bias(aux_acts) - residual).pow(2).sum(dim=-1).mean()
        scale = min(n_dead / self.cfg.aux_k, 1.0)
        return {"auxiliary_reconstruction_loss": self.cfg.aux_loss_coefficient * scale * loss}

    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        return self._update_topk_threshold(super().training_forward_pass(step_input))

    def _update_topk_threshold(self, output: TrainStepOutput) -> TrainStepOutput:
        """BatchTopK: move the inference threshold towards the smallest positive activation of the batch."""
        if self.cfg.sparsity == "batchtopk":
            positive = output.feature_acts[output.feature_acts > 0]
            if positive.numel():
                lr = self.cfg.topk_threshold_lr
                self.topk_threshold = (1 - lr) * self.topk_threshold + lr * positive.min().detach().double()
            output.metrics["topk_threshold"] = self.topk_threshold
        return output

    def save_inference_model(self, path: str | Path) -> tuple[Path, Path]:
        return save_files_atomically(path, super().save_inference_model)  # type: ignore[misc]

    @torch.no_grad()
    def log_histograms(self) -> dict[str, Any]:
        return {"weights/W_dec_norms": self.atom_norms().detach().float().cpu().numpy()}

    def process_state_dict_for_saving_inference(self, state_dict: dict[str, Any]) -> None:
        """Save unit-norm atoms (norms folded into the encoder) and BatchTopK's threshold as ``threshold``."""
        if self.cfg.rescale_acts_by_decoder_norm:
            norms = self.atom_norms().detach().clamp(min=1e-8)
            self.fold_norms_into(state_dict, norms)
        if self.cfg.sparsity == "batchtopk":
            state_dict["threshold"] = state_dict.pop("topk_threshold")
