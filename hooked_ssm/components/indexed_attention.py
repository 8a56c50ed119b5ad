"""Qwen4-Exp's ``indexed_attention`` layers: the gated attention of Qwen3.5, each query restricted to
the keys its QSA indexer selects (``hooked_ssm.components.qsa_indexer``); hooks as ``GatedAttention``
plus the indexer's at ``.indexer``."""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from hooked_ssm.components.attention import GatedAttention
from hooked_ssm.components.qsa_indexer import QSAIndexer
from hooked_ssm.config import HookedSSMConfig
from hooked_ssm.state import IndexedAttentionCache


class IndexedAttention(GatedAttention):
    def __init__(self, cfg: HookedSSMConfig):
        super().__init__(cfg)
        if cfg.rotary_dim > cfg.indexer_head_dim:
            raise ValueError(f"The indexer's heads ({cfg.indexer_head_dim}) must hold the rotary dims ({cfg.rotary_dim}).")
        self.indexer = QSAIndexer(cfg, self.rotary)

    def forward(
        self,
        x: Float[Tensor, "batch pos d_model"],
        cache: IndexedAttentionCache | None = None,
        attention_mask: Tensor | None = None,
    ) -> Float[Tensor, "batch pos d_model"]:
        batch, length, _ = x.shape
        offset = 0 if cache is None else cache.length
        real = None if attention_mask is None else attention_mask[:, -(offset + length) :].bool()
        positions = torch.arange(offset, offset + length, device=x.device).expand(batch, -1)
        if cache is not None and cache.row_lengths is not None:
            # A ragged cache (rows continuing prefixes of different lengths): a row's tokens go on from
            # its own length, and the slots between its prefix and this call's tokens hold nothing.
            positions = cache.row_lengths[:, None] + torch.arange(length, device=x.device)
            past_real = torch.cat([cache.key_mask, cache.key_mask.new_ones(batch, length)], dim=1)
            real = past_real if real is None else real & past_real
        key_positions = positions if cache is None or cache.index_positions is None else (
            torch.cat([cache.index_positions, positions], dim=1))
        selected, index_keys = self.indexer(
            x, positions, key_positions, None if cache is None else cache.index_keys, real
        )
        if cache is not None:
            cache.index_keys, cache.index_positions = index_keys, key_positions
        return super().forward(x, cache, attention_mask, key_selection=selected)
