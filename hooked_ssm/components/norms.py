"""RMS norms: the residual-stream norm and the per-head gated norm of recurrent mixers."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor
from transformer_lens.hook_points import HookPoint

from hooked_ssm.dtypes import at_least_fp32


class RMSNorm(nn.Module):
    """RMSNorm computed in float32. ``zero_centered`` scales by ``1 + w`` (Qwen3.5 / Qwen3-Next).
    ``group_size``: each group of that many channels is normed on its own (Qwen4-Exp norms each
    hyper-connection stream of ``[hc * d_model]`` separately), the scale stays per channel."""

    def __init__(self, d: int, eps: float, zero_centered: bool, group_size: int | None = None):
        super().__init__()
        if group_size is not None and d % group_size:
            raise ValueError(f"RMSNorm of width {d} cannot be split into groups of {group_size} channels.")
        self.eps = eps
        self.zero_centered = zero_centered
        self.group_size = group_size
        self.w = nn.Parameter(torch.zeros(d) if zero_centered else torch.ones(d))
        self.hook_normalized = HookPoint()  # [batch, pos, d] (or [batch, pos, head, d] for per-head norms)

    def forward(self, x: Float[Tensor, "... d"]) -> Float[Tensor, "... d"]:
        x32 = at_least_fp32(x) if self.group_size is None else at_least_fp32(x).unflatten(-1, (-1, self.group_size))
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        normed = normed if self.group_size is None else normed.flatten(-2)
        scale = (1.0 + at_least_fp32(self.w)) if self.zero_centered else at_least_fp32(self.w)
        return self.hook_normalized((normed * scale).type_as(x))


_GATE_ACTIVATIONS = {"silu": F.silu, "sigmoid": torch.sigmoid}


class GatedRMSNorm(nn.Module):
    """Per-head RMS norm followed by a gate: ``w * o / rms(o) * act(z)`` (norm before gate), ``act``
    SiLU (Qwen3.5) or sigmoid (Qwen4-Exp's ``output_gate_type="sigmoid"``, Kimi Delta Attention).

    The cast points follow transformers' ``Qwen3_5RMSNormGated`` so bf16 runs match it too.
    """

    def __init__(self, d: int, eps: float, activation: str = "silu"):
        super().__init__()
        if activation not in _GATE_ACTIVATIONS:
            raise ValueError(f"Gate activation {activation!r} is not supported; choose one of {sorted(_GATE_ACTIVATIONS)}.")
        self.eps = eps
        self.activation = _GATE_ACTIVATIONS[activation]
        self.w = nn.Parameter(torch.ones(d))

    def forward(
        self, o: Float[Tensor, "... d"], gate: Float[Tensor, "... d"]
    ) -> Float[Tensor, "... d"]:
        dtype = o.dtype
        o32 = at_least_fp32(o)
        normed = (o32 * torch.rsqrt(o32.pow(2).mean(-1, keepdim=True) + self.eps)).to(dtype)
        return (self.w * normed * self.activation(at_least_fp32(gate))).to(dtype)


class LayerNorm(nn.Module):
    """LayerNorm with weight and bias (RWKV-7), computed in float32: ``(x - mean) / sqrt(var + eps) * w + b``."""

    def __init__(self, d: int, eps: float):
        super().__init__()
        self.eps = eps
        self.w = nn.Parameter(torch.ones(d))
        self.b = nn.Parameter(torch.zeros(d))
        self.hook_normalized = HookPoint()  # [batch, pos, d]

    def forward(self, x: Float[Tensor, "... d"]) -> Float[Tensor, "... d"]:
        out = F.layer_norm(at_least_fp32(x), (x.shape[-1],), at_least_fp32(self.w), at_least_fp32(self.b), self.eps)
        return self.hook_normalized(out.type_as(x))
