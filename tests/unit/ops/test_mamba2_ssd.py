"""Mamba-2's SSD scan: chunked and recurrent forms against each other and against an explicit
float64 recurrence written here from the formula; exact state edits by splitting the scan."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hooked_ssm.ops.ssd import chunked_ssd, recurrent_ssd, segment_sum, ssd_with_edits


def random_inputs(batch, length, heads, d_state, headdim, seed, decay_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, length, heads, d_state, generator=g)
    k = torch.randn(batch, length, heads, d_state, generator=g)
    dt = torch.rand(batch, length, heads, generator=g)
    v = torch.randn(batch, length, heads, headdim, generator=g) * dt[..., None]
    log_decay = -decay_scale * dt
    return q, k, v, log_decay


def explicit_recurrence(q, k, v, log_decay, initial=None, edits=None):
    """h_t = exp(a_t) h_{t-1} + k_t v_t^T (+ edit), o_t = h_t^T q_t, in float64."""
    q, k, v, log_decay = (x.double() for x in (q, k, v, log_decay))
    batch, length, heads, d_state = k.shape
    state = torch.zeros(batch, heads, d_state, v.shape[-1], dtype=torch.float64) if initial is None else initial.double()
    outputs, states = [], []
    for t in range(length):
        state = log_decay[:, t].exp()[..., None, None] * state + k[:, t, ..., :, None] * v[:, t, ..., None, :]
        if edits and t in edits:
            state = state + edits[t].double()
        outputs.append((state.transpose(-1, -2) @ q[:, t, ..., None])[..., 0])
        states.append(state)
    return torch.stack(outputs, 1), state, torch.stack(states, 1)


def _close(actual, expected, scale):
    torch.testing.assert_close(actual.double(), expected, atol=2e-5 * scale, rtol=1e-4)


@settings(max_examples=20, deadline=None)
@given(
    batch=st.integers(1, 2),
    length=st.integers(1, 140),
    heads=st.integers(1, 3),
    d_state=st.sampled_from([4, 8, 16]),
    headdim=st.sampled_from([4, 8, 12]),
    chunk_size=st.sampled_from([1, 8, 16, 64]),
    decay_scale=st.sampled_from([0.05, 1.0, 20.0]),
    with_initial=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_chunked_and_recurrent_forms_agree(batch, length, heads, d_state, headdim, chunk_size, decay_scale, with_initial, seed):
    q, k, v, a = random_inputs(batch, length, heads, d_state, headdim, seed, decay_scale)
    initial = torch.randn(batch, heads, d_state, headdim, generator=torch.Generator().manual_seed(seed + 1)) if with_initial else None
    o_ref, s_ref, _ = explicit_recurrence(q, k, v, a, initial)
    scale = max(1.0, o_ref.abs().max().item())
    o_rec, s_rec, _ = recurrent_ssd(q, k, v, a, initial)
    o_chk, s_chk, _ = chunked_ssd(q, k, v, a, initial, chunk_size)
    _close(o_rec, o_ref, scale)
    _close(o_chk, o_ref, scale)
    _close(s_chk, s_ref, max(1.0, s_ref.abs().max().item()))
    torch.testing.assert_close(o_chk, o_rec, atol=2e-5 * scale, rtol=1e-4)


@settings(max_examples=20, deadline=None)
@given(
    length=st.integers(2, 130),
    chunk_size=st.sampled_from([4, 16, 64]),
    n_edits=st.integers(1, 3),
    seed=st.integers(0, 10_000),
)
def test_split_scan_applies_state_edits_exactly(length, chunk_size, n_edits, seed):
    q, k, v, a = random_inputs(2, length, 2, 8, 4, seed)
    g = torch.Generator().manual_seed(seed + 2)
    at = torch.randint(0, length, (n_edits,), generator=g).tolist()
    edits = {t: torch.randn(2, 2, 8, 4, generator=g) for t in at}
    positions = sorted({0, length - 1, *at})
    o_ref, s_ref, states_ref = explicit_recurrence(q, k, v, a, edits=edits)
    scale = max(1.0, o_ref.abs().max().item())
    for o, s, states in (
        ssd_with_edits(q, k, v, a, None, edits, positions, chunk_size),
        recurrent_ssd(q, k, v, a, None, edits, positions),
    ):
        _close(o, o_ref, scale)
        _close(s, s_ref, scale)
        _close(states, states_ref[:, positions], scale)


def test_segment_sum_is_the_masked_cumulative_sum():
    x = torch.tensor([0.5, -1.0, 2.0, 0.25])
    seg = segment_sum(x)
    for i in range(4):
        for j in range(4):
            expected = x[j + 1 : i + 1].sum() if j <= i else float("-inf")
            assert seg[i, j] == pytest.approx(float(expected))


def test_empty_sequence_keeps_the_state():
    q, k, v, a = random_inputs(1, 0, 2, 4, 3, seed=0)
    initial = torch.randn(1, 2, 4, 3)
    o, s, _ = chunked_ssd(q, k, v, a, initial, 8)
    assert o.shape == (1, 0, 2, 3) and torch.equal(s, initial)


def test_every_state_comes_from_the_chunks_without_a_per_token_loop(monkeypatch):
    """All positions' states (with an initial state, edits at some of them, a ragged last chunk)
    equal the explicit recurrence, and the token-by-token form is never called."""
    import hooked_ssm.ops.ssd as ops

    monkeypatch.setattr(ops, "recurrent_ssd", lambda *a, **kw: pytest.fail("per-token loop"))
    q, k, v, a = random_inputs(2, 75, 3, 8, 6, seed=11)
    initial = torch.randn(2, 3, 8, 6, generator=torch.Generator().manual_seed(12))
    edits = {9: torch.randn(2, 3, 8, 6), 40: torch.randn(2, 3, 8, 6)}
    positions = list(range(75))
    o_ref, s_ref, states_ref = explicit_recurrence(q, k, v, a, initial, edits)
    o, s, states = ssd_with_edits(q, k, v, a, initial, edits, positions, chunk_size=16)
    scale = max(1.0, o_ref.abs().max().item())
    _close(states, states_ref, scale)
    _close(o, o_ref, scale)
    _close(s, s_ref, scale)
