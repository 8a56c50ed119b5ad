"""Feed-forward layers: SwiGLU MLP and the sparse mixture of experts of Qwen3-Next."""

from __future__ import annotations

import torch
import torch.nn as nn
from jaxtyping import Float
from torch import Tensor
from transformer_lens.hook_points import HookPoint
from transformers.activations import ACT2FN


class GatedMLP(nn.Module):
    """``down(act(gate(x)) * up(x))``."""

    def __init__(self, d_model: int, d_mlp: int, act_fn: str, with_hooks: bool = True, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, d_mlp, bias=bias)
        self.up_proj = nn.Linear(d_model, d_mlp, bias=bias)
        self.down_proj = nn.Linear(d_mlp, d_model, bias=bias)
        self.act = ACT2FN[act_fn]
        if with_hooks:
            self.hook_pre = HookPoint()  # [batch, pos, d_mlp]: gate pre-activation
            self.hook_post = HookPoint()  # [batch, pos, d_mlp]: act(gate) * up

    def forward(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        pre = self.gate_proj(x)
        if hasattr(self, "hook_pre"):
            pre = self.hook_pre(pre)
        post = self.act(pre) * self.up_proj(x)
        if hasattr(self, "hook_post"):
            post = self.hook_post(post)
        return self.down_proj(post)


class SparseMoE(nn.Module):
    """Top-k routed experts (softmax router, optional renormalisation) plus a shared expert, sigmoid-gated
    (Qwen3-Next) or not (Granite 4.0-H, whose softmax over the top-k logits is the renormalised top-k)."""

    def __init__(
        self,
        d_model: int,
        n_experts: int,
        n_experts_per_tok: int,
        d_expert: int,
        d_shared_expert: int,
        act_fn: str,
        norm_topk_prob: bool,
        shared_expert_gated: bool = True,
    ):
        super().__init__()
        self.top_k = n_experts_per_tok
        self.norm_topk_prob = norm_topk_prob
        self.router = nn.Linear(d_model, n_experts, bias=False)
        self.experts = nn.ModuleList(
            GatedMLP(d_model, d_expert, act_fn, with_hooks=False) for _ in range(n_experts)
        )
        self.shared_expert = GatedMLP(d_model, d_shared_expert, act_fn, with_hooks=False)
        if shared_expert_gated:
            self.shared_expert_gate = nn.Linear(d_model, 1, bias=False)
        self.hook_expert_weights = HookPoint()  # [batch, pos, top_k]
        self.hook_expert_indices = HookPoint()  # [batch, pos, top_k]

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        logits = self.router(x)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float)
        weights, indices = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = self.hook_expert_weights(weights.to(logits.dtype))
        indices = self.hook_expert_indices(indices)

        flat_x, flat_idx, flat_w = x.reshape(-1, x.shape[-1]), indices.reshape(-1, self.top_k), weights.reshape(-1, self.top_k)
        routed = torch.zeros_like(flat_x)
        for e in flat_idx.unique().tolist():
            token, slot = torch.where(flat_idx == e)
            routed.index_add_(0, token, self.experts[e](flat_x[token]) * flat_w[token, slot, None])
        shared = self.shared_expert(flat_x)
        if hasattr(self, "shared_expert_gate"):
            shared = torch.sigmoid(self.shared_expert_gate(flat_x)) * shared
        return (routed + shared).reshape(x.shape)
