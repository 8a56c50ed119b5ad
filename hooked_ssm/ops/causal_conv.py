"""Short depthwise causal convolution over time, with a carried state for O(1) decoding."""

from __future__ import annotations

import torch
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
    sequence, which is the same as left zero-padding), channel-major like transformers' cache.
    Returns the pre-activation output and the new state.

    Computed as ``K`` shifted multiply-adds in position-major layout rather than ``F.conv1d``,
    which needs channel-major input: the two transposes cost more than the kernel-4 convolution.
    Half-precision inputs are accumulated in float32 and rounded once, as a convolution kernel does.
    """
    channels, kernel = weight.shape
    length = x.shape[1]
    compute = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
    history = (
        x.new_zeros(x.shape[0], kernel - 1, channels, dtype=compute)
        if conv_state is None
        else conv_state.transpose(1, 2).to(compute)
    )
    padded = torch.cat([history, x.to(compute)], dim=1)  # [batch, K-1+pos, channel]
    w = weight.to(compute)
    out = padded[:, :length] * w[:, 0]
    for shift in range(1, kernel):
        out.addcmul_(padded[:, shift : shift + length], w[:, shift])
    if bias is not None:
        out += bias.to(compute)
    new_state = padded[:, padded.shape[1] - (kernel - 1) :].transpose(1, 2).to(weight.dtype)
    return out.to(x.dtype), new_state
