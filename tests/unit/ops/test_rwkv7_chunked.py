"""The training-only chunked RWKV-7 form against the per-token recurrence (itself tested against an
explicit BlinkDL-orientation loop in test_rwkv7_recurrence.py): outputs, final state and every input
gradient, in float64 (to rounding) and float32 (to the tolerance training cares about)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hooked_ssm.ops.rwkv7 import recurrent_rwkv7
from hooked_ssm.ops.rwkv7_chunked import chunked_rwkv7


def random_inputs(batch, length, heads, n, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    randn = lambda: torch.randn(batch, length, heads, n, generator=g, dtype=dtype)  # noqa: E731
    r, k, v = randn(), randn(), randn()
    # the full range RWKV-7 allows: w in (exp(-e^-0.5), 1), so 1/gamma is largest over a chunk
    w = torch.exp(-0.6065 * torch.rand(batch, length, heads, n, generator=g, dtype=dtype))
    kappa = torch.nn.functional.normalize(randn(), dim=-1)
    a = torch.rand(batch, length, heads, n, generator=g, dtype=dtype)
    return [x.requires_grad_() for x in (r, w, k, v, kappa, a)]


def outputs_and_grads(scan, inputs, initial_state, probe):
    o, final = scan(*inputs, initial_state)[:2]
    loss = (o * probe).sum() + final.square().sum()  # every output and the final state get a gradient
    return o, final, torch.autograd.grad(loss, [*inputs, initial_state])


@settings(max_examples=12, deadline=None)
@given(length=st.integers(1, 45), heads=st.integers(1, 3), n=st.sampled_from([4, 8, 16]),
       chunk=st.sampled_from([1, 4, 16, 32]), seed=st.integers(0, 10_000))
def test_chunked_equals_the_recurrence_in_float64(length, heads, n, chunk, seed):
    inputs = random_inputs(2, length, heads, n, seed)
    state = torch.randn(2, heads, n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    state.requires_grad_()
    probe = torch.randn(2, length, heads, n, dtype=torch.float64)
    o_ref, s_ref, g_ref = outputs_and_grads(recurrent_rwkv7, inputs, state, probe)
    o, s, grads = outputs_and_grads(lambda *x: chunked_rwkv7(*x, chunk_size=chunk), inputs, state, probe)
    assert o.dtype == torch.float64
    torch.testing.assert_close(o, o_ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(s, s_ref, atol=1e-10, rtol=1e-10)
    for name, got, want in zip(("r", "w", "k", "v", "kappa", "a", "initial_state"), grads, g_ref):
        torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-9, msg=f"gradient of {name}")


@pytest.mark.parametrize("length", [64, 77])
def test_chunked_matches_the_recurrence_in_float32(length):
    """The training shape class (head size 64, chunk 16): float32 rounding only."""
    inputs = [x.detach().float().requires_grad_() for x in random_inputs(2, length, 2, 64, seed=1)]
    state = torch.zeros(2, 2, 64, 64, requires_grad=True)
    probe = torch.randn(2, length, 2, 64, generator=torch.Generator().manual_seed(2))
    o_ref, s_ref, g_ref = outputs_and_grads(recurrent_rwkv7, inputs, state, probe)
    o, s, grads = outputs_and_grads(lambda *x: chunked_rwkv7(*x, chunk_size=16), inputs, state, probe)
    assert o.dtype == torch.float32
    scale = o_ref.abs().max().item()
    torch.testing.assert_close(o, o_ref, atol=2e-6 * scale, rtol=1e-4)
    torch.testing.assert_close(s, s_ref, atol=2e-6 * s_ref.abs().max().item(), rtol=1e-4)
    for name, got, want in zip(("r", "w", "k", "v", "kappa", "a", "initial_state"), grads, g_ref):
        torch.testing.assert_close(got, want, atol=2e-6 * want.abs().max().item(), rtol=1e-3, msg=f"gradient of {name}")


def test_chunked_continues_from_a_state_like_the_recurrence():
    inputs = [x.detach() for x in random_inputs(1, 30, 2, 8, seed=3)]
    _, s1 = chunked_rwkv7(*[x[:, :13] for x in inputs], chunk_size=4)
    o2, s2 = chunked_rwkv7(*[x[:, 13:] for x in inputs], initial_state=s1, chunk_size=4)
    o_ref, s_ref, _ = recurrent_rwkv7(*inputs)
    torch.testing.assert_close(o2, o_ref[:, 13:], atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(s2, s_ref, atol=1e-10, rtol=1e-10)


def test_bad_chunk_size_is_an_error():
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_rwkv7(*[x.detach() for x in random_inputs(1, 3, 1, 4, seed=0)], chunk_size=0)
