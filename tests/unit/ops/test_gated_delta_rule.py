"""The gated delta rule's forms against an explicit matrix recurrence written here from the formula."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hooked_ssm.ops.gated_delta_rule import (
    chunked_gated_delta_rule,
    gated_delta_rule_with_edits,
    l2_normalize,
    recurrent_gated_delta_rule,
)


def random_inputs(batch, length, heads, d_k, d_v, seed, decay_scale=1.0, per_channel=False):
    """``per_channel``: the log decay is ``[batch, pos, head, d_k]`` (Kimi Delta Attention)."""
    g = torch.Generator().manual_seed(seed)
    q = l2_normalize(torch.randn(batch, length, heads, d_k, generator=g)) * d_k**-0.5
    k = l2_normalize(torch.randn(batch, length, heads, d_k, generator=g))
    v = torch.randn(batch, length, heads, d_v, generator=g)
    beta = torch.rand(batch, length, heads, generator=g)
    log_decay = -decay_scale * torch.rand(batch, length, heads, *((d_k,) if per_channel else ()), generator=g)
    return q, k, v, beta, log_decay


def explicit_recurrence(q, k, v, beta, g, initial=None, edits=None):
    """S_t = (I - b_t k_t k_t^T) A_t S_{t-1} + b_t k_t v_t^T (+ edit), o_t = S_t^T q_t, in float64;
    A_t = diag(exp(g_t)) for a per-channel ``g`` ``[.., d_k]``, exp(g_t) I for a per-head one."""
    q, k, v, beta, g = (x.double() for x in (q, k, v, beta, g))
    batch, length, heads, d_k = k.shape
    state = torch.zeros(batch, heads, d_k, v.shape[-1], dtype=torch.float64) if initial is None else initial.double()
    eye = torch.eye(d_k, dtype=torch.float64)
    outputs, states = [], []
    for t in range(length):
        kt, bt = k[:, t], beta[:, t, :, None, None]
        at = torch.diag_embed(g[:, t].exp()) if g.dim() == 4 else g[:, t].exp()[:, :, None, None] * eye
        transition = (eye - bt * kt[..., :, None] * kt[..., None, :]) @ at
        state = transition @ state + bt * kt[..., :, None] * v[:, t, :, None, :]
        if edits and t in edits:
            state = state + edits[t].double()
        outputs.append((state.transpose(-1, -2) @ q[:, t, ..., None])[..., 0])
        states.append(state)
    return torch.stack(outputs, 1), state, torch.stack(states, 1)


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 2),
    length=st.integers(1, 150),
    heads=st.integers(1, 3),
    d_k=st.sampled_from([4, 8, 16]),
    d_v=st.sampled_from([4, 8, 12]),
    chunk_size=st.sampled_from([8, 16, 64]),
    decay_scale=st.sampled_from([0.05, 1.0, 20.0]),
    per_channel=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_chunked_and_recurrent_forms_match_the_explicit_recurrence(
    batch, length, heads, d_k, d_v, chunk_size, decay_scale, per_channel, seed
):
    q, k, v, beta, g = random_inputs(batch, length, heads, d_k, d_v, seed, decay_scale, per_channel)
    initial = torch.randn(batch, heads, d_k, d_v, generator=torch.Generator().manual_seed(seed + 1))
    o_ref, s_ref, _ = explicit_recurrence(q, k, v, beta, g, initial)
    o_rec, s_rec, _, _ = recurrent_gated_delta_rule(q, k, v, beta, g, initial)
    o_chk, s_chk, _ = chunked_gated_delta_rule(q, k, v, beta, g, initial, chunk_size)
    for o, s in [(o_rec, s_rec), (o_chk, s_chk)]:
        torch.testing.assert_close(o.double(), o_ref, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(s.double(), s_ref, atol=2e-5, rtol=1e-4)


@settings(max_examples=20, deadline=None)
@given(
    length=st.integers(2, 120),
    n_edits=st.integers(1, 4),
    n_states=st.integers(0, 3),
    per_channel=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_edits_and_state_reads_match_the_explicit_recurrence(length, n_edits, n_states, per_channel, seed):
    gen = torch.Generator().manual_seed(seed)
    q, k, v, beta, g = random_inputs(2, length, 2, 8, 6, seed, per_channel=per_channel)
    edit_positions = torch.randperm(length, generator=gen)[:n_edits].tolist()
    edits = {t: torch.randn(2, 2, 8, 6, generator=gen) for t in edit_positions}
    state_positions = sorted(torch.randperm(length, generator=gen)[:n_states].tolist())
    o_ref, s_ref, states_ref = explicit_recurrence(q, k, v, beta, g, None, edits)
    for form in ("split", "recurrent"):
        if form == "split":
            o, s, states = gated_delta_rule_with_edits(q, k, v, beta, g, None, edits, state_positions, chunk_size=16)
        else:
            o, s, states, _ = recurrent_gated_delta_rule(q, k, v, beta, g, None, edits, state_positions)
        torch.testing.assert_close(o.double(), o_ref, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(s.double(), s_ref, atol=2e-5, rtol=1e-4)
        if state_positions:
            torch.testing.assert_close(states.double(), states_ref[:, state_positions], atol=2e-5, rtol=1e-4)


def test_delta_form_value_rebuilds_the_state():
    """S_t = a_t S_{t-1} + k_t u_t^T with the returned u_t reproduces the trajectory."""
    q, k, v, beta, g = random_inputs(1, 20, 2, 8, 6, seed=3)
    _, final, _, delta_v = recurrent_gated_delta_rule(q, k, v, beta, g, return_delta_v=True)
    state = torch.zeros(1, 2, 8, 6)
    for t in range(20):
        state = g[:, t].exp()[..., None, None] * state + k[:, t, :, :, None] * delta_v[:, t, :, None, :]
    torch.testing.assert_close(state, final, atol=1e-5, rtol=1e-5)


def test_split_form_avoids_a_per_token_loop_for_few_edits(monkeypatch):
    """Few edits: the split scan makes one chunked call per segment, never a per-token loop."""
    import hooked_ssm.ops.gated_delta_rule as ops

    calls = []
    real = ops.chunked_gated_delta_rule
    monkeypatch.setattr(ops, "chunked_gated_delta_rule", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    monkeypatch.setattr(ops, "recurrent_gated_delta_rule", lambda *a, **kw: (_ for _ in ()).throw(AssertionError))
    q, k, v, beta, g = random_inputs(1, 512, 2, 8, 8, seed=0)
    ops.gated_delta_rule_with_edits(q, k, v, beta, g, edits={100: torch.ones(1, 2, 8, 8)}, chunk_size=64)
    assert len(calls) == 2


@pytest.mark.parametrize("per_channel", [False, True], ids=["per head", "per channel"])
def test_every_state_comes_from_the_chunks_without_a_per_token_loop(monkeypatch, per_channel):
    """All positions' states (with an initial state, edits at some of them, a ragged last chunk)
    equal the explicit recurrence, and the token-by-token form is never called."""
    import hooked_ssm.ops.gated_delta_rule as ops

    monkeypatch.setattr(ops, "recurrent_gated_delta_rule", lambda *a, **kw: pytest.fail("per-token loop"))
    q, k, v, beta, g = random_inputs(2, 75, 3, 8, 6, seed=11, per_channel=per_channel)
    initial = torch.randn(2, 3, 8, 6, generator=torch.Generator().manual_seed(12))
    edits = {9: torch.randn(2, 3, 8, 6), 40: torch.randn(2, 3, 8, 6)}
    positions = list(range(75))
    o_ref, s_ref, states_ref = explicit_recurrence(q, k, v, beta, g, initial, edits)
    o, s, states = gated_delta_rule_with_edits(q, k, v, beta, g, initial, edits, positions, chunk_size=16)
    torch.testing.assert_close(states.double(), states_ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(o.double(), o_ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(s.double(), s_ref, atol=2e-5, rtol=1e-4)


def test_gpu_and_cpu_forms_of_the_in_chunk_states_agree():
    """The matmul form (used on GPUs) equals the walk (used on CPUs, checked above against the recurrence)."""
    from hooked_ssm.ops.split_scan import _states_by_matmul, _states_by_walk

    gen = torch.Generator().manual_seed(4)
    entering = torch.randn(2, 3, 4, 8, 6, generator=gen)
    keys, values = torch.randn(2, 3, 4, 16, 8, generator=gen), torch.randn(2, 3, 4, 16, 6, generator=gen)
    cum = (-torch.rand(2, 3, 4, 16, generator=gen)).cumsum(-1)
    lower = torch.ones(16, 16, dtype=torch.bool).tril()
    pair_decay = (cum[..., :, None] - cum[..., None, :]).masked_fill(~lower, float("-inf")).exp()
    walked = _states_by_walk(entering, keys, values, pair_decay, cum)
    torch.testing.assert_close(_states_by_matmul(entering, keys, values, pair_decay, cum), walked, atol=1e-5, rtol=1e-5)
