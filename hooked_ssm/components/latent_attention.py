"""Multi-head latent attention (MLA, DeepSeek-V2) as the KDA hybrids' full-attention layers run it:
keys and values expanded from one compressed latent; without RoPE (Kimi Linear's
``KimiLinearAttention``), or with RoPE on the shared key part and the matching query channels and a
sigmoid gate per head (BailingHybrid's ``BailingHybridAttention``: ``rotary=True``, ``cfg.mla_head_gate``).

Per head ``h``::

    q_h = W_q x                    (or W_qb rmsnorm(W_qa x) with a low-rank query, mla_q_lora_rank > 0)
    c, k_shared = split(W_kva x)   (the latent, kv_lora_rank wide, and a key part shared by all heads)
    k_nope_h, v_h = split(W_kvb rmsnorm(c))
    k_h = [k_nope_h | k_shared]    (qk_nope_dim + qk_rope_dim wide; "rope" names the shared part)

then causal softmax attention with scale ``(qk_nope_dim + qk_rope_dim) ** -0.5``, times
``sigmoid(W_g x)_h`` per head with the head gate. The cache holds the expanded keys and values (exact,
not the memory-saving latent). Hooks: ``hook_q`` / ``hook_k`` ``[batch, pos, head, qk_nope_dim +
qk_rope_dim]``, ``hook_v`` / ``hook_z`` ``[batch, pos, head, v_head_dim]``, ``hook_gate`` ``[batch, pos,
head, 1]``. RoPE is the ``rotate_half`` form on the last ``qk_rope_dim`` channels: DeepSeek's
interleaved pairs are de-interleaved (evens, then odds) in the weights by the converter, which is
exactly the layout of transformers' rotated queries and keys.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from jaxtyping import Float
from torch import Tensor

from hooked_ssm.components.attention import SoftmaxAttention
from hooked_ssm.components.norms import RMSNorm
from hooked_ssm.config import HookedSSMConfig


class LatentAttention(SoftmaxAttention):
    def __init__(self, cfg: HookedSSMConfig, rotary: bool = False):
        super().__init__()
        self.n_heads = self.n_kv_heads = cfg.n_attn_heads
        self.d_nope, self.d_shared, self.d_v = cfg.mla_qk_nope_dim, cfg.mla_qk_rope_dim, cfg.mla_v_head_dim
        self.d_head = self.d_nope + self.d_shared  # of queries and keys
        self.kv_rank = cfg.mla_kv_lora_rank
        self.output_gate = cfg.mla_head_gate
        self.scale = self.d_head**-0.5 if cfg.attn_scale is None else cfg.attn_scale
        if cfg.mla_q_lora_rank > 0:
            self.q_a_proj = nn.Linear(cfg.d_model, cfg.mla_q_lora_rank, bias=cfg.attn_bias)
            self.q_a_norm = RMSNorm(cfg.mla_q_lora_rank, cfg.mla_norm_eps, zero_centered=False)
            self.q_b_proj = nn.Linear(cfg.mla_q_lora_rank, self.n_heads * self.d_head, bias=False)
        else:
            self.q_proj = nn.Linear(cfg.d_model, self.n_heads * self.d_head, bias=False)
        self.kv_a_proj = nn.Linear(cfg.d_model, self.kv_rank + self.d_shared, bias=cfg.attn_bias)
        self.kv_a_norm = RMSNorm(self.kv_rank, cfg.mla_norm_eps, zero_centered=False)
        self.kv_b_proj = nn.Linear(self.kv_rank, self.n_heads * (self.d_nope + self.d_v), bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.d_v, cfg.d_model, bias=cfg.attn_bias)
        if self.output_gate:
            self.g_proj = nn.Linear(cfg.d_model, self.n_heads, bias=False)
        self._init_attention(cfg, sliding=False, rotary_dim=self.d_shared if rotary else 0, rotary_at_end=True)

    def query_latent(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos q_rank"] | None:
        """The normed low-rank query latent (None with a full-rank query)."""
        return None if hasattr(self, "q_proj") else self.q_a_norm(self.q_a_proj(x))

    def _project(self, x: Float[Tensor, "batch pos d_model"]) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        return self.project_from_latent(x, self.query_latent(x))

    def project_from_latent(
        self, x: Float[Tensor, "batch pos d_model"], q_latent: Float[Tensor, "batch pos q_rank"] | None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """``_project`` with the query latent computed by the caller."""
        batch, length, _ = x.shape
        q = self.q_proj(x) if q_latent is None else self.q_b_proj(q_latent)
        q = self.hook_q(q.view(batch, length, self.n_heads, self.d_head))
        latent, shared = self.kv_a_proj(x).split([self.kv_rank, self.d_shared], dim=-1)
        kv = self.kv_b_proj(self.kv_a_norm(latent)).view(batch, length, self.n_heads, self.d_nope + self.d_v)
        k_nope, v = kv.split([self.d_nope, self.d_v], dim=-1)
        k = torch.cat([k_nope, shared[:, :, None].expand(-1, -1, self.n_heads, -1)], dim=-1)
        gate = self.hook_gate(self.g_proj(x)[..., None]) if self.output_gate else None
        return q, self.hook_k(k), self.hook_v(v), gate

    @property
    def W_O(self) -> Float[Tensor, "head d_v d_model"]:
        return self.o_proj.weight.T.reshape(self.n_heads, self.d_v, -1)
