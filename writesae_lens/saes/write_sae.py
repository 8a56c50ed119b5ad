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

import copy
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import torch
from jaxtyping import Float, Int
from sae_lens.constants import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME
from sae_lens.saes.sae import (
    SAE,
    SAEConfig,
    TrainingSAE,
    TrainingSAEConfig,
    TrainStepInput,
    TrainStepOutput,
    _disable_hooks,
)
from safetensors import SafetensorError
from torch import Tensor

from writesae_lens.saes.factored import (
    atom_dot_matrix,
    cheapest_strategy,
    dense_rank1_squared_error,
    sparse_rank1_squared_error,
)
from writesae_lens.saes.matrix_sae import (
    BilinearEncoder,
    MatrixSAEFields,
    MatrixSAEMixin,
    MatrixTrainingFields,
    MatrixTrainingMixin,
    Rank1Decoder,
)

ARCHITECTURE = "writesae"
FACTORS_HOOK, WRITE_HOOK = "hook_write_factors", "hook_write"


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


def write_hook_name(hook_name: str | None) -> str | None:
    """``blocks.{l}.mixer.hook_write_factors`` -> ``blocks.{l}.mixer.hook_write`` (other names unchanged)."""
    if hook_name and hook_name.endswith(FACTORS_HOOK):
        return hook_name[: -len(FACTORS_HOOK)] + WRITE_HOOK
    return hook_name


def _rows(x: Tensor, d: int) -> Tensor:
    return x.reshape(-1, d)


class _FactoredWritePath:
    """Scoring rank-1 inputs ``k v^T`` from their factors; shared by the inference and training WriteSAE."""

    @property
    def reads_write_factors(self) -> bool:
        """True when the SAE's input is ``[k | v]`` (``input_kind="write_factors"``)."""
        return self.cfg.input_kind == "write_factors"

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

    def split_factors(self, x: Float[Tensor, "... d_in"]) -> tuple[Float[Tensor, "... d_k"], Float[Tensor, "... d_v"]]:
        """``[k | v]`` -> ``(k, v)`` (raw units, the SAE's dtype)."""
        if x.shape[-1] != self.cfg.d_k + self.cfg.d_v:
            raise ValueError(
                f"Expected write factors [k | v] with last dim d_k + d_v = {self.cfg.d_k + self.cfg.d_v}, got shape "
                f"{list(x.shape)}."
            )
        x = x.to(self.dtype)
        return x[..., : self.cfg.d_k], x[..., self.cfg.d_k :]

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
        k, v = _rows(k, self.cfg.d_k).to(self.dtype) * self.write_scale(), _rows(v, self.cfg.d_v).to(self.dtype)
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
        k, v = _rows(k, self.cfg.d_k).to(self.dtype) * self.write_scale(), _rows(v, self.cfg.d_v).to(self.dtype)
        adb = atom_dot_matrix(self.U_dec, self.V_dec, self.b_dec.view(self.cfg.d_k, self.cfg.d_v))
        return self._code_squared_error(k, v, _rows(acts, self.cfg.d_sae), None, adb)[0].reshape(lead)

    # ---------------------------------------------------------------- SAE interface for factor inputs
    def encode(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_sae"]:
        if not self.reads_write_factors:
            return super().encode(x)
        return self.encode_factored(*self.split_factors(self.hook_sae_input(x)))

    def decode(self, feature_acts: Float[Tensor, "... d_sae"]) -> Float[Tensor, "... dk_dv"]:
        """Factor inputs: the reconstructed write ``vec(k v^T)`` in raw units (``write_scale`` undone)."""
        if not self.reads_write_factors:
            return super().decode(feature_acts)
        recon = self.hook_sae_recons(self._decode_no_bias(feature_acts) + self.b_dec)
        return recon / self.write_scale()

    def forward(self, x: Float[Tensor, "... d_in"]) -> Tensor:
        if not self.reads_write_factors:
            return super().forward(x)
        sae_out = self.decode(self.encode(x))
        if self.use_error_term:
            with torch.no_grad():
                with _disable_hooks(self):
                    clean = self.decode(self.encode(x))
                k, v = self.split_factors(x)
                sae_out = sae_out + self.hook_sae_error((k[..., :, None] * v[..., None, :]).flatten(-2) - clean)
        return self.hook_sae_output(sae_out)

    @torch.no_grad()
    def fold_activation_norm_scaling_factor(self, scaling_factor: float) -> None:
        if not self.reads_write_factors:
            return super().fold_activation_norm_scaling_factor(scaling_factor)
        # For factor inputs "the input was scaled by s" means the write was: it joins write_scale.
        self.cfg.write_scale = self.write_scale() * float(scaling_factor)
        self.cfg.normalize_activations = "none"

    def to_write_site(self) -> Self:
        """This SAE as the ordinary ``hook_write`` SAE (same class, ``input_kind="matrix"``).

        It reads ``vec(k v^T)`` (``[..., d_k*d_v]``) in raw units: ``write_scale`` is folded into the
        weights, ``metadata.hook_name`` goes from ``...hook_write_factors`` to ``...hook_write``, and
        ``metadata.write_factors_training`` records where it was trained. Splice, evaluate and
        intervene with that SAE. A matrix-input SAE is returned as is.
        """
        if not self.reads_write_factors:
            return self
        scale = self.write_scale()
        metadata = copy.deepcopy(self.cfg.metadata)
        source = metadata.hook_name
        metadata.hook_name = write_hook_name(source)
        metadata.write_factors_training = {"hook_name": source, "write_scale": scale}
        cfg = dataclasses.replace(
            self.cfg, d_in=self.cfg.d_k * self.cfg.d_v, input_kind="matrix", write_scale=None, metadata=metadata
        )
        site = type(self)(cfg)
        site.load_state_dict(self.state_dict())
        if scale != 1.0:
            site.fold_activation_norm_scaling_factor(scale)
        return site.train(self.training)


class _FactoredTraining:
    """``training_forward_pass`` on write factors, for SAELens's trainer (which runs unchanged)."""

    def encode_with_hidden_pre(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if not self.reads_write_factors:
            return super().encode_with_hidden_pre(x)
        lead = x.shape[:-1]
        k, v = self.split_factors(self.hook_sae_input(x))
        acts, pre, _ = self._factor_codes(_rows(k, self.cfg.d_k) * self.write_scale(), _rows(v, self.cfg.d_v))
        return acts.reshape(*lead, -1), pre.reshape(*lead, -1)

    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        """Factor inputs: MSE (and the aux loss) of ``write_scale * k v^T`` from the factors.

        Equal to the materialised ``training_forward_pass`` on ``vec(write_scale * k v^T)``. The
        materialised ``sae_in`` / ``sae_out`` (for SAELens's wandb metrics) are only built on logging
        steps; on other steps they are empty tensors (SAELens's trainer reads them only when logging).
        """
        if not self.reads_write_factors:
            return super().training_forward_pass(step_input)
        cfg = self.cfg
        k, v = self.split_factors(self.hook_sae_input(step_input.sae_in))
        k, v = _rows(k, cfg.d_k) * self.write_scale(), _rows(v, cfg.d_v)
        acts, hidden_pre, index = self._factor_codes(k, v)
        atom_dot_bias = atom_dot_matrix(self.U_dec, self.V_dec, self.b_dec.view(cfg.d_k, cfg.d_v))
        err, values, index = self._code_squared_error(k, v, acts, index, atom_dot_bias)
        losses = {"mse_loss": err.mean()}
        losses.update(self._factored_aux_loss(step_input, k, v, hidden_pre, values, index, atom_dot_bias))
        if step_input.is_logging_step:
            sae_in = (k[:, :, None] * v[:, None, :]).flatten(1)
            sae_out = self._decode_no_bias(acts) + self.b_dec
        else:
            sae_in = sae_out = k.new_empty(0)
        output = TrainStepOutput(
            sae_in=sae_in, sae_out=sae_out, feature_acts=acts, hidden_pre=hidden_pre,
            loss=sum(losses.values()), losses=losses,  # type: ignore[arg-type]
        )
        return self._update_topk_threshold(output)

    def _factored_aux_loss(
        self, step_input: TrainStepInput, k: Tensor, v: Tensor, hidden_pre: Tensor, values: Tensor, index: Tensor,
        atom_dot_bias: Tensor,
    ) -> dict[str, Tensor]:
        """SAELens's TopK dead-latent loss ``||A - (X - R - B).detach()||^2`` from factors.

        ``A - E = (R + A + B) - X``: the squared error of ``X`` against the live atoms (detached) plus the
        ``k_aux`` chosen dead atoms, so it is the same Gram / sparse computation over ``k + k_aux`` atoms.
        """
        dead = step_input.dead_neuron_mask
        if dead is None or (n_dead := int(dead.sum())) == 0:
            return {"auxiliary_reconstruction_loss": k.new_tensor(0.0)}
        cfg, u, w = self.cfg, self.U_dec, self.V_dec
        aux = torch.where(dead[None], hidden_pre, -torch.inf).topk(min(cfg.aux_k, n_dead), dim=-1, sorted=False)
        aux_values, aux_index = aux.values, aux.indices
        if cfg.rescale_acts_by_decoder_norm:
            aux_values = aux_values / self.atom_norms().clamp(min=1e-8)[aux_index]
        bias = self.b_dec.detach().view(cfg.d_k, cfg.d_v)
        n = values.shape[-1] + aux_values.shape[-1]
        if n * (cfg.d_k + cfg.d_v) <= cfg.d_k * cfg.d_v:  # few atoms: Gram blocks over live + dead atoms
            all_values = torch.cat([values.detach(), aux_values], dim=-1)
            u_rows = torch.cat([u.detach()[index], u[aux_index]], dim=1)
            w_rows = torch.cat([w.detach()[index], w[aux_index]], dim=1)
            dot_bias = torch.cat([atom_dot_bias.detach()[index], atom_dot_bias[aux_index]], dim=-1)
            err = sparse_rank1_squared_error(k, v, all_values, u_rows, w_rows, bias, dot_bias, "gram")
        else:  # k_aux in the hundreds: build each row's residual and dead-atom sum (O(n d_k d_v) < O(n^2 (d_k + d_v)))
            with torch.no_grad():
                live = (u[index] * values[..., None]).transpose(-1, -2) @ w[index]
                residual = k[:, :, None] * v[:, None, :] - live - bias
            dead_sum = (u[aux_index] * aux_values[..., None]).transpose(-1, -2) @ w[aux_index]
            err = (dead_sum - residual).pow(2).sum(dim=(-1, -2))
        scale = min(n_dead / cfg.aux_k, 1.0)
        return {"auxiliary_reconstruction_loss": cfg.aux_loss_coefficient * scale * err.mean()}

    def save_inference_model(self, path: str | Path) -> tuple[Path, Path]:
        """Factor inputs: save the ``hook_write`` form (:meth:`to_write_site`), usable for splicing and evals."""
        if not self.reads_write_factors:
            return super().save_inference_model(path)
        return self.to_write_site().save_inference_model(path)

    def load_weights_from_checkpoint(self, checkpoint_path: Path | str) -> None:
        """Resume: also adopt the checkpoint's ``write_scale`` (the weights were trained against it)."""
        checkpoint_path = Path(checkpoint_path)
        cfg_path = checkpoint_path / SAE_CFG_FILENAME
        if self.reads_write_factors and cfg_path.is_file():
            saved = json.loads(cfg_path.read_text()).get("write_scale")
            if saved is not None and saved != "auto":
                self.cfg.write_scale = float(saved)
        try:
            super().load_weights_from_checkpoint(checkpoint_path)
        except SafetensorError as err:
            raise ValueError(
                f"The checkpoint weights {checkpoint_path / SAE_WEIGHTS_FILENAME} are not a readable safetensors "
                f"file ({err}); resume from an earlier checkpoint."
            ) from err


class WriteSAE(_FactoredWritePath, MatrixSAEMixin, BilinearEncoder, Rank1Decoder, SAE[WriteSAEConfig]):
    """Inference WriteSAE (bilinear encoder, rank-1 decoder)."""

    def __init__(self, cfg: WriteSAEConfig, use_error_term: bool = False):
        self.tied = cfg.tied
        super().__init__(cfg, use_error_term)

    def initialize_weights(self) -> None:
        self._init_matrix_weights(init_norm=1.0)


class WriteTrainingSAE(
    _FactoredTraining, _FactoredWritePath, MatrixTrainingMixin, BilinearEncoder, Rank1Decoder, TrainingSAE[WriteTrainingSAEConfig]
):
    """Training WriteSAE, for SAELens's ``LanguageModelSAETrainingRunner``."""

    def __init__(self, cfg: WriteTrainingSAEConfig, use_error_term: bool = False):
        self.tied = cfg.tied
        super().__init__(cfg, use_error_term)

    def initialize_weights(self) -> None:
        self._init_training_weights()
