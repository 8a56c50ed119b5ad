"""Full softmax attention of the hybrids: grouped-query attention with partial rotary embeddings,
and, as the family needs, per-head q/k RMS norms and a sigmoid output gate folded into ``q_proj``
(Qwen3.5 / Qwen3-Next: both; the Mamba-2 hybrids: neither, optionally projection biases).
``SoftmaxAttention`` is the attention itself, shared with multi-head latent attention
(``latent_attention``), which computes its keys and values differently."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn as nn
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor
from transformer_lens.hook_points import HookPoint

from hooked_ssm.components.norms import RMSNorm
from hooked_ssm.config import HookedSSMConfig
from hooked_ssm.ops.causality import all_finite
from hooked_ssm.state import AttentionCache


def _rotate_half(x: Tensor) -> Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


class PartialRotary(nn.Module):
    """RoPE on the first ``rotary_dim`` channels of each head (``rotate_half`` convention), or on the
    last ones (``at_end=True``: latent attention's shared key part).

    Qwen3.5's multimodal RoPE reduces to this for text, where its three position streams coincide.
    """

    def __init__(self, rotary_dim: int, theta: float, at_end: bool = False):
        super().__init__()
        self.rotary_dim, self.theta, self.at_end = rotary_dim, theta, at_end

    def inv_freq(self, device: torch.device) -> Tensor:
        exponents = torch.arange(0, self.rotary_dim, 2, dtype=torch.float, device=device) / self.rotary_dim
        return 1.0 / (self.theta**exponents)

    def forward(
        self, x: Float[Tensor, "batch pos head d_head"], positions: Int[Tensor, "pos"] | Int[Tensor, "batch pos"]
    ) -> Float[Tensor, "batch pos head d_head"]:
        # Positions shared by the batch ([pos]) or per row ([batch, pos], ragged caches).
        freqs = positions.float()[..., None] * self.inv_freq(x.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(x.dtype)[..., None, :], emb.sin().to(x.dtype)[..., None, :]
        if self.at_end and self.rotary_dim:
            rest, rot = x[..., : -self.rotary_dim], x[..., -self.rotary_dim :]
            return torch.cat((rest, rot * cos + _rotate_half(rot) * sin), dim=-1)
        rot, rest = x[..., : emb.shape[-1]], x[..., emb.shape[-1] :]
        return torch.cat((rot * cos + _rotate_half(rot) * sin, rest), dim=-1)


class SoftmaxAttention(nn.Module, ABC):
    """Causal softmax attention over a key/value cache, whatever computes its queries, keys and
    values: subclasses build their projections, call :meth:`_init_attention`, and implement
    :meth:`_project` and ``W_O``. ``sliding=True``: each query sees its last
    ``cfg.attn_sliding_window`` tokens only; ``rotary_dim=0``: no RoPE in this layer."""

    n_heads: int
    n_kv_heads: int
    scale: float
    output_gate: bool
    o_proj: nn.Linear

    def _init_attention(
        self, cfg: HookedSSMConfig, sliding: bool, rotary_dim: int, rotary_at_end: bool = False
    ) -> None:
        self.rotary = PartialRotary(rotary_dim, cfg.rope_theta, rotary_at_end)
        self.window = cfg.attn_sliding_window if sliding else None
        if sliding and not cfg.attn_sliding_window:
            raise ValueError("A sliding-attention layer needs cfg.attn_sliding_window > 0.")
        self.hook_q = HookPoint()  # [batch, pos, head, d_head], after q_norm (if any), before RoPE
        self.hook_k = HookPoint()  # [batch, pos, kv_head, d_head], after k_norm (if any), before RoPE
        self.hook_v = HookPoint()  # [batch, pos, kv_head, d_head] (latent attention: its value head size)
        self.hook_rot_q = HookPoint()  # [batch, pos, head, d_head]
        self.hook_rot_k = HookPoint()  # [batch, pos, kv_head, d_head]
        self.hook_attn_scores = HookPoint()  # [batch, head, query_pos, key_pos], masked, pre-softmax
        self.hook_pattern = HookPoint()  # [batch, head, query_pos, key_pos]
        self.hook_gate = HookPoint()  # [batch, pos, head, d_head] (a per-head gate: [.., head, 1]), output-gate logits
        self.hook_z = HookPoint()  # [batch, pos, head, d_head], gated output entering o_proj

    @abstractmethod
    def _project(self, x: Float[Tensor, "batch pos d_model"]) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """``(q, k, v, gate)`` of this call's tokens, through hook_q/k/v/gate; gate None without an output gate."""

    def forward(
        self,
        x: Float[Tensor, "batch pos d_model"],
        cache: AttentionCache | None = None,
        attention_mask: Tensor | None = None,
        key_selection: Bool[Tensor, "batch pos key_pos"] | None = None,
        projected: tuple[Tensor, Tensor, Tensor, Tensor | None] | None = None,
    ) -> Float[Tensor, "batch pos d_model"]:
        """``key_selection``: the keys (cache slots) each query may see besides the causal mask
        (Qwen4-Exp's and GLM-5.3's indexers); None: all. ``projected``: ``_project(x)``, when the caller
        computed it already (an indexer that reads the query's latent)."""
        batch, length, _ = x.shape
        q, k, v, gate = self._project(x) if projected is None else projected

        offset = 0 if cache is None else cache.length
        slots = torch.arange(offset, offset + length, device=x.device)  # cache slots of this call's tokens
        ragged = cache is not None and cache.row_lengths is not None
        # RoPE needs absolute positions; in a ragged cache they differ per row from the slots.
        positions = cache.row_lengths[:, None] + torch.arange(length, device=x.device) if ragged else slots
        q = self.hook_rot_q(self.rotary(q, positions))
        k = self.hook_rot_k(self.rotary(k, positions))
        if cache is not None:
            k, v = cache.append(k, v)

        group = self.n_heads // self.n_kv_heads
        keys = k.repeat_interleave(group, dim=2)
        values = v.repeat_interleave(group, dim=2)
        key_positions = torch.arange(keys.shape[1], device=x.device)
        allowed = key_positions[None, :] <= slots[:, None]  # [query, key]: causal in slot order
        if self.window is not None:
            if ragged:
                raise ValueError("Sliding-window attention does not support ragged caches (rows of different lengths).")
            allowed = allowed & (key_positions[None, :] > slots[:, None] - self.window)
        if ragged:  # the padding slots between a row's prefix and this call's tokens hold nothing
            allowed = allowed[None, None] & cache.key_mask[:, None, None, :]
        if key_selection is not None:
            allowed = allowed & key_selection[:, None]
        if attention_mask is not None:  # [batch, key_pos] with 1 for real tokens
            allowed = allowed & attention_mask[:, None, None, -keys.shape[1] :].bool()
            # A pad query sees no real key; letting it see itself keeps its (unused) output finite
            # instead of the NaN of a softmax over nothing, which would reach later layers. (Only a
            # query that sees nothing: an indexer may leave a real query's own key out.)
            allowed = allowed | ((key_positions[None, :] == slots[:, None]) & ~allowed.any(-1, keepdim=True))
        z = None
        # A NaN/inf key or value must not reach earlier queries through 0 * nan in a matmul (see
        # hooked_ssm.ops.causality): then every query sums only over the keys it may see.
        finite = all_finite(keys, values)
        if finite and not (self.hook_attn_scores.has_hooks() or self.hook_pattern.has_hooks()):
            try:  # nothing reads the pattern: PyTorch's fused attention, as transformers uses
                z = F.scaled_dot_product_attention(
                    q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2), attn_mask=allowed, scale=self.scale
                ).transpose(1, 2)
            except NotImplementedError:  # e.g. forward-mode AD (jvp) has no fused-attention rule on CPU
                z = None
        if z is None:
            scores = torch.einsum("bqhd,bkhd->bhqk", q, keys) * self.scale
            scores = self.hook_attn_scores(scores.masked_fill(~allowed, torch.finfo(scores.dtype).min))
            pattern = self.hook_pattern(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype))
            if finite:
                z = torch.einsum("bhqk,bkhd->bqhd", pattern, values)
            else:
                weighted = pattern[..., None] * values.transpose(1, 2)[:, :, None]  # [batch, head, q, k, d]
                z = weighted.masked_fill(~allowed[..., None], 0.0).sum(dim=-2).transpose(1, 2)
        if self.output_gate:
            z = z * torch.sigmoid(gate)
        z = self.hook_z(z)
        return self.o_proj(z.reshape(batch, length, -1))


class GatedAttention(SoftmaxAttention):
    """``sliding=True``: each query sees its last ``cfg.attn_sliding_window`` tokens only;
    ``rotary=False``: no RoPE in this layer (LaraMini's global layers). Set per layer kind.
    ``d_in``: the width of its input (default ``d_model``; Zamba2's shared blocks attend over
    ``[resid | embeddings]``, ``2 d_model`` wide)."""

    def __init__(self, cfg: HookedSSMConfig, sliding: bool = False, rotary: bool = True, d_in: int | None = None):
        super().__init__()
        d_in = cfg.d_model if d_in is None else d_in
        self.n_heads, self.n_kv_heads, self.d_head = cfg.n_attn_heads, cfg.n_kv_heads, cfg.d_head
        self.output_gate = cfg.attn_output_gate
        self.scale = cfg.d_head**-0.5 if cfg.attn_scale is None else cfg.attn_scale
        q_out = self.n_heads * self.d_head * (2 if self.output_gate else 1)
        self.q_proj = nn.Linear(d_in, q_out, bias=cfg.attn_bias)
        self.k_proj = nn.Linear(d_in, self.n_kv_heads * self.d_head, bias=cfg.attn_bias)
        self.v_proj = nn.Linear(d_in, self.n_kv_heads * self.d_head, bias=cfg.attn_bias)
        self.o_proj = nn.Linear(self.n_heads * self.d_head, cfg.d_model, bias=cfg.attn_bias)
        self.qk_norm = cfg.attn_qk_norm
        if self.qk_norm != "none":
            heads = (self.n_heads, self.n_kv_heads) if self.qk_norm == "all_heads" else (1, 1)
            self.q_norm = RMSNorm(heads[0] * self.d_head, cfg.eps, cfg.norm_zero_centered)
            self.k_norm = RMSNorm(heads[1] * self.d_head, cfg.eps, cfg.norm_zero_centered)
        self._init_attention(cfg, sliding, cfg.rotary_dim if rotary else 0)

    def _project(self, x: Float[Tensor, "batch pos d_model"]) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        batch, length, _ = x.shape
        gate = None
        q = self.q_proj(x).view(batch, length, self.n_heads, -1)
        if self.output_gate:
            q, gate = q.chunk(2, dim=-1)
            gate = self.hook_gate(gate)
        k = self.k_proj(x).view(batch, length, self.n_kv_heads, self.d_head)
        if self.qk_norm == "per_head":
            q, k = self.q_norm(q), self.k_norm(k)
        elif self.qk_norm == "all_heads":
            q, k = self.q_norm(q.flatten(-2)).view_as(q), self.k_norm(k.flatten(-2)).view_as(k)
        q, k = self.hook_q(q), self.hook_k(k)
        v = self.hook_v(self.v_proj(x).view(batch, length, self.n_kv_heads, self.d_head))
        return q, k, v, gate

    @property
    def W_O(self) -> Float[Tensor, "head d_head d_model"]:
        return self.o_proj.weight.T.reshape(self.n_heads, self.d_head, -1)
