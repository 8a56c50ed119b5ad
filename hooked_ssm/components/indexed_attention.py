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
        if cache is not None and cache.row_lengths is not None:
            raise ValueError("Indexed attention does not support ragged caches (rows continuing prefixes of different "
                             "lengths); continue the rows one length at a time.")
        offset = 0 if cache is None else cache.length
        positions = torch.arange(offset, offset + x.shape[1], device=x.device)
        selected, index_keys = self.indexer(x, positions, None if cache is None else cache.index_keys, attention_mask)
        if cache is not None:
            cache.index_keys = index_keys
        return super().forward(x, cache, attention_mask, key_selection=selected)
