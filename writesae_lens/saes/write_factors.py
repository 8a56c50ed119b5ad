"""The write-factor input of ``"writesae"`` (``input_kind="write_factors"``): the SAE reads ``[k | v]``
(``d_in = d_k + d_v``, e.g. SAELens's activation store on ``blocks.{l}.mixer.hook_write_factors``) and
scores the rank-1 write ``write_scale * k v^T`` from its factors, never materialising it.

:class:`FactorInput` (encode, decode, forward, folds, :meth:`~FactorInput.to_write_site`) and
:class:`FactorTraining` (SAELens's ``training_forward_pass``, the aux loss, saving, resuming) are mixed
in front of ``WriteSAE`` / ``WriteTrainingSAE`` by ``write_sae.py``, which builds them whenever a
config has ``input_kind="write_factors"``. They only override what changes when the input is the
factors; the bilinear / rank-1 scoring they call (``_factor_codes``, ``_code_squared_error``) belongs
to the architecture (``WriteSAEWeights``).
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Self

import torch
from jaxtyping import Float
from sae_lens.constants import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME
from sae_lens.saes.sae import TrainStepInput, TrainStepOutput, _disable_hooks
from safetensors import SafetensorError
from torch import Tensor

from writesae_lens.saes.factored import atom_dot_matrix, sparse_rank1_squared_error

FACTORS_HOOK, WRITE_HOOK = "hook_write_factors", "hook_write"


def write_hook_name(hook_name: str | None) -> str | None:
    """``blocks.{l}.mixer.hook_write_factors`` -> ``blocks.{l}.mixer.hook_write`` (other names unchanged)."""
    if hook_name and hook_name.endswith(FACTORS_HOOK):
        return hook_name[: -len(FACTORS_HOOK)] + WRITE_HOOK
    return hook_name


def rows(x: Tensor, d: int) -> Tensor:
    return x.reshape(-1, d)


class FactorInput:
    """A ``writesae`` reading ``[k | v]``; ``decode`` gives the write ``vec(k v^T)`` in raw units."""

    reads_write_factors = True
    # The same architecture reading vec(X): set by write_sae.py (WriteSAE / WriteTrainingSAE).
    matrix_class: type

    def split_factors(self, x: Float[Tensor, "... d_in"]) -> tuple[Float[Tensor, "... d_k"], Float[Tensor, "... d_v"]]:
        """``[k | v]`` -> ``(k, v)`` (raw units, the SAE's dtype)."""
        if x.shape[-1] != self.cfg.d_k + self.cfg.d_v:
            raise ValueError(
                f"Expected write factors [k | v] with last dim d_k + d_v = {self.cfg.d_k + self.cfg.d_v}, got shape "
                f"{list(x.shape)}."
            )
        x = x.to(self.dtype)
        return x[..., : self.cfg.d_k], x[..., self.cfg.d_k :]

    def encode(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_sae"]:
        return self.encode_factored(*self.split_factors(self.hook_sae_input(x)))

    def decode(self, feature_acts: Float[Tensor, "... d_sae"]) -> Float[Tensor, "... dk_dv"]:
        """Factor inputs: the reconstructed write ``vec(k v^T)`` in raw units (``write_scale`` undone)."""
        recon = self.hook_sae_recons(self._decode_no_bias(feature_acts) + self.b_dec)
        return recon / self.write_scale()

    def forward(self, x: Float[Tensor, "... d_in"]) -> Tensor:
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
        scale = self.write_scale()
        metadata = copy.deepcopy(self.cfg.metadata)
        source = metadata.hook_name
        metadata.hook_name = write_hook_name(source)
        metadata.write_factors_training = {"hook_name": source, "write_scale": scale}
        cfg = dataclasses.replace(
            self.cfg, d_in=self.cfg.d_k * self.cfg.d_v, input_kind="matrix", write_scale=None, metadata=metadata
        )
        site = self.matrix_class(cfg)
        site.load_state_dict(self.state_dict())
        if scale != 1.0:
            site.fold_activation_norm_scaling_factor(scale)
        return site.train(self.training)



class FactorTraining(FactorInput):
    """``training_forward_pass`` on write factors, for SAELens's trainer (which runs unchanged)."""

    def encode_with_hidden_pre(self, x: Tensor) -> tuple[Tensor, Tensor]:
        lead = x.shape[:-1]
        k, v = self.split_factors(self.hook_sae_input(x))
        acts, pre, _ = self._factor_codes(rows(k, self.cfg.d_k) * self.write_scale(), rows(v, self.cfg.d_v))
        return acts.reshape(*lead, -1), pre.reshape(*lead, -1)

    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        """MSE (and the aux loss) of ``write_scale * k v^T`` from the factors.

        Equal to the materialised ``training_forward_pass`` on ``vec(write_scale * k v^T)``. The
        materialised ``sae_in`` / ``sae_out`` (for SAELens's wandb metrics) are only built on logging
        steps; on other steps they are empty tensors (SAELens's trainer reads them only when logging).
        """
        cfg = self.cfg
        k, v = self.split_factors(self.hook_sae_input(step_input.sae_in))
        k, v = rows(k, cfg.d_k) * self.write_scale(), rows(v, cfg.d_v)
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
        """Save the ``hook_write`` form (:meth:`to_write_site`), usable for splicing and evals."""
        return self.to_write_site().save_inference_model(path)

    def load_weights_from_checkpoint(self, checkpoint_path: Path | str) -> None:
        """Resume: also adopt the checkpoint's ``write_scale`` (the weights were trained against it)."""
        checkpoint_path = Path(checkpoint_path)
        cfg_path = checkpoint_path / SAE_CFG_FILENAME
        if cfg_path.is_file():
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
