"""Token embedding and unembedding (optionally tied)."""

from __future__ import annotations

import torch
import torch.nn as nn
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens.utilities import apply_softcap


class Embed(nn.Module):
    """``W_E[tokens] * multiplier`` (the muP embedding multiplier of Granite 4.0-H / Falcon-H1; 1 elsewhere)."""

    def __init__(self, d_vocab: int, d_model: int, multiplier: float = 1.0):
        super().__init__()
        self.W_E = nn.Parameter(torch.empty(d_vocab, d_model))
        nn.init.normal_(self.W_E, std=0.02)
        self.multiplier = multiplier

    def forward(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_model"]:
        embedded = self.W_E[tokens]
        return embedded if self.multiplier == 1.0 else embedded * self.multiplier


class Unembed(nn.Module):
    """Stores the weight as ``[d_vocab, d_model]`` (like ``lm_head``) so tying shares one Parameter."""

    def __init__(self, d_vocab: int, d_model: int, logits_divisor: float = 1.0, soft_cap: float = -1.0):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(d_vocab, d_model))
        nn.init.normal_(self.weight, std=0.02)
        self.logits_divisor = logits_divisor  # muP ``logits_scaling`` of Granite 4.0-H (1 elsewhere)
        self.soft_cap = soft_cap  # ``cap * tanh(logits / cap)`` when > 0 (xLSTM)

    @property
    def W_U(self) -> Float[Tensor, "d_model d_vocab"]:
        return self.weight.T

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_vocab"]:
        logits = x @ self.weight.T
        logits = logits if self.logits_divisor == 1.0 else logits / self.logits_divisor
        return apply_softcap(logits, self.soft_cap)
