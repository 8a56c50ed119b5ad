"""Short depthwise causal convolution over time, with a carried state for O(1) decoding."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor


def causal_depthwise_conv(
    x: Float[Tensor, "batch pos channel"],
    weight: Float[Tensor, "channel kernel"],
    bias: Float[Tensor, "channel"] | None = None,
    conv_state: Float[Tensor, "batch channel kernel_minus_1"] | None = None,
) -> tuple[Float[Tensor, "batch pos channel"], Float[Tensor, "batch channel kernel_minus_1"]]:
    """Each output channel at ``t`` mixes inputs ``t-K+1 .. t`` of the same channel.

    ``conv_state`` holds the last ``K-1`` inputs of the previous call (zeros at the start of a
    sequence, which is the same as left zero-padding). Returns the pre-activation output and the
    new state.
    """
    channels, kernel = weight.shape
    x_t = x.transpose(1, 2).to(weight.dtype)
    length = x_t.shape[-1]
    if conv_state is None and length >= kernel - 1:
        # Zero history: let conv1d pad, which skips copying the whole sequence into a padded buffer.
        out = F.conv1d(x_t, weight.unsqueeze(1), bias, padding=kernel - 1, groups=channels)[..., :length]
        return out.transpose(1, 2).to(x.dtype), x_t[..., length - (kernel - 1) :]
    if conv_state is None:
        conv_state = x_t.new_zeros(x_t.shape[0], channels, kernel - 1)
    padded = torch.cat([conv_state.to(x_t.dtype), x_t], dim=-1)
    out = F.conv1d(padded, weight.unsqueeze(1), bias, groups=channels)
    return out.transpose(1, 2).to(x.dtype), padded[..., padded.shape[-1] - (kernel - 1) :]
