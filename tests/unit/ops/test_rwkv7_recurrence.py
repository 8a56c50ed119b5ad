"""The RWKV-7 recurrence against an explicit float64 loop in BlinkDL's orientation
(``S = S diag(w) - (S kappa)(a kappa)^T + v k^T``, ``o = S r``), written here from the formula."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hooked_ssm.ops.rwkv7 import recurrent_rwkv7


def random_inputs(batch, length, heads, n, seed):
    g = torch.Generator().manual_seed(seed)
    r, k = torch.randn(batch, length, heads, n, generator=g), torch.randn(batch, length, heads, n, generator=g)
    v = torch.randn(batch, length, heads, n, generator=g)
    w = torch.exp(-0.6065 * torch.rand(batch, length, heads, n, generator=g))
    kappa = torch.nn.functional.normalize(torch.randn(batch, length, heads, n, generator=g), dim=-1)
    a = torch.rand(batch, length, heads, n, generator=g)
    return r, w, k, v, kappa, a


def blink_loop(r, w, k, v, kappa, a, edits=None):
    """BlinkDL's orientation [N_v, N_k], float64; returns key-major states for comparison."""
    r, w, k, v, kappa, a = (x.double() for x in (r, w, k, v, kappa, a))
    batch, length, heads, n = k.shape
    S = torch.zeros(batch, heads, n, n, dtype=torch.float64)
    outputs, states = [], []
    for t in range(length):
        ab = (-kappa[:, t])[..., :, None] * (kappa[:, t] * a[:, t])[..., None, :]
        S = S * w[:, t][..., None, :] + S @ ab + v[:, t][..., :, None] * k[:, t][..., None, :]
        if edits and t in edits:
            S = S + edits[t].double().transpose(-1, -2)
        outputs.append((S @ r[:, t][..., None])[..., 0])
        states.append(S.transpose(-1, -2))
    return torch.stack(outputs, 1), torch.stack(states, 1)


@settings(max_examples=15, deadline=None)
@given(length=st.integers(1, 40), heads=st.integers(1, 3), n=st.sampled_from([4, 8, 16]),
       with_edit=st.booleans(), seed=st.integers(0, 10_000))
def test_recurrence_matches_blinkdl_orientation_loop(length, heads, n, with_edit, seed):
    inputs = random_inputs(2, length, heads, n, seed)
    edits = {length // 2: torch.randn(2, heads, n, n, generator=torch.Generator().manual_seed(seed))} if with_edit else None
    o_ref, states_ref = blink_loop(*inputs, edits=edits)
    positions = list(range(length))
    o, final, states = recurrent_rwkv7(*inputs, edits=edits, state_positions=positions)
    scale = max(1.0, o_ref.abs().max().item())
    torch.testing.assert_close(o.double(), o_ref, atol=1e-5 * scale, rtol=1e-4)
    torch.testing.assert_close(states.double(), states_ref, atol=1e-5 * scale, rtol=1e-4)
    torch.testing.assert_close(final.double(), states_ref[:, -1], atol=1e-5 * scale, rtol=1e-4)


def test_initial_state_continues_the_scan():
    inputs = random_inputs(1, 20, 2, 8, seed=3)
    o_full, s_full, _ = recurrent_rwkv7(*inputs)
    first = [x[:, :12] for x in inputs]
    rest = [x[:, 12:] for x in inputs]
    o1, s1, _ = recurrent_rwkv7(*first)
    o2, s2, _ = recurrent_rwkv7(*rest, initial_state=s1)
    torch.testing.assert_close(torch.cat([o1, o2], 1), o_full)
    torch.testing.assert_close(s2, s_full)
