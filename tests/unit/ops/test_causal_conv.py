"""The shifted multiply-add causal convolution against PyTorch's grouped conv1d."""

import pytest
import torch
import torch.nn.functional as F

from hooked_ssm.ops.causal_conv import causal_depthwise_conv


def reference(x, weight, bias):
    """Depthwise conv1d over time with K-1 zeros on the left, as transformers computes it."""
    out = F.conv1d(x.transpose(1, 2), weight[:, None], bias, padding=weight.shape[1] - 1, groups=weight.shape[0])
    return out[..., : x.shape[1]].transpose(1, 2)


@pytest.mark.parametrize("length", [1, 2, 3, 17])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_conv1d_and_carries_its_state_across_calls(length, with_bias):
    gen = torch.Generator().manual_seed(length)
    x = torch.randn(2, length, 6, generator=gen)
    weight, bias = torch.randn(6, 4, generator=gen), (torch.randn(6, generator=gen) if with_bias else None)
    out, state = causal_depthwise_conv(x, weight, bias)
    torch.testing.assert_close(out, reference(x, weight, bias), atol=1e-6, rtol=1e-5)
    # The state is the last K-1 inputs, zero-padded on the left for short inputs (channel-major).
    expected_state = F.pad(x, (0, 0, 3, 0))[:, -3:].transpose(1, 2)
    torch.testing.assert_close(state, expected_state)
    # Splitting the sequence and carrying the state gives the same outputs.
    more = torch.randn(2, 5, 6, generator=gen)
    out_more, _ = causal_depthwise_conv(more, weight, bias, conv_state=state)
    whole = reference(torch.cat([x, more], dim=1), weight, bias)
    torch.testing.assert_close(out_more, whole[:, length:], atol=1e-6, rtol=1e-5)


def test_half_precision_is_accumulated_in_float32():
    gen = torch.Generator().manual_seed(0)
    x, weight = torch.randn(1, 9, 8, generator=gen), torch.randn(8, 4, generator=gen)
    out, state = causal_depthwise_conv(x.bfloat16(), weight.bfloat16())
    exact = reference(x.bfloat16().float(), weight.bfloat16().float(), None)
    assert out.dtype == torch.bfloat16 and state.dtype == torch.bfloat16
    torch.testing.assert_close(out, exact.bfloat16(), atol=0, rtol=0)
