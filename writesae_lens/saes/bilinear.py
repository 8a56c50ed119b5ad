"""``"writesae_bilinear"``: a bilinear encoder with a flat (dense ``d_k*d_v``) decoder, the paper's
"Bilinear-flat" control (Table 7): same encoder as WriteSAE, atoms free to be full rank."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn
from jaxtyping import Float
from sae_lens.saes.sae import SAE, SAEConfig, TrainingSAE, TrainingSAEConfig
from torch import Tensor

from writesae_lens.saes.base import (
    MatrixSAEFields,
    MatrixSAEMixin,
    MatrixTrainingFields,
    MatrixTrainingMixin,
    MatrixWeights,
)
from writesae_lens.saes.weights import bilinear_pre, random_unit_rows, rank1_matrices

ARCHITECTURE = "writesae_bilinear"


@dataclass(kw_only=True)
class BilinearFlatSAEConfig(MatrixSAEFields, SAEConfig):
    @classmethod
    def architecture(cls) -> str:
        return ARCHITECTURE


@dataclass(kw_only=True)
class BilinearFlatTrainingSAEConfig(MatrixTrainingFields, MatrixSAEFields, TrainingSAEConfig):
    rescale_acts_by_decoder_norm: bool = True

    @classmethod
    def architecture(cls) -> str:
        return ARCHITECTURE


class BilinearFlatWeights(MatrixWeights):
    """``pre_i = a_i^T X b_i + c_i`` (``A_enc``, ``B_enc``); dense atoms ``W_dec [d_sae, d_k*d_v]``."""

    def init_encoder_decoder(self, init_norm: float | None) -> None:
        cfg, kw = self.cfg, dict(dtype=self.dtype, device=self.device)
        self.W_dec = nn.Parameter(random_unit_rows(cfg.d_sae, cfg.d_in, **kw, norm=init_norm or 1.0))
        self.b_enc = nn.Parameter(self.W_dec.new_zeros(cfg.d_sae))
        self.A_enc = nn.Parameter(random_unit_rows(cfg.d_sae, cfg.d_k, **kw))
        self.B_enc = nn.Parameter(random_unit_rows(cfg.d_sae, cfg.d_v, **kw))

    @property
    def W_enc(self) -> Float[Tensor, "d_in d_sae"]:
        return rank1_matrices(self.A_enc, self.B_enc).T

    def hidden_pre(self, sae_in: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_sae"]:
        return bilinear_pre(sae_in, self.A_enc, self.B_enc, self.cfg.d_k, self.cfg.d_v) + self.b_enc

    def atom_norms(self) -> Float[Tensor, " d_sae"]:
        return self.W_dec.norm(dim=-1)

    def decode_atoms(self, acts: Float[Tensor, "... d_sae"]) -> Float[Tensor, "... d_in"]:
        return acts @ self.W_dec

    def scale_encoder_(self, scale: Tensor) -> None:
        self.A_enc.data.mul_(scale[:, None] if scale.dim() else scale)

    def scale_decoder_(self, scale: Tensor) -> None:
        self.W_dec.data.mul_(scale[:, None] if scale.dim() else scale)

    def normalize_decoder_(self) -> Tensor:
        norms = self.atom_norms().detach().clamp(min=1e-8)
        self.W_dec.data.div_(norms[:, None])
        return norms

    def fold_norms_into(self, state_dict: dict[str, Tensor], norms: Tensor) -> None:
        state_dict.update(
            b_enc=state_dict["b_enc"] * norms, A_enc=state_dict["A_enc"] * norms[:, None],
            W_dec=state_dict["W_dec"] / norms[:, None],
        )


class BilinearFlatSAE(BilinearFlatWeights, MatrixSAEMixin, SAE[BilinearFlatSAEConfig]):
    """Inference ``writesae_bilinear``."""


class BilinearFlatTrainingSAE(BilinearFlatWeights, MatrixTrainingMixin, TrainingSAE[BilinearFlatTrainingSAEConfig]):
    """Training ``writesae_bilinear``."""
