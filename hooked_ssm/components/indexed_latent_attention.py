"""GLM-5.3-Flash's ``indexed_attention`` layers (``Glm5NextTextAttention``): multi-head latent attention
without RoPE and with a low-rank query (``LatentAttention``), each query restricted to the keys its
k-pool indexer selects (``hooked_ssm.components.kpool_indexer``, at ``.indexer``), which reads the
query's normed latent. Hooks as ``LatentAttention`` plus the indexer's."""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from hooked_ssm.components.kpool_indexer import KPoolIndexer
from hooked_ssm.components.latent_attention import LatentAttention
from hooked_ssm.config import HookedSSMConfig
from hooked_ssm.state import IndexedAttentionCache


class IndexedLatentAttention(LatentAttention):
    def __init__(self, cfg: HookedSSMConfig):
        super().__init__(cfg, rotary=False)
        self.indexer = KPoolIndexer(cfg)

    def forward(
        self,
        x: Float[Tensor, "batch pos d_model"],
        cache: IndexedAttentionCache | None = None,
        attention_mask: Tensor | None = None,
    ) -> Float[Tensor, "batch pos d_model"]:
        batch, length, _ = x.shape
        offset = 0 if cache is None else cache.length
        real = torch.ones(batch, offset + length, dtype=torch.bool, device=x.device)
        if attention_mask is not None:
            real = real & attention_mask[:, -(offset + length) :].bool()
        if cache is not None and cache.key_mask is not None:  # a ragged cache: slots past a row's prefix are empty
            real = real & torch.cat([cache.key_mask, cache.key_mask.new_ones(batch, length)], dim=1)
        q_latent = self.query_latent(x)
        projected = self.project_from_latent(x, q_latent)
        selected, index_keys = self.indexer(x, q_latent, None if cache is None else cache.index_keys, real)
        if cache is not None:
            cache.index_keys = index_keys
        return super().forward(x, cache, attention_mask, key_selection=selected, projected=projected)
