"""Qwen4-Exp's QSA token indexer: which keys each query of an ``indexed_attention`` layer may see.

Each row's real tokens are cut, in order, into blocks of ``r = indexer_compress_ratio`` tokens. A
block's key is the mean of its tokens' raw index keys, RMS-normed and rotated to the position of the
block's first token. A query scores each block that is complete among the tokens it sees by
``sum_h relu(q_h . K_block) / sqrt(d)`` over its ``indexer_n_heads`` heads and keeps the
``indexer_budget / r`` best; it sees their tokens and the incomplete block at the end (the most
recent tokens). The selection only narrows the causal mask, so with at most ``indexer_budget``
tokens in view a query sees them all.

The best blocks are chosen by ``torch.topk`` on each query's row of complete blocks, as transformers
does, so ties (blocks whose scores are all clipped to 0 by the relu) resolve exactly as there.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor
from transformer_lens.hook_points import HookPoint

from hooked_ssm.components.attention import PartialRotary
from hooked_ssm.components.norms import RMSNorm
from hooked_ssm.config import HookedSSMConfig


class QSAIndexer(nn.Module):
    def __init__(self, cfg: HookedSSMConfig, rotary: PartialRotary):
        super().__init__()
        if min(cfg.indexer_n_heads, cfg.indexer_head_dim, cfg.indexer_budget, cfg.indexer_compress_ratio) < 1:
            raise ValueError("An indexed_attention layer needs indexer_n_heads, indexer_head_dim, indexer_budget and "
                             "indexer_compress_ratio >= 1 in the config.")
        if cfg.indexer_budget % cfg.indexer_compress_ratio:
            raise ValueError(f"indexer_budget ({cfg.indexer_budget}) must be a multiple of indexer_compress_ratio "
                             f"({cfg.indexer_compress_ratio}).")
        self.n_heads, self.d_head = cfg.indexer_n_heads, cfg.indexer_head_dim
        self.block_size = cfg.indexer_compress_ratio
        self.blocks_kept = cfg.indexer_budget // cfg.indexer_compress_ratio
        self.qk_proj = nn.Linear(cfg.d_model, (self.n_heads + 1) * self.d_head, bias=False)
        self.q_norm = RMSNorm(self.d_head, cfg.eps, cfg.norm_zero_centered)
        self.k_norm = RMSNorm(self.d_head, cfg.eps, cfg.norm_zero_centered)
        self.rotary = rotary  # the attention's own RoPE (its rotary_dim must fit d_head)

        self.hook_q = HookPoint()  # [batch, pos, index_head, d_index]: normed and rotated
        self.hook_k = HookPoint()  # [batch, pos, d_index]: raw token keys, before pooling
        self.hook_block_scores = HookPoint()  # [batch, pos, block]: -inf for blocks incomplete to the query
        self.hook_selected = HookPoint()  # [batch, pos, key_pos] bool: the keys each query may see

    def forward(
        self,
        x: Float[Tensor, "batch pos d_model"],
        positions: Int[Tensor, "batch pos"],
        key_positions: Int[Tensor, "batch key_pos"],
        past_keys: Float[Tensor, "batch past d_index"] | None,
        real: Bool[Tensor, "batch key_pos"] | None,
    ) -> tuple[Bool[Tensor, "batch pos key_pos"], Float[Tensor, "batch key_pos d_index"]]:
        """The keys (cache slots: past, then this call's tokens) each of this call's queries may see,
        and the raw index keys of all slots (the cache's next ``past_keys``). ``positions`` /
        ``key_positions``: the RoPE positions of the queries and of every slot; ``real``: False at
        pads and empty slots."""
        batch, length, _ = x.shape
        q, k = self.qk_proj(x).split([self.n_heads * self.d_head, self.d_head], dim=-1)
        q = self.hook_q(self.rotary(self.q_norm(q.view(batch, length, self.n_heads, self.d_head)), positions))
        k = self.hook_k(k)
        keys = k if past_keys is None else torch.cat([past_keys, k], dim=1)
        n_keys = keys.shape[1]
        slots = torch.arange(n_keys, device=x.device)
        real = torch.ones(batch, n_keys, dtype=torch.bool, device=x.device) if real is None else real

        # Row b's real slots in order; block j holds the real slots j*r ... j*r + r - 1.
        real_slots = torch.sort(torch.where(real, slots, n_keys + slots), dim=1).values
        n_blocks = n_keys // self.block_size
        block_slots = real_slots[:, : n_blocks * self.block_size].view(batch, n_blocks, self.block_size)
        block_ends = block_slots[..., -1]  # >= n_keys: the row has fewer real tokens than the block needs
        block_slots = block_slots.clamp_max(n_keys - 1)
        gathered = keys.gather(1, block_slots.flatten(1)[..., None].expand(-1, -1, self.d_head))
        pooled = gathered.view(batch, n_blocks, self.block_size, self.d_head).float().mean(dim=2).to(keys.dtype)
        block_keys = self.rotary(self.k_norm(pooled)[:, :, None], key_positions.gather(1, block_slots[..., 0]))[:, :, 0]

        scores = torch.einsum("bqhd,bnd->bqnh", q.float(), block_keys.float()).relu().sum(-1) / self.d_head**0.5
        query_slots = slots[n_keys - length :]
        # A block is complete for a query when its last token is at or before the query.
        visible = block_ends[:, None, :] <= query_slots[None, :, None]  # [batch, query, block]
        scores = self.hook_block_scores(scores.masked_fill(~visible, float("-inf")))
        kept = F.pad(self._best_blocks(scores, visible), (0, 1))  # a last column (False) for "no block"

        # The block of each slot (n_blocks: in no block complete for anyone), and whether it is kept.
        block_of_slot = torch.full((batch, n_keys + 1), n_blocks, dtype=torch.long, device=x.device)
        block_ids = torch.arange(n_blocks, device=x.device).repeat_interleave(self.block_size).expand(batch, -1)
        block_of_slot.scatter_(1, torch.where(block_ends[..., None] < n_keys, block_slots, n_keys).flatten(1), block_ids)
        in_kept_block = kept.gather(2, block_of_slot[:, None, :n_keys].expand(-1, length, -1))
        # The tail: the real tokens a query sees after its last complete block.
        last_complete = F.pad(torch.where(visible, block_ends[:, None, :], -1), (1, 0), value=-1).amax(dim=-1)
        tail = (slots > last_complete[..., None]) & (slots <= query_slots[:, None])
        selected = (in_kept_block | tail) & real[:, None, :]
        return self.hook_selected(selected), keys

    def _best_blocks(self, scores: Tensor, visible: Tensor) -> Bool[Tensor, "batch pos block"]:
        """Every complete block where a query has at most ``blocks_kept``; else its ``blocks_kept`` best,
        chosen by ``topk`` over exactly its complete blocks (transformers' tie order)."""
        kept = visible.clone()
        n_visible = visible.sum(-1)
        for b, query in (n_visible > self.blocks_kept).nonzero().tolist():
            row = scores[b, query, : int(n_visible[b, query])]  # complete blocks are a prefix
            kept[b, query] = False
            kept[b, query, row.topk(self.blocks_kept).indices] = True
        return kept
