"""Hyper-connections (Qwen4-Exp's "gated residual"): the residual stream is ``hc`` streams of
``d_model`` side by side, ``[batch, pos, hc * d_model]``. Before each sublayer,

    n = norm_per_stream(resid)                                   hook_normalized (of .norm)
    m = sigmoid(W_up silu(W_down n / hc))    [hc, d_model]        hook_read_weights
    x = mean over streams of m * n           [d_model]           hook_in: the sublayer's input
    w = 2 sigmoid(W_inject n / hc)           [hc]                hook_write_weights

and after it ``resid + w_i * sublayer(x)`` in stream ``i`` (``inject``). Without ``W_inject``
(``inject_weights=False``) it is the model's read-out before the unembedding, whose input is ``x``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor
from transformer_lens.hook_points import HookPoint

from hooked_ssm.components.norms import RMSNorm
from hooked_ssm.config import HookedSSMConfig


class HyperConnection(nn.Module):
    def __init__(self, cfg: HookedSSMConfig, inject_weights: bool = True):
        super().__init__()
        if cfg.hc_count < 2 or cfg.hc_lowrank < 1:
            raise ValueError(f"Hyper-connections need hc_count >= 2 and hc_lowrank >= 1; got {cfg.hc_count}, {cfg.hc_lowrank}.")
        self.hc, self.d_model = cfg.hc_count, cfg.d_model
        self.norm = RMSNorm(cfg.d_resid, cfg.eps, cfg.norm_zero_centered, group_size=cfg.d_model)
        self.read_down = nn.Linear(cfg.d_resid, cfg.hc_lowrank, bias=False)
        self.read_up = nn.Linear(cfg.hc_lowrank, cfg.d_resid, bias=False)
        self.inject_weights = nn.Linear(cfg.d_resid, self.hc, bias=False) if inject_weights else None

        self.hook_read_weights = HookPoint()  # [batch, pos, hc, d_model]: m, each stream's weight in the mix
        self.hook_in = HookPoint()  # [batch, pos, d_model]: x, the mixed input of the sublayer (or the unembedding)
        if inject_weights:
            self.hook_write_weights = HookPoint()  # [batch, pos, hc]: w, the sublayer output's weight in each stream

    def forward(
        self, resid: Float[Tensor, "batch pos hc_d_model"]
    ) -> tuple[Float[Tensor, "batch pos d_model"], Float[Tensor, "batch pos hc"] | None]:
        """The sublayer's input and the weights of its output in the streams (None for the read-out)."""
        normed = self.norm(resid)
        low_rank = F.silu(self.read_down(normed) / self.hc)
        read = self.hook_read_weights(torch.sigmoid(self.read_up(low_rank)).unflatten(-1, (self.hc, self.d_model)))
        x = self.hook_in((read * normed.unflatten(-1, (self.hc, self.d_model))).mean(dim=-2))
        if self.inject_weights is None:
            return x, None
        return x, self.hook_write_weights(2 * torch.sigmoid(self.inject_weights(normed) / self.hc))

    @staticmethod
    def inject(
        resid: Float[Tensor, "batch pos hc_d_model"],
        out: Float[Tensor, "batch pos d_model"],
        weights: Float[Tensor, "batch pos hc"],
    ) -> Float[Tensor, "batch pos hc_d_model"]:
        """``resid + w_i * out`` in each stream ``i``."""
        return resid + (out.unsqueeze(-2) * weights.unsqueeze(-1)).flatten(-2)


class HyperConnectionReadout(HyperConnection):
    """``ln_final`` of a model with hyper-connections: the streams mixed into one ``[d_model]``
    vector, normed per stream first (transformers' ``hyper_connection_mixer``; no other final norm)."""

    def __init__(self, cfg: HookedSSMConfig):
        super().__init__(cfg, inject_weights=False)

    def forward(self, resid: Float[Tensor, "batch pos hc_d_model"]) -> Float[Tensor, "batch pos d_model"]:
        return super().forward(resid)[0]
