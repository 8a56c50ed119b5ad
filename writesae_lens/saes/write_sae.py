"""``"writesae"``: the primary WriteSAE, a bilinear encoder and a rank-1 decoder (the paper's
BilinearSAE / "WriteSAE (primary)"; ``tied=True`` is its "tied bilinear" variant).

Because both sides are factored, a rank-1 input ``X = k v^T`` (a cache write) never needs to be
materialised: ``u^T (k v^T) w = (u.k)(v.w)`` for the encoder, Gram identities for the squared error
(``saes/factored.py``). Two ways to use that:

- :meth:`encode_factored` / :meth:`factored_squared_error` on any ``writesae``;
- ``input_kind="write_factors"``: the SAE *reads* ``[k | v]`` (``d_in = d_k + d_v``), e.g. SAELens's
  activation store on ``blocks.{l}.mixer.hook_write_factors``, and its ``training_forward_pass``
  scores ``k v^T`` from the factors: ``O(d_sae (d_k + d_v))`` per token for the encoder and
  ``O(min(k^2 (d_k + d_v), k d_k d_v))`` for the loss (TopK: only a row's ``k`` active atoms enter),
  instead of ``O(d_sae d_k d_v)``; the dead-latent aux loss, while atoms are dead, adds the same for
  its ``k_aux`` atoms. Loss, gradients and codes equal the materialised ones on ``write_scale * k v^T``.
  :meth:`to_write_site` turns such an SAE into the ordinary ``hook_write`` SAE (``write_scale``
  folded into the weights); saving the trained SAE with ``save_inference_model`` saves that form.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Self

import torch
import torch.nn as nn
from jaxtyping import Float, Int
from sae_lens.saes.sae import SAE, SAEConfig, TrainingSAE, TrainingSAEConfig
from torch import Tensor

from writesae_lens.saes.base import (
    MatrixSAEFields,
    MatrixSAEMixin,
    MatrixTrainingFields,
    MatrixTrainingMixin,
    MatrixWeights,
)
from writesae_lens.saes.factored import (
    atom_dot_matrix,
    cheapest_strategy,
    dense_rank1_squared_error,
    sparse_rank1_squared_error,
)
from writesae_lens.saes.weights import (
    bilinear_pre,
    normalize_rank1_,
    random_unit_rows,
    rank1_decode,
    rank1_matrices,
    rank1_norms,
    unit_rows,
)
from writesae_lens.saes.write_factors import FactorInput, FactorTraining, rows, write_hook_name

ARCHITECTURE = "writesae"


@dataclass(kw_only=True)
class WriteSAEConfig(MatrixSAEFields, SAEConfig):
    tied: bool = False
    FACTOR_INPUTS = True

    @classmethod
    def architecture(cls) -> str:
        return ARCHITECTURE

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.tied and self.rescale_acts_by_decoder_norm:
            raise ValueError("tied=True shares factors between encoder and decoder; set rescale_acts_by_decoder_norm=False.")
        _check_tied_scale(self)


@dataclass(kw_only=True)
class WriteTrainingSAEConfig(MatrixTrainingFields, MatrixSAEFields, TrainingSAEConfig):
    tied: bool = False
    rescale_acts_by_decoder_norm: bool = True
    FACTOR_INPUTS = True

    @classmethod
    def architecture(cls) -> str:
        return ARCHITECTURE

    def __post_init__(self) -> None:
        if self.tied:
            self.rescale_acts_by_decoder_norm = False
        super().__post_init__()
        _check_tied_scale(self)


def _check_tied_scale(cfg: Any) -> None:
    if cfg.tied and cfg.write_scale not in (None, 1, 1.0):
        raise ValueError(
            "tied=True cannot use a write_scale: folding it into the weights would scale the encoder and the "
            "decoder factors in opposite directions, and they are the same tensors. Set write_scale=None."
        )


class WriteSAEWeights(MatrixWeights):
    """Bilinear encoder ``pre_i = a_i^T X b_i + c_i`` (``A_enc``, ``B_enc``; with ``tied`` the decoder's
    own factors) and rank-1 atoms ``u_i w_i^T`` (``U_dec``, ``V_dec``); ``W_enc`` / ``W_dec`` are
    derived views. Both sides factor, so a rank-1 input ``k v^T`` is scored from ``k`` and ``v``
    (:meth:`encode_factored`, :meth:`factored_squared_error`)."""

    reads_write_factors = False

    def init_encoder_decoder(self, init_norm: float | None) -> None:
        cfg, kw = self.cfg, dict(dtype=self.dtype, device=self.device)
        factor_norm = (init_norm or 1.0) ** 0.5
        self.U_dec = nn.Parameter(random_unit_rows(cfg.d_sae, cfg.d_k, **kw, norm=factor_norm))
        self.V_dec = nn.Parameter(random_unit_rows(cfg.d_sae, cfg.d_v, **kw, norm=factor_norm))
        self.b_enc = nn.Parameter(self.U_dec.new_zeros(cfg.d_sae))
        if not cfg.tied:
            self.A_enc = nn.Parameter(self.U_dec.detach().clone())
            self.B_enc = nn.Parameter(self.V_dec.detach().clone())

    def encoder_factors(self) -> tuple[Float[Tensor, "d_sae d_k"], Float[Tensor, "d_sae d_v"]]:
        return (self.U_dec, self.V_dec) if self.cfg.tied else (self.A_enc, self.B_enc)

    @property
    def W_enc(self) -> Float[Tensor, "d_in d_sae"]:
        return rank1_matrices(*self.encoder_factors()).T

    @property
    def W_dec(self) -> Float[Tensor, "d_sae d_in"]:
        return rank1_matrices(self.U_dec, self.V_dec)

    def hidden_pre(self, sae_in: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_sae"]:
        return bilinear_pre(sae_in, *self.encoder_factors(), self.cfg.d_k, self.cfg.d_v) + self.b_enc

    def atom_norms(self) -> Float[Tensor, " d_sae"]:
        """Frobenius norm of each atom: ``||u_i|| ||w_i||``."""
        return rank1_norms(self.U_dec, self.V_dec)

    def atoms(self) -> tuple[Float[Tensor, "d_sae d_k"], Float[Tensor, "d_sae d_v"]]:
        """Unit-norm factors ``(u_i/||u_i||, w_i/||w_i||)``: atom i is ``outer(u_i, w_i)`` with norm 1."""
        return unit_rows(self.U_dec), unit_rows(self.V_dec)

    def decode_atoms(self, acts: Float[Tensor, "... d_sae"]) -> Float[Tensor, "... d_in"]:
        return rank1_decode(acts, self.U_dec, self.V_dec)

    def scale_encoder_(self, scale: Tensor) -> None:
        if self.cfg.tied:
            raise NotImplementedError("A tied encoder shares the decoder's factors; it cannot be rescaled alone.")
        self.A_enc.data.mul_(scale[:, None] if scale.dim() else scale)

    def scale_decoder_(self, scale: Tensor) -> None:
        self.U_dec.data.mul_(scale[:, None] if scale.dim() else scale)

    def normalize_decoder_(self) -> Tensor:
        return normalize_rank1_(self.U_dec.data, self.V_dec.data)

    def fold_norms_into(self, state_dict: dict[str, Tensor], norms: Tensor) -> None:
        if self.cfg.tied:
            raise NotImplementedError("A tied bilinear SAE cannot fold decoder norms; train it with rescale off.")
        state_dict.update(
            b_enc=state_dict["b_enc"] * norms, A_enc=state_dict["A_enc"] * norms[:, None],
            U_dec=unit_rows(state_dict["U_dec"]), V_dec=unit_rows(state_dict["V_dec"]),
        )

    def to_write_site(self) -> Self:
        """The ``hook_write`` form of this SAE: a matrix-input SAE already is it (see ``FactorInput``)."""
        return self

    def write_scale(self) -> float:
        """The factor the write is multiplied by before the SAE sees it (1 for matrix inputs)."""
        scale = self.cfg.write_scale
        if scale == "auto":
            raise RuntimeError(
                "sae.cfg.write_scale is 'auto' and has not been estimated yet. writesae_lens's runner "
                "(writesae_lens.training.build_runner / WriteSAETrainingRunner) estimates it before training; "
                "outside it, set sae.cfg.write_scale to a number (sqrt(d_k*d_v) / mean ||k v^T||_F is what "
                "SAELens's 'expected_average_only_in' would use on hook_write)."
            )
        return 1.0 if scale is None else float(scale)

    # ---------------------------------------------------------------- encoding
    def _factor_pre(self, k: Float[Tensor, "rows d_k"], v: Float[Tensor, "rows d_v"]) -> Float[Tensor, "rows d_sae"]:
        """Pre-activations of the (scaled) write ``k v^T``: ``a_i^T (k v^T - M) b_i = (a_i.k)(b_i.v) - a_i^T M b_i``."""
        a, b = self.encoder_factors()
        pre = (k @ a.T) * (v @ b.T) + self.b_enc
        if self.cfg.apply_b_dec_to_input:
            pre = pre - atom_dot_matrix(a, b, self.b_dec.view(self.cfg.d_k, self.cfg.d_v))
        pre = self.hook_sae_acts_pre(pre)
        if self.cfg.rescale_acts_by_decoder_norm:
            pre = pre * self.atom_norms()
        return pre

    def _factor_codes(
        self, k: Float[Tensor, "rows d_k"], v: Float[Tensor, "rows d_v"]
    ) -> tuple[Float[Tensor, "rows d_sae"], Float[Tensor, "rows d_sae"], Int[Tensor, "rows k"] | None]:
        """``(acts, hidden_pre, index)``: ``index`` holds each row's TopK atoms (None for BatchTopK)."""
        pre = self._factor_pre(k, v)
        if self.cfg.sparsity == "topk":
            # SAELens's TopK, keeping the indices so the loss never has to search for the active atoms.
            top = pre.topk(int(self.cfg.k), dim=-1, sorted=False)
            acts, index = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu()), top.indices
        else:
            acts, index = self.activation_fn(pre), None
        return self.hook_sae_acts_post(acts), pre, index

    def encode_factored(self, k: Float[Tensor, "... d_k"], v: Float[Tensor, "... d_v"]) -> Float[Tensor, "... d_sae"]:
        """Equal to ``encode(vec(k v^T))`` of the write-site SAE (``k``, ``v`` raw; ``write_scale`` applied)."""
        lead = k.shape[:-1]
        k, v = rows(k, self.cfg.d_k).to(self.dtype) * self.write_scale(), rows(v, self.cfg.d_v).to(self.dtype)
        return self._factor_codes(k, v)[0].reshape(*lead, -1)

    # ---------------------------------------------------------------- squared error
    def _active_codes(
        self, acts: Float[Tensor, "rows d_sae"], index: Int[Tensor, "rows n"] | None
    ) -> tuple[Float[Tensor, "rows n"], Int[Tensor, "rows n"]]:
        """Decoder-side coefficients of each row's active atoms and their indices."""
        if index is None:
            # BatchTopK / arbitrary codes: rows have no fixed count, so find the largest (one host sync).
            n = int((acts != 0).sum(-1).max()) if acts.numel() else 0
            index = acts.topk(n, dim=-1, sorted=False).indices
        values = acts.gather(-1, index)
        if self.cfg.rescale_acts_by_decoder_norm:
            values = values / self.atom_norms().clamp(min=1e-8)[index]
        return values, index

    def _code_squared_error(
        self, k: Tensor, v: Tensor, acts: Tensor, index: Tensor | None, atom_dot_bias: Tensor
    ) -> tuple[Float[Tensor, " rows"], Tensor, Tensor]:
        """``(||k v^T - decode(acts)||^2 per row, active coefficients, their indices)``."""
        cfg, u, w = self.cfg, self.U_dec, self.V_dec
        bias = self.b_dec.view(cfg.d_k, cfg.d_v)
        values, index = self._active_codes(acts, index)
        strategy = cheapest_strategy(k.shape[0], index.shape[-1], cfg.d_k, cfg.d_v, cfg.d_sae)
        if strategy == "dense":
            codes = acts / self.atom_norms().clamp(min=1e-8) if cfg.rescale_acts_by_decoder_norm else acts
            err = dense_rank1_squared_error(k, v, codes, u, w, bias, atom_dot_bias)
        else:
            err = sparse_rank1_squared_error(k, v, values, u[index], w[index], bias, atom_dot_bias[index], strategy)
        return err, values, index

    def factored_squared_error(
        self, k: Float[Tensor, "... d_k"], v: Float[Tensor, "... d_v"], acts: Float[Tensor, "... d_sae"]
    ) -> Float[Tensor, " ..."]:
        """``||s k v^T - decode(acts)||_F^2`` (``s = write_scale``; the SAE's working units, as its loss),
        through Gram identities over each row's active atoms, never forming a d_k x d_v matrix per
        token (unless, for many active atoms, that is cheaper)."""
        lead = k.shape[:-1]
        k, v = rows(k, self.cfg.d_k).to(self.dtype) * self.write_scale(), rows(v, self.cfg.d_v).to(self.dtype)
        adb = atom_dot_matrix(self.U_dec, self.V_dec, self.b_dec.view(self.cfg.d_k, self.cfg.d_v))
        return self._code_squared_error(k, v, rows(acts, self.cfg.d_sae), None, adb)[0].reshape(lead)



class WriteSAE(WriteSAEWeights, MatrixSAEMixin, SAE[WriteSAEConfig]):
    """Inference WriteSAE (bilinear encoder, rank-1 decoder). Built from a config with
    ``input_kind="write_factors"`` it is a :class:`WriteFactorsSAE`."""

    def __new__(cls, cfg: WriteSAEConfig | None = None, *args: Any, **kwargs: Any) -> Self:
        return super().__new__(_input_class(cls, cfg, WriteSAE, WriteFactorsSAE))


class WriteTrainingSAE(WriteSAEWeights, MatrixTrainingMixin, TrainingSAE[WriteTrainingSAEConfig]):
    """Training WriteSAE, for SAELens's ``LanguageModelSAETrainingRunner``. Built from a config with
    ``input_kind="write_factors"`` it is a :class:`WriteFactorsTrainingSAE`."""

    def __new__(cls, cfg: WriteTrainingSAEConfig | None = None, *args: Any, **kwargs: Any) -> Self:
        return super().__new__(_input_class(cls, cfg, WriteTrainingSAE, WriteFactorsTrainingSAE))


class WriteFactorsSAE(FactorInput, WriteSAE):
    """``WriteSAE`` reading write factors ``[k | v]`` (see ``write_factors.py``)."""

    matrix_class = WriteSAE


class WriteFactorsTrainingSAE(FactorTraining, WriteTrainingSAE):
    """``WriteTrainingSAE`` reading write factors ``[k | v]`` (see ``write_factors.py``)."""

    matrix_class = WriteTrainingSAE


def _input_class(cls: type, cfg: Any, matrix_class: type, factor_class: type) -> type:
    # SAELens builds every SAE as registry_class(cfg): the config's input_kind picks the class here.
    # (cfg is None when copy / pickle re-create an instance: keep the class they ask for.)
    if cfg is not None and cls is matrix_class and cfg.input_kind == "write_factors":
        return factor_class
    return cls


__all__ = [
    "WriteFactorsSAE",
    "WriteFactorsTrainingSAE",
    "WriteSAE",
    "WriteSAEConfig",
    "WriteSAEWeights",
    "WriteTrainingSAE",
    "WriteTrainingSAEConfig",
    "write_hook_name",
]
