"""Generation with the O(1) RecurrentState equals decoding by repeated full forward passes."""

import pytest
import torch

from hooked_ssm import HookedSSM, RecurrentState


@pytest.mark.parametrize("fixture", ["qwen35", "qwen3_next"])
def test_cached_greedy_generation_equals_repeated_full_forwards(fixture, request):
    model = HookedSSM.from_pretrained(request.getfixturevalue(fixture)[0])
    prompt = torch.randint(3, model.cfg.d_vocab, (2, 70), generator=torch.Generator().manual_seed(0))
    kwargs = dict(max_new_tokens=12, do_sample=False, stop_at_eos=False, verbose=False)
    cached = model.generate(prompt, use_past_kv_cache=True, **kwargs)
    uncached = model.generate(prompt, use_past_kv_cache=False, **kwargs)
    assert torch.equal(cached, uncached)
    assert cached.shape == (2, 82)


def test_chunked_prefill_then_steps_equal_one_forward(qwen35):
    model = HookedSSM.from_pretrained(qwen35[0])
    tokens = torch.randint(3, model.cfg.d_vocab, (2, 90))
    state = RecurrentState.empty(model.cfg.layer_types)
    with torch.no_grad():
        full = model(tokens)
        pieces = [model(tokens[:, :65], past_state=state)]
        pieces += [model(tokens[:, t : t + 1], past_state=state) for t in range(65, 90)]
    assert state.n_tokens == 90
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-4, rtol=1e-4)


def test_hooks_stay_live_during_generation(qwen35):
    """An edit installed at an absolute position during decoding changes what is generated next."""
    model = HookedSSM.from_pretrained(qwen35[0])
    prompt = torch.randint(3, model.cfg.d_vocab, (1, 20), generator=torch.Generator().manual_seed(1))
    target = 23  # a position produced during decoding
    seen = []

    def boost_write(write, hook):
        seen.append(model.current_position_offset)
        if model.current_position_offset == target:  # decoding one token at a time
            write[:, 0] += 50.0
        return write

    kwargs = dict(max_new_tokens=8, do_sample=False, stop_at_eos=False, verbose=False)
    clean = model.generate(prompt, **kwargs)
    with model.hooks(fwd_hooks=[("blocks.0.mixer.hook_write", boost_write)]):
        edited = model.generate(prompt, **kwargs)
    assert seen[:2] == [0, 20]
    assert torch.equal(edited[:, : target + 1], clean[:, : target + 1])
    assert not torch.equal(edited, clean)


def test_generation_stops_at_eos(qwen35):
    model = HookedSSM.from_pretrained(qwen35[0])
    prompt = torch.tensor([[5, 6, 7]])
    first = int(model(prompt)[0, -1].argmax())
    out = model.generate(prompt, max_new_tokens=5, eos_token_id=first, do_sample=False, verbose=False)
    assert out.tolist() == [[5, 6, 7, first]]
    sampled = model.generate(prompt, max_new_tokens=5, do_sample=True, top_k=5, stop_at_eos=False, verbose=False)
    assert sampled.shape == (1, 8)


def test_short_calls_take_the_recurrent_scan_and_agree_with_the_chunked_one(qwen35, monkeypatch):
    """Decoding steps skip the chunked scan (one padded chunk per call); long calls still use it."""
    import hooked_ssm.components.gated_deltanet as gdn

    model = HookedSSM.from_pretrained(qwen35[0])
    tokens = torch.randint(3, model.cfg.d_vocab, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        chunked_full = model(tokens)
        lengths = []
        chunked = gdn.chunked_gated_delta_rule
        monkeypatch.setattr(gdn, "chunked_gated_delta_rule", lambda q, *a, **kw: lengths.append(q.shape[1]) or chunked(q, *a, **kw))
        state = RecurrentState.empty(model.cfg.layer_types)
        pieces = [model(tokens[:, :30], past_state=state)]
        pieces += [model(tokens[:, t : t + 1], past_state=state) for t in range(30, 40)]
    n_linear = model.cfg.layer_types.count("gated_deltanet")
    assert lengths == [30] * n_linear  # the prefill only
    torch.testing.assert_close(torch.cat(pieces, dim=1), chunked_full, atol=1e-4, rtol=1e-4)
