"""Feed-forward layers: gated (SwiGLU) and plain MLPs, the softmax-routed mixture of experts of
Qwen3-Next / Granite 4.0-H, and the sigmoid group-routed one of NemotronH. ``build_mlp`` picks one
from the config."""

from __future__ import annotations

import torch
import torch.nn as nn
from jaxtyping import Float
from torch import Tensor
from transformer_lens.hook_points import HookPoint
from transformers.activations import ACT2FN

from hooked_ssm.config import HookedSSMConfig
from hooked_ssm.dtypes import at_least_fp32


class GatedMLP(nn.Module):
    """``down(act(gate(x)) * up(x))``; with a ``limit`` L > 0, ``act(gate)`` is clipped at L and ``up``
    to [-L, L] before the product (BailingHybrid's SwiGLU limits), or, ``clip_before_act``, the gate
    before its activation, ``act(min(gate, L))`` (GLM-5.3's)."""

    def __init__(
        self, d_model: int, d_mlp: int, act_fn: str, with_hooks: bool = True, bias: bool = False, limit: float = 0.0,
        clip_before_act: bool = False,
    ):
        super().__init__()
        self.limit, self.clip_before_act = limit, clip_before_act
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
        up = self.up_proj(x)
        if self.limit > 0 and self.clip_before_act:
            gate, up = self.act(pre.clamp(max=self.limit)), up.clamp(min=-self.limit, max=self.limit)
        elif self.limit > 0:
            gate, up = self.act(pre).clamp(max=self.limit), up.clamp(min=-self.limit, max=self.limit)
        else:
            gate = self.act(pre)
        post = gate * up
        if hasattr(self, "hook_post"):
            post = self.hook_post(post)
        return self.down_proj(post)


class MLP(nn.Module):
    """``down(act(up(x)))``: no gate (NemotronH, ``relu2``)."""

    def __init__(self, d_model: int, d_mlp: int, act_fn: str, with_hooks: bool = True, bias: bool = False):
        super().__init__()
        self.up_proj = nn.Linear(d_model, d_mlp, bias=bias)
        self.down_proj = nn.Linear(d_mlp, d_model, bias=bias)
        self.act = ACT2FN[act_fn]
        if with_hooks:
            self.hook_pre = HookPoint()  # [batch, pos, d_mlp]: up pre-activation
            self.hook_post = HookPoint()  # [batch, pos, d_mlp]: act(up)

    def forward(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        pre = self.up_proj(x)
        if hasattr(self, "hook_pre"):
            pre = self.hook_pre(pre)
        post = self.act(pre)
        if hasattr(self, "hook_post"):
            post = self.hook_post(post)
        return self.down_proj(post)


def _routed(
    experts: nn.ModuleList, x: Float[Tensor, "tokens d_model"], indices: Tensor, weights: Tensor
) -> Float[Tensor, "tokens d_model"]:
    """``sum_k weights[:, k] * experts[indices[:, k]](x)``, each expert run once on its tokens."""
    routed = torch.zeros_like(x)
    for e in indices.unique().tolist():
        token, slot = torch.where(indices == e)
        routed.index_add_(0, token, (experts[e](x[token]) * weights[token, slot, None]).to(x.dtype))
    return routed


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
        if d_shared_expert:  # MiniMax has none
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
        routed = _routed(self.experts, flat_x, flat_idx, flat_w)
        if hasattr(self, "shared_expert"):
            shared = self.shared_expert(flat_x)
            if hasattr(self, "shared_expert_gate"):
                shared = torch.sigmoid(self.shared_expert_gate(flat_x)) * shared
            routed = routed + shared
        return routed.reshape(x.shape)


class GroupRoutedMoE(nn.Module):
    """NemotronH's mixture of experts (DeepSeek-V3 routing): sigmoid scores, plus a per-expert bias
    for the choice only; the experts are chosen among the ``topk_group`` best of ``n_group`` groups
    (a group scores the sum of its two best); the chosen experts weigh their unbiased scores,
    renormalised if ``norm_topk_prob``, times ``routed_scale``; plain (ungated) MLP experts and an
    always-on shared expert, or gated ones (``gated=True``: Kimi Linear)."""

    def __init__(
        self,
        d_model: int,
        n_experts: int,
        n_experts_per_tok: int,
        d_expert: int,
        d_shared_expert: int,
        act_fn: str,
        norm_topk_prob: bool,
        n_group: int,
        topk_group: int,
        routed_scale: float,
        gated: bool = False,
        limits: tuple[float, float] = (0.0, 0.0),
        clip_before_act: bool = False,
    ):
        super().__init__()
        self.top_k, self.n_group, self.topk_group = n_experts_per_tok, n_group, topk_group
        self.norm_topk_prob, self.routed_scale = norm_topk_prob, routed_scale
        self.router = nn.Linear(d_model, n_experts, bias=False)
        self.score_bias = nn.Parameter(torch.zeros(n_experts))  # e_score_correction_bias
        if gated:  # limits: the SwiGLU clipping of the routed experts and of the shared expert
            self.experts = nn.ModuleList(
                GatedMLP(d_model, d_expert, act_fn, with_hooks=False, limit=limits[0], clip_before_act=clip_before_act)
                for _ in range(n_experts)
            )
            self.shared_expert = GatedMLP(
                d_model, d_shared_expert, act_fn, with_hooks=False, limit=limits[1], clip_before_act=clip_before_act
            )
        else:
            self.experts = nn.ModuleList(MLP(d_model, d_expert, act_fn, with_hooks=False) for _ in range(n_experts))
            self.shared_expert = MLP(d_model, d_shared_expert, act_fn, with_hooks=False)
        self.hook_expert_weights = HookPoint()  # [batch, pos, top_k]
        self.hook_expert_indices = HookPoint()  # [batch, pos, top_k]

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        flat_x = x.reshape(-1, x.shape[-1])
        scores = torch.sigmoid(at_least_fp32(flat_x) @ at_least_fp32(self.router.weight).T)
        for_choice = scores + at_least_fp32(self.score_bias)
        grouped = for_choice.view(len(flat_x), self.n_group, -1)
        group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1)
        groups = torch.topk(group_scores, k=self.topk_group, dim=-1, sorted=False)[1]
        allowed = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, groups, True)
        for_choice = grouped.masked_fill(~allowed[..., None], float("-inf")).flatten(1)
        indices = torch.topk(for_choice, k=self.top_k, dim=-1, sorted=False)[1]
        weights = scores.gather(1, indices)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        weights = weights * self.routed_scale
        weights = self.hook_expert_weights(weights.view(*x.shape[:-1], self.top_k)).reshape(-1, self.top_k)
        indices = self.hook_expert_indices(indices.view(*x.shape[:-1], self.top_k)).reshape(-1, self.top_k)
        routed = _routed(self.experts, flat_x, indices, weights)
        return (routed + self.shared_expert(flat_x)).reshape(x.shape)


def build_mlp(cfg: HookedSSMConfig, layer: int) -> nn.Module:
    """The feed-forward layer of ``layer``: a mixture of experts where ``cfg.moe_layers`` says so
    (softmax- or sigmoid-group-routed, per ``cfg.moe_router``), else a gated or plain MLP."""
    if cfg.moe_layers[layer] and cfg.moe_router == "sigmoid_group":
        limits = tuple(float(x[layer]) if x else 0.0 for x in (cfg.swiglu_limits, cfg.swiglu_limits_shared))
        return GroupRoutedMoE(
            cfg.d_model, cfg.n_experts, cfg.n_experts_per_tok, cfg.d_expert, cfg.d_shared_expert, cfg.act_fn,
            cfg.norm_topk_prob, cfg.moe_n_group, cfg.moe_topk_group, cfg.moe_routed_scale, cfg.mlp_gated, limits,
            cfg.swiglu_clip_before_act,
        )
    if cfg.moe_layers[layer]:
        return SparseMoE(
            cfg.d_model, cfg.n_experts, cfg.n_experts_per_tok, cfg.d_expert,
            cfg.d_shared_expert, cfg.act_fn, cfg.norm_topk_prob, cfg.shared_expert_gated,
        )
    if cfg.mlp_gated:
        return GatedMLP(cfg.d_model, cfg.d_mlp, cfg.act_fn, bias=cfg.mlp_bias, limit=cfg.swiglu_limit_dense,
                        clip_before_act=cfg.swiglu_clip_before_act)
    return MLP(cfg.d_model, cfg.d_mlp, cfg.act_fn, bias=cfg.mlp_bias)
