"""Qwen4-Exp's hashed n-gram embedding (the input of a Per-Layer Embedding layer).

For each order ``n = 2 .. ngram_size`` and each of its ``heads_per_ngram`` heads, the token n-gram
ending at a position is hashed as ``(t_0 m_0) xor (t_1 m_1) xor ... xor (t_{n-1} m_{n-1})`` (``t_s``
the token ``s`` back, ``m_s`` the layer's multipliers) modulo the head's prime vocabulary size, offset
into one shared table; the rows of all heads are concatenated. An n-gram does not reach back across
an end-of-sequence token: a position closer than ``s`` to the last EOS before it (or to the start)
reads EOS as its token ``s`` back. The multipliers, the heads' sizes and offsets are the checkpoint's.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens.hook_points import HookPoint

from hooked_ssm.config import HookedSSMConfig


class NGramEmbedding(nn.Module):
    def __init__(self, cfg: HookedSSMConfig, layer: int):
        super().__init__()
        if cfg.eos_token_id is None:
            raise ValueError("The n-gram embedding needs cfg.eos_token_id (it resets n-grams at EOS).")
        self.ngram_size, self.heads_per_ngram, self.eos = cfg.ngram_size, cfg.heads_per_ngram, cfg.eos_token_id
        n_heads = (self.ngram_size - 1) * self.heads_per_ngram
        self.register_buffer("multipliers", torch.ones(self.ngram_size, dtype=torch.long))
        self.register_buffer("head_vocab_sizes", torch.ones(n_heads, dtype=torch.long))
        self.register_buffer("head_offsets", torch.zeros(n_heads, dtype=torch.long))
        self.table = nn.Embedding(cfg.ple_ngram_rows[layer], cfg.ple_embed_dim // n_heads)
        self.hook_ids = HookPoint()  # [batch, pos, ngram_head]: the rows read (offsets included)

    @property
    def context(self) -> int:
        """Tokens before a call that its n-grams read (the decoding cache keeps them)."""
        return self.ngram_size - 1

    def forward(
        self, tokens: Int[Tensor, "batch pos"], past: Int[Tensor, "batch context"] | None
    ) -> tuple[Float[Tensor, "batch pos ple_embed"], Int[Tensor, "batch context"]]:
        """The embeddings of this call's tokens, and the next ``past``: the last ``context`` tokens
        plus one. 0 stands for "before the first token" (read as EOS), so a context of zeros, as an
        untouched decoding cache holds, is the start of a sequence."""
        if past is None:
            past = tokens.new_zeros(tokens.shape[0], self.context)
        history = torch.cat([torch.where(past > 0, past - 1, self.eos).long(), tokens.long()], dim=1)
        shifted = [self._back(history, shift) for shift in range(self.ngram_size)]
        blocks = []
        for order in range(2, self.ngram_size + 1):
            mixed = shifted[0] * self.multipliers[0]
            for shift in range(1, order):
                mixed = torch.bitwise_xor(mixed, shifted[shift] * self.multipliers[shift])
            heads = slice((order - 2) * self.heads_per_ngram, (order - 1) * self.heads_per_ngram)
            blocks.append(torch.remainder(mixed[..., None], self.head_vocab_sizes[heads]) + self.head_offsets[heads])
        ids = self.hook_ids(torch.cat(blocks, dim=-1)[:, self.context :])
        return self.table(ids).flatten(-2), history[:, -self.context :] + 1

    def _back(self, history: Int[Tensor, "batch pos"], shift: int) -> Int[Tensor, "batch pos"]:
        """The token ``shift`` back from each position, or EOS where that crosses an EOS or the start."""
        if shift == 0:
            return history
        positions = torch.arange(history.shape[1], device=history.device)
        eos_at = torch.where(history == self.eos, positions, -1)
        last_eos_before = torch.cummax(eos_at, dim=1).values.roll(1, dims=1)
        last_eos_before[:, 0] = -1
        source = positions - shift
        valid = (positions - (last_eos_before + 1) >= shift) & (source >= 0)
        shifted = history.gather(1, source.clamp_min(0).expand_as(history))
        return torch.where(valid, shifted, self.eos)
