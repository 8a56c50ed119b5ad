"""``"writesae_rank_r"``: WriteSAE's bilinear encoder with rank-``r`` atoms ``A_i = sum_j u_ij w_ij^T``
(the paper's rank-2 decoder control, §3.2 / App. F.3: at ``r = 2`` it changes perplexity by +0.82%
against +0.76% for rank 1 at L9). ``rank=1`` is the ``"writesae"`` model with another storage layout.

Decoder factors ``U_dec [d_sae, r, d_k]``, ``V_dec [d_sae, r, d_v]``; an atom's Frobenius norm is
``sqrt(sum_jl (u_ij.u_il)(w_ij.w_il))``; decoding reuses the rank-1 kernel on the ``d_sae * r``
components, so a TopK code touches only its active atoms. Inputs are the flattened ``d_k x d_v`` matrix
(no write-factor input: that fast path is specific to rank-1 atoms).
"""

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
from writesae_lens.saes.weights import bilinear_pre, random_unit_rows, rank1_decode, rank1_matrices

ARCHITECTURE = "writesae_rank_r"


@dataclass(kw_only=True)
class RankRSAEConfig(MatrixSAEFields, SAEConfig):
    rank: int = 2

    @classmethod
    def architecture(cls) -> str:
        return ARCHITECTURE

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_rank(self.rank, self.d_k, self.d_v)


@dataclass(kw_only=True)
class RankRTrainingSAEConfig(MatrixTrainingFields, MatrixSAEFields, TrainingSAEConfig):
    rank: int = 2
    rescale_acts_by_decoder_norm: bool = True

    @classmethod
    def architecture(cls) -> str:
        return ARCHITECTURE

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_rank(self.rank, self.d_k, self.d_v)


def _check_rank(rank: int, d_k: int, d_v: int) -> None:
    if not 1 <= rank <= min(d_k, d_v):
        raise ValueError(f"rank must be in 1..min(d_k, d_v) = {min(d_k, d_v)}, not {rank}.")


def rank_r_norms(u: Float[Tensor, "n r d_k"], w: Float[Tensor, "n r d_v"]) -> Float[Tensor, " n"]:
    """Frobenius norm of ``U_i^T V_i``: ``sqrt(<U_i U_i^T, V_i V_i^T>)``, without forming the atom."""
    gram = (u @ u.transpose(-1, -2)) * (w @ w.transpose(-1, -2))
    return gram.sum(dim=(-1, -2)).clamp(min=0).sqrt()


class RankRWeights(MatrixWeights):
    """Bilinear encoder (``A_enc``, ``B_enc``) and rank-``r`` atoms (``U_dec``, ``V_dec``)."""

    def init_encoder_decoder(self, init_norm: float | None) -> None:
        cfg, kw = self.cfg, dict(dtype=self.dtype, device=self.device)
        u = random_unit_rows(cfg.d_sae * cfg.rank, cfg.d_k, **kw).view(cfg.d_sae, cfg.rank, cfg.d_k)
        w = random_unit_rows(cfg.d_sae * cfg.rank, cfg.d_v, **kw).view(cfg.d_sae, cfg.rank, cfg.d_v)
        u = u * ((init_norm or 1.0) / rank_r_norms(u, w))[:, None, None]
        self.U_dec, self.V_dec = nn.Parameter(u), nn.Parameter(w)
        self.b_enc = nn.Parameter(u.new_zeros(cfg.d_sae))
        self.A_enc = nn.Parameter(random_unit_rows(cfg.d_sae, cfg.d_k, **kw))
        self.B_enc = nn.Parameter(random_unit_rows(cfg.d_sae, cfg.d_v, **kw))

    @property
    def W_enc(self) -> Float[Tensor, "d_in d_sae"]:
        return rank1_matrices(self.A_enc, self.B_enc).T

    @property
    def W_dec(self) -> Float[Tensor, "d_sae d_in"]:
        return (self.U_dec.transpose(-1, -2) @ self.V_dec).flatten(1)

    def hidden_pre(self, sae_in: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_sae"]:
        return bilinear_pre(sae_in, self.A_enc, self.B_enc, self.cfg.d_k, self.cfg.d_v) + self.b_enc

    def atom_norms(self) -> Float[Tensor, " d_sae"]:
        return rank_r_norms(self.U_dec, self.V_dec)

    def decode_atoms(self, acts: Float[Tensor, "... d_sae"]) -> Float[Tensor, "... d_in"]:
        # Atom i is the sum of its r rank-1 components, each weighted by acts_i.
        components = acts.repeat_interleave(self.cfg.rank, dim=-1)
        return rank1_decode(components, self.U_dec.flatten(0, 1), self.V_dec.flatten(0, 1))

    def scale_encoder_(self, scale: Tensor) -> None:
        self.A_enc.data.mul_(scale[:, None] if scale.dim() else scale)

    def scale_decoder_(self, scale: Tensor) -> None:
        self.U_dec.data.mul_(scale[:, None, None] if scale.dim() else scale)

    def normalize_decoder_(self) -> Tensor:
        norms = self.atom_norms().detach().clamp(min=1e-8)
        self.U_dec.data.div_(norms[:, None, None])
        return norms

    def fold_norms_into(self, state_dict: dict[str, Tensor], norms: Tensor) -> None:
        state_dict.update(
            b_enc=state_dict["b_enc"] * norms, A_enc=state_dict["A_enc"] * norms[:, None],
            U_dec=state_dict["U_dec"] / norms[:, None, None],
        )


class RankRSAE(RankRWeights, MatrixSAEMixin, SAE[RankRSAEConfig]):
    """Inference ``writesae_rank_r``."""


class RankRTrainingSAE(RankRWeights, MatrixTrainingMixin, TrainingSAE[RankRTrainingSAEConfig]):
    """Training ``writesae_rank_r``."""
