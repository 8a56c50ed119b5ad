"""``"writesae"``: the primary WriteSAE, a bilinear encoder and a rank-1 decoder (the paper's
BilinearSAE / "WriteSAE (primary)"; ``tied=True`` is its "tied bilinear" variant).

Because both sides are factored, a rank-1 input ``X = k v^T`` (a cache write) never needs to be
materialised: :meth:`WriteSAE.encode_factored` and :func:`factored_squared_error` cost
``O(d_sae (d_k + d_v))`` per token instead of ``O(d_sae d_k d_v)``.
"""

from __future__ import annotations

from dataclasses import dataclass

from jaxtyping import Float
from sae_lens.saes.sae import SAE, SAEConfig, TrainingSAE, TrainingSAEConfig
from torch import Tensor

from writesae_lens.saes.matrix_sae import (
    BilinearEncoder,
    MatrixSAEFields,
    MatrixSAEMixin,
    MatrixTrainingFields,
    MatrixTrainingMixin,
    Rank1Decoder,
)

ARCHITECTURE = "writesae"


@dataclass(kw_only=True)
class WriteSAEConfig(MatrixSAEFields, SAEConfig):
    tied: bool = False

    @classmethod
    def architecture(cls) -> str:
        return ARCHITECTURE

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.tied and self.rescale_acts_by_decoder_norm:
            raise ValueError("tied=True shares factors between encoder and decoder; set rescale_acts_by_decoder_norm=False.")


@dataclass(kw_only=True)
class WriteTrainingSAEConfig(MatrixTrainingFields, MatrixSAEFields, TrainingSAEConfig):
    tied: bool = False
    rescale_acts_by_decoder_norm: bool = True

    @classmethod
    def architecture(cls) -> str:
        return ARCHITECTURE

    def __post_init__(self) -> None:
        if self.tied:
            self.rescale_acts_by_decoder_norm = False
        super().__post_init__()


class _FactoredWritePath:
    """Encoding and reconstruction error of rank-1 inputs ``X = k v^T`` from the factors alone."""

    def encode_factored(
        self, k: Float[Tensor, "... d_k"], v: Float[Tensor, "... d_v"]
    ) -> Float[Tensor, "... d_sae"]:
        """Equal to ``encode(vec(k v^T))``: ``a_i^T (k v^T - M) b_i = (a_i . k)(b_i . v) - a_i^T M b_i``."""
        a, b = self.encoder_factors()
        pre = (k.to(a) @ a.T) * (v.to(b) @ b.T) + self.b_enc
        if self.cfg.apply_b_dec_to_input:
            mean = self.b_dec.view(self.cfg.d_k, self.cfg.d_v)
            pre = pre - ((a @ mean) * b).sum(dim=-1)
        pre = self.hook_sae_acts_pre(pre)
        if self.cfg.rescale_acts_by_decoder_norm:
            pre = pre * self.atom_norms()
        return self.hook_sae_acts_post(self.activation_fn(pre))

    def factored_squared_error(
        self, k: Float[Tensor, "... d_k"], v: Float[Tensor, "... d_v"], acts: Float[Tensor, "... d_sae"]
    ) -> Float[Tensor, "..."]:
        """``||k v^T - decode(acts)||_F^2`` through Gram identities, never forming a d_k x d_v matrix per token.

        With ``R = sum_i c_i u_i w_i^T`` (``c`` the decoder-side coefficients) and ``B = b_dec``:
        ``||kv^T - R - B||^2 = |k|^2|v|^2 + c^T G c + |B|^2 - 2 c.(Uk * Vv) - 2 k^T B v + 2 c.(diag U B V^T)``
        with ``G = (U U^T) * (V V^T)``.
        """
        c = acts / self.atom_norms().clamp(min=1e-8) if self.cfg.rescale_acts_by_decoder_norm else acts
        u, w = self.U_dec, self.V_dec
        k, v = k.to(u), v.to(w)
        gram = (u @ u.T) * (w @ w.T)
        err = (k * k).sum(-1) * (v * v).sum(-1) + ((c @ gram) * c).sum(-1) - 2 * (c * (k @ u.T) * (v @ w.T)).sum(-1)
        bias = self.b_dec.view(self.cfg.d_k, self.cfg.d_v)
        atom_dot_bias = ((u @ bias) * w).sum(dim=-1)
        return err + (bias * bias).sum() - 2 * ((k @ bias) * v).sum(-1) + 2 * (c * atom_dot_bias).sum(-1)


class WriteSAE(_FactoredWritePath, MatrixSAEMixin, BilinearEncoder, Rank1Decoder, SAE[WriteSAEConfig]):
    """Inference WriteSAE (bilinear encoder, rank-1 decoder)."""

    def __init__(self, cfg: WriteSAEConfig, use_error_term: bool = False):
        self.tied = cfg.tied
        super().__init__(cfg, use_error_term)

    def initialize_weights(self) -> None:
        self._init_matrix_weights(init_norm=1.0)


class WriteTrainingSAE(_FactoredWritePath, MatrixTrainingMixin, BilinearEncoder, Rank1Decoder, TrainingSAE[WriteTrainingSAEConfig]):
    """Training WriteSAE, for SAELens's ``LanguageModelSAETrainingRunner``."""

    def __init__(self, cfg: WriteTrainingSAEConfig, use_error_term: bool = False):
        self.tied = cfg.tied
        super().__init__(cfg, use_error_term)

    def initialize_weights(self) -> None:
        self._init_training_weights()
