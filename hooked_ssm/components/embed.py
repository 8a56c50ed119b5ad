"""Token embedding and unembedding (optionally tied)."""

from __future__ import annotations

import torch
import torch.nn as nn
from jaxtyping import Float, Int
from torch import Tensor


class Embed(nn.Module):
    def __init__(self, d_vocab: int, d_model: int):
        super().__init__()
        self.W_E = nn.Parameter(torch.empty(d_vocab, d_model))
        nn.init.normal_(self.W_E, std=0.02)

    def forward(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_model"]:
        return self.W_E[tokens]


class Unembed(nn.Module):
    """Stores the weight as ``[d_vocab, d_model]`` (like ``lm_head``) so tying shares one Parameter."""

    def __init__(self, d_vocab: int, d_model: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(d_vocab, d_model))
        nn.init.normal_(self.weight, std=0.02)

    @property
    def W_U(self) -> Float[Tensor, "d_model d_vocab"]:
        return self.weight.T

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_vocab"]:
        return x @ self.weight.T
