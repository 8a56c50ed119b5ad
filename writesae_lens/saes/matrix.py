"""``"writesae_matrix"``: a dense encoder on ``vec(X)`` and a rank-1 decoder (the paper's MatrixSAE,
"WriteSAE" in App. C's parameter count, "Rank-1" in Table 7). The encoder has ``d_in x d_sae``
parameters, so at ``d_k = d_v = 128`` it dominates; prefer ``"writesae"`` at real sizes."""

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
from writesae_lens.saes.weights import (
    normalize_rank1_,
    random_unit_rows,
    rank1_decode,
    rank1_matrices,
    rank1_norms,
    unit_rows,
)

ARCHITECTURE = "writesae_matrix"


@dataclass(kw_only=True)
class MatrixWriteSAEConfig(MatrixSAEFields, SAEConfig):
    @classmethod
    def architecture(cls) -> str:
        return ARCHITECTURE


@dataclass(kw_only=True)
class MatrixWriteTrainingSAEConfig(MatrixTrainingFields, MatrixSAEFields, TrainingSAEConfig):
    rescale_acts_by_decoder_norm: bool = True

    @classmethod
    def architecture(cls) -> str:
        return ARCHITECTURE


class MatrixWriteWeights(MatrixWeights):
    """``pre = vec(X) W_enc + c``; atoms ``u_i w_i^T`` (``U_dec``, ``V_dec``), ``W_dec`` a derived view."""

    def init_encoder_decoder(self, init_norm: float | None) -> None:
        cfg, kw = self.cfg, dict(dtype=self.dtype, device=self.device)
        factor_norm = (init_norm or 1.0) ** 0.5
        self.U_dec = nn.Parameter(random_unit_rows(cfg.d_sae, cfg.d_k, **kw, norm=factor_norm))
        self.V_dec = nn.Parameter(random_unit_rows(cfg.d_sae, cfg.d_v, **kw, norm=factor_norm))
        self.b_enc = nn.Parameter(self.U_dec.new_zeros(cfg.d_sae))
        self.W_enc = nn.Parameter(self.W_dec.detach().T.clone().contiguous())

    @property
    def W_dec(self) -> Float[Tensor, "d_sae d_in"]:
        return rank1_matrices(self.U_dec, self.V_dec)

    def hidden_pre(self, sae_in: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_sae"]:
        return sae_in @ self.W_enc + self.b_enc

    def atom_norms(self) -> Float[Tensor, " d_sae"]:
        return rank1_norms(self.U_dec, self.V_dec)

    def atoms(self) -> tuple[Float[Tensor, "d_sae d_k"], Float[Tensor, "d_sae d_v"]]:
        """Unit-norm factors ``(u_i/||u_i||, w_i/||w_i||)``: atom i is ``outer(u_i, w_i)`` with norm 1."""
        return unit_rows(self.U_dec), unit_rows(self.V_dec)

    def decode_atoms(self, acts: Float[Tensor, "... d_sae"]) -> Float[Tensor, "... d_in"]:
        return rank1_decode(acts, self.U_dec, self.V_dec)

    def scale_encoder_(self, scale: Tensor) -> None:
        self.W_enc.data.mul_(scale[None, :] if scale.dim() else scale)

    def scale_decoder_(self, scale: Tensor) -> None:
        self.U_dec.data.mul_(scale[:, None] if scale.dim() else scale)

    def normalize_decoder_(self) -> Tensor:
        return normalize_rank1_(self.U_dec.data, self.V_dec.data)

    def fold_norms_into(self, state_dict: dict[str, Tensor], norms: Tensor) -> None:
        state_dict.update(
            b_enc=state_dict["b_enc"] * norms, W_enc=state_dict["W_enc"] * norms[None, :],
            U_dec=unit_rows(state_dict["U_dec"]), V_dec=unit_rows(state_dict["V_dec"]),
        )


class MatrixWriteSAE(MatrixWriteWeights, MatrixSAEMixin, SAE[MatrixWriteSAEConfig]):
    """Inference ``writesae_matrix``."""


class MatrixWriteTrainingSAE(MatrixWriteWeights, MatrixTrainingMixin, TrainingSAE[MatrixWriteTrainingSAEConfig]):
    """Training ``writesae_matrix``, for SAELens's trainer."""
