"""The batched fast path of the substitution test: firings at different positions (and prompts)
share one forward, continuing ragged prefixes. Every check is against an independent reference:
full forwards of each row, or the naive runner (one ``run_with_hooks`` from position 0 per firing).
"""

import pytest
import torch

import writesae_lens.saes  # noqa: F401  (registers the architectures)
from hooked_ssm import HookedSSM
from hooked_ssm.state import RecurrentState
from writesae_lens.interventions import substitute_firings
from writesae_lens.interventions import engine as engine_module
from writesae_lens.interventions.engine import select_rows, stack_states
from writesae_lens.interventions.firings import Firing
from writesae_lens.interventions.sites import Site
from writesae_lens.saes import WriteSAE, WriteSAEConfig

CONDITIONS = ("atom", "delete", "random")


# Many tiny forwards: on a shared CPU one thread is far faster (fixture in tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def hybrid(qwen35):
    """Layers [lin, lin, full, lin, full]: sites at 0, 1 and 3 put 0, 2 and 1 attention layers after the edit."""
    return HookedSSM.from_pretrained(qwen35[0])


def random_sae(model, seed=0, d_sae=24):
    torch.manual_seed(seed)
    d_k, d_v = model.cfg.d_k, model.cfg.d_v
    return WriteSAE(WriteSAEConfig(d_in=d_k * d_v, d_sae=d_sae, d_k=d_k, d_v=d_v, k=4))


def prompts_of(lengths, vocab, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=gen) for n in lengths]


def firings_at(prompts, layer, head, n_random=5, d_sae=24, norm=1.0, seed=1):
    """Firings at the first two positions, the last allowed one (L - 2) and random ones between,
    in every prompt: windows of every length share batches. ``norm`` is the replacement scale."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for p, tokens in enumerate(prompts):
        length = len(tokens)
        positions = sorted({0, 1, length - 2, *torch.randint(0, length - 1, (n_random,), generator=gen).tolist()})
        for t in positions:
            atom = int(torch.randint(0, d_sae, (1,), generator=gen))
            out.append(Firing(p, t, layer, head, atom, 1.0, 0.8 * norm, norm))
    return out


def by_key(rows):
    return {(r["prompt"], r["position"]): r for r in rows}


def assert_same_kls(fast, naive, atol, rtol=0.0):
    assert len(fast) == len(naive)
    fast, naive = by_key(fast), by_key(naive)
    assert fast.keys() == naive.keys()
    for key, row in naive.items():
        for c in CONDITIONS:
            a, b = fast[key][f"kl_{c}"], row[f"kl_{c}"]
            assert abs(a - b) <= atol + rtol * abs(b), (key, c, a, b)


def test_ragged_state_continues_each_prefix(hybrid):
    """Rows whose prefixes have different lengths (0, 5, 11 tokens; attention layers 2 and 4 hold
    a ragged KV cache) continue in one batch exactly as full runs of each row."""
    tokens = prompts_of([19], hybrid.cfg.d_vocab)[0]
    prefixes, more = [0, 5, 11], 6
    states = []
    for t in prefixes:
        state = RecurrentState.empty(hybrid.cfg.layer_types)
        if t:
            hybrid(tokens[None, :t], return_type=None, past_state=state)
        states.append(state)
    stacked = stack_states(states, sizes=[1, 1, 1])
    # ... also after a reordering/duplication of rows and in two calls (the cache stays ragged).
    stacked = select_rows(stacked, torch.tensor([2, 0, 1, 2]))
    order = [prefixes[i] for i in (2, 0, 1, 2)]
    suffix = torch.stack([tokens[t : t + more] for t in order])
    with torch.no_grad():
        first = hybrid(suffix[:, :1], past_state=stacked)
        rest = hybrid(suffix[:, 1:], past_state=stacked)
        got = torch.cat([first, rest], dim=1)
        for row, t in enumerate(order):
            full = hybrid(tokens[None, : t + more])[0, t:]
            torch.testing.assert_close(got[row], full, atol=1e-5, rtol=1e-5)
    assert stacked.layers[2].key_mask.shape == (4, 11 + more)


@pytest.mark.parametrize("layer", [0, 1, 3])
@pytest.mark.parametrize(
    "score,horizon,max_rows",
    [("last", None, 9), ("last", 4, 1000), ("mean_after", None, 6), ("mean_after", 3, 9), ("next", None, 9),
     ("current", None, 1000)],
)
def test_batched_fast_path_equals_naive_on_the_hybrid(hybrid, layer, score, horizon, max_rows, monkeypatch):
    """Prompts of three lengths (batches of two), firings from position 0 to L - 2; small
    ``max_rows`` splits each batch into several groups, and the windows of one group end at
    different positions (finished rows are dropped between segments)."""
    clean_passes = []
    real_clean_pass = engine_module.InterventionEngine._base_logits
    monkeypatch.setattr(engine_module.InterventionEngine, "_base_logits",
                        lambda *a: clean_passes.append(1) or real_clean_pass(*a))
    prompts = prompts_of([20, 20, 13, 17, 13], hybrid.cfg.d_vocab)
    sae = random_sae(hybrid)
    firings = firings_at(prompts, layer, 2)
    kwargs = dict(score=score, horizon=horizon, batch_size=2, progress=False)
    fast = substitute_firings(hybrid, sae, prompts, firings, Site(layer, 2), max_rows=max_rows, **kwargs)
    calls = len(clean_passes)
    naive = substitute_firings(hybrid, sae, prompts, firings, Site(layer, 2), method="naive", **kwargs)
    assert_same_kls(fast, naive, atol=1e-6)
    assert all(r["kl_delete"] > 0 for r in fast)
    # Both sources of base logits are covered: past layer 0 the unpatched pass (one per prompt
    # batch, 3 here) is needed anyway; at layer 0, batches whose windows are short (together
    # fewer tokens than the batch: here next/current) use an unpatched row in the branch instead.
    if layer == 0 and score in ("next", "current"):
        assert calls < 3
    else:
        assert calls == 3


@pytest.mark.parametrize("layer", [0, 1])
def test_batched_fast_path_equals_naive_on_mamba2(layer):
    model = HookedSSM.from_pretrained("toy-mamba2", device="cpu")
    prompts = prompts_of([20, 20, 11], model.cfg.d_vocab)
    sae = random_sae(model)
    # The toy's native writes barely move its output: a large replacement scale lifts the atom
    # and random KLs well above float32 noise.
    firings = firings_at(prompts, layer, 3, norm=30.0)
    for score, horizon in [("last", None), ("mean_after", 4), ("next", None)]:
        kwargs = dict(score=score, horizon=horizon, progress=False)
        fast = substitute_firings(model, sae, prompts, firings, Site(layer, 3), max_rows=9, **kwargs)
        naive = substitute_firings(model, sae, prompts, firings, Site(layer, 3), method="naive", **kwargs)
        assert_same_kls(fast, naive, atol=1e-6, rtol=1e-4)
        assert min(r["kl_atom"] for r in fast) > 1e-4


@pytest.mark.parametrize("layer", [0, 1])
def test_batched_fast_path_equals_naive_on_rwkv7(tmp_path, layer):
    """Past layer 0 the branches start at the edited layer and are handed layer 0's value residual."""
    from test_rwkv7_parity import make_blink_state_dict

    path = tmp_path / "rwkv7-tiny.pth"
    torch.save(make_blink_state_dict(seed=3), path)
    model = HookedSSM.from_pretrained(path, device="cpu")
    prompts = prompts_of([16, 16, 9], model.cfg.d_vocab)
    sae = random_sae(model)
    firings = firings_at(prompts, layer, 1)
    for score, horizon in [("last", None), ("mean_after", 3), ("next", None), ("current", None)]:
        kwargs = dict(score=score, horizon=horizon, progress=False)
        fast = substitute_firings(model, sae, prompts, firings, Site(layer, 1), max_rows=9, **kwargs)
        naive = substitute_firings(model, sae, prompts, firings, Site(layer, 1), method="naive", **kwargs)
        # This random model's KLs reach ~3 nats; float32 round-off alone moves the naive runner's
        # own KLs by ~4e-6 relative when its batch changes (3 condition rows vs 1).
        assert_same_kls(fast, naive, atol=1e-6, rtol=3e-5)
