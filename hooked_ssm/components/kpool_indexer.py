"""GLM-5.3-Flash's sparse-attention indexer (``Glm5NextTextIndexer``: DeepSeek Sparse Attention with
k-pool compression): which keys each query of an ``indexed_latent_attention`` layer may see.

Each row's real tokens, in order from its first, are cut into pools of ``r = indexer_compress_ratio``
(consecutive slots, except where a ragged cache leaves empty slots between a row's prefix and its next
tokens: the pools skip them, so a continued row pools as a re-run does); a pool is complete when it
holds ``r`` real tokens. Per token, an index key
``k = LayerNorm(W_k x)`` and a pooling logit ``W_gate x``; a pool's key is the average of its
tokens' keys weighted by ``softmax(W_gate x + ape)`` over the pool (``ape``: a learned logit per
place in the pool). A query scores each pool by ``sum_h w_h relu(q_h . K_pool) / sqrt(d)``, with
``q = W_qb q_latent`` from the attention's low-rank query latent and head weights
``w = W_w x / sqrt(n_heads)``, and keeps the ``indexer_budget / r`` best of the complete pools whose
last token it sees, plus (``indexer_tail``) the real tokens it sees after them. The selection only
narrows the causal mask.

The best pools are chosen by ``torch.topk`` over the same row of pools as transformers (every pool
complete in some row of the batch, the others scored ``finfo.min``), so ties resolve as there.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from jaxtyping import Bool, Float
from torch import Tensor
from transformer_lens.hook_points import HookPoint

from hooked_ssm.components.norms import LayerNorm
from hooked_ssm.config import HookedSSMConfig

INDEX_KEY_NORM_EPS = 1e-6  # Glm5NextTextIndexer's k_norm, whatever rms_norm_eps says


class KPoolIndexer(nn.Module):
    def __init__(self, cfg: HookedSSMConfig):
        super().__init__()
        if min(cfg.indexer_n_heads, cfg.indexer_head_dim, cfg.indexer_budget, cfg.indexer_compress_ratio,
               cfg.mla_q_lora_rank) < 1:
            raise ValueError("An indexed_latent_attention layer needs indexer_n_heads, indexer_head_dim, indexer_budget, "
                             "indexer_compress_ratio and mla_q_lora_rank >= 1 in the config.")
        if cfg.indexer_budget % cfg.indexer_compress_ratio:
            raise ValueError(f"indexer_budget ({cfg.indexer_budget}) must be a multiple of indexer_compress_ratio "
                             f"({cfg.indexer_compress_ratio}).")
        self.n_heads, self.d_head = cfg.indexer_n_heads, cfg.indexer_head_dim
        self.pool_size, self.tail = cfg.indexer_compress_ratio, cfg.indexer_tail
        self.pools_kept = cfg.indexer_budget // cfg.indexer_compress_ratio
        self.q_proj = nn.Linear(cfg.mla_q_lora_rank, self.n_heads * self.d_head, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, self.d_head, bias=False)
        self.k_norm = LayerNorm(self.d_head, INDEX_KEY_NORM_EPS)
        self.head_weights = nn.Linear(cfg.d_model, self.n_heads, bias=False)
        self.pool_gate = nn.Linear(cfg.d_model, self.d_head, bias=False)
        self.pool_logit_bias = nn.Parameter(torch.zeros(self.pool_size, self.d_head))  # ape

        self.hook_q = HookPoint()  # [batch, pos, index_head, d_index]
        self.hook_k = HookPoint()  # [batch, pos, d_index]: token keys, before pooling
        self.hook_pool_scores = HookPoint()  # [batch, pos, pool]: finfo.min for pools the query may not pick
        self.hook_selected = HookPoint()  # [batch, pos, key_pos] bool: the keys each query may see

    def forward(
        self,
        x: Float[Tensor, "batch pos d_model"],
        q_latent: Float[Tensor, "batch pos q_rank"],
        past: Float[Tensor, "batch past two_d_index"] | None,
        real: Bool[Tensor, "batch key_pos"],
    ) -> tuple[Bool[Tensor, "batch pos key_pos"], Float[Tensor, "batch key_pos two_d_index"]]:
        """The keys (cache slots: past, then this call's tokens) each query may see, and every slot's
        ``[key | pooling logit]`` (the cache's next ``past``). ``real``: False at pads and empty slots."""
        batch, length, _ = x.shape
        q = self.hook_q(self.q_proj(q_latent).view(batch, length, self.n_heads, self.d_head))
        packed = torch.cat([self.hook_k(self.k_norm(self.k_proj(x))), self.pool_gate(x)], dim=-1)
        if past is not None:
            packed = torch.cat([past, packed], dim=1)
        keys, logits = packed.split(self.d_head, dim=-1)
        n_keys, device = packed.shape[1], x.device
        slots = torch.arange(n_keys, device=device)
        visible = (slots[None, :] <= slots[n_keys - length :, None]) & real[:, None, :]  # [batch, query, key]

        # Pool j of a row holds its real slots j*r ... j*r + r - 1, in order (consecutive slots from its first
        # real one, unless a ragged cache leaves empty slots between its prefix and this call's tokens).
        n_pools = -(-n_keys // self.pool_size)
        real_slots = torch.sort(torch.where(real, slots, n_keys + slots), dim=1).values
        pool_slots = F.pad(real_slots, (0, n_pools * self.pool_size - n_keys), value=2 * n_keys)
        pool_slots = pool_slots.view(batch, n_pools, self.pool_size)
        in_pool = pool_slots < n_keys
        complete = in_pool.all(-1)
        safe = pool_slots.clamp_max(n_keys - 1)
        rows = torch.arange(batch, device=device)[:, None, None]
        pool_logits = (logits[rows, safe].float() + self.pool_logit_bias.float()).masked_fill(~in_pool[..., None], float("-inf"))
        pool_keys = (torch.nan_to_num(pool_logits.softmax(dim=2)).to(keys.dtype) * keys[rows, safe]).sum(dim=2)
        some_row = complete.any(0)  # transformers' row of pools: those complete in some row
        pool_keys, safe, complete = pool_keys[:, some_row], safe[:, some_row], complete[:, some_row]

        scores = F.relu(torch.matmul(q.float(), pool_keys.transpose(-1, -2).float().unsqueeze(1)) * self.d_head**-0.5)
        weights = self.head_weights(x).float() * self.n_heads**-0.5
        scores = torch.matmul(weights.unsqueeze(-2), scores).squeeze(-2)  # [batch, query, pool]
        pickable = visible.gather(-1, safe[..., -1][:, None, :].expand(-1, length, -1)) & complete[:, None]
        scores = self.hook_pool_scores(scores.masked_fill(~pickable, torch.finfo(scores.dtype).min))
        best = scores.topk(min(self.pools_kept, scores.shape[-1]), dim=-1).indices
        kept = torch.zeros_like(pickable).scatter_(-1, best, True) & pickable  # [batch, query, pool]

        # Each slot's pool (its rank among the row's real slots // r), and whether the query kept it.
        rank = real.long().cumsum(-1) - 1
        pool_of_slot = (rank // self.pool_size).clamp(0, kept.shape[-1])  # the last column: in no complete pool
        in_complete_pool = real & (rank < complete.sum(-1, keepdim=True) * self.pool_size)
        selected = F.pad(kept, (0, 1)).gather(-1, pool_of_slot[:, None].expand(-1, length, -1)) & in_complete_pool[:, None]
        if self.tail:  # the real tokens a query sees after its last complete pool
            seen = visible.long().sum(-1, keepdim=True)
            selected |= visible & (rank[:, None] >= seen - seen.remainder(self.pool_size))
        # A pad query selects nothing (the attention lets it see itself only).
        return self.hook_selected(selected & visible & real[:, n_keys - length :, None]), packed
