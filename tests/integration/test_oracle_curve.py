"""The oracle curve: its writes have exactly the asked cosine and norm, and its win rates equal a
brute-force ``run_with_hooks`` re-run that replaces the write by hand."""

import numpy as np
import pytest
import torch

from hooked_ssm import HookedSSM
from writesae_lens.analysis.oracle_curve import oracle_curve, oracle_writes
from writesae_lens.interventions.engine import kl_divergence
from writesae_lens.interventions.firings import firing_generator

LAYER, HEAD = 1, 2  # a Gated DeltaNet layer of the hybrid fixture

pytestmark = pytest.mark.usefixtures("one_thread")


def test_oracle_writes_have_the_cosine_norm_and_rank_asked_for():
    g = torch.Generator().manual_seed(0)
    native = 0.3 * torch.outer(torch.randn(8, generator=g, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64))
    cosines = (0.0, 0.25, 0.5, 0.9, 1.0)
    writes = oracle_writes(native, cosines, torch.Generator().manual_seed(1))
    for c, write in zip(cosines, writes):
        assert torch.linalg.matrix_rank(write) == 1
        assert float(write.norm()) == pytest.approx(float(native.norm()), rel=1e-12)
        assert float((write * native).sum() / native.norm() ** 2) == pytest.approx(c, abs=1e-12)
    torch.testing.assert_close(writes[-1], native, rtol=0, atol=1e-12)
    left, _, right = torch.linalg.svd(native)
    k, v = left[:, 0], right[0]
    for side in ("key", "value"):
        for c, write in zip(cosines, oracle_writes(native, cosines, torch.Generator().manual_seed(2), side)):
            assert float((write * native).sum() / native.norm() ** 2) == pytest.approx(c, abs=1e-12)
            # the other factor is exactly the native one: all of the write lies along v (or k)
            kept = write @ v if side == "key" else write.T @ k
            assert float(kept.norm()) == pytest.approx(float(native.norm()), rel=1e-12)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        oracle_writes(native, (1.2,), g)


@pytest.fixture(scope="module")
def model(qwen35):
    return HookedSSM.from_pretrained(qwen35[0])


def test_oracle_curve_equals_a_brute_force_rerun(model):
    tokens = torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    positions = [(0, 3), (0, 9), (1, 5), (1, 12)]
    cosines = (0.3, 0.8, 1.0)
    got = oracle_curve(model, LAYER, HEAD, tokens, positions, cosines, seed=4)
    hook = f"blocks.{LAYER}.mixer.hook_write"
    cfg = model.cfg
    with torch.no_grad():
        base, cache = model.run_with_cache(tokens, names_filter=hook)
        kl = {"next": np.zeros((len(positions), 4)), "last": np.zeros((len(positions), 4))}
        for i, (p, t) in enumerate(positions):
            native = cache[hook][p, t, HEAD].view(cfg.d_k, cfg.d_v)
            writes = [torch.zeros_like(native), *oracle_writes(native.double(), cosines, firing_generator(4, p, t)).float()]
            for j, write in enumerate(writes):
                def replace(act, hook, t=t, write=write):
                    act[:, t, HEAD] = write.flatten()
                    return act

                logits = model.run_with_hooks(tokens[p : p + 1], fwd_hooks=[(hook, replace)])[0]
                kl["next"][i, j] = float(kl_divergence(logits[t + 1].double(), base[p, t + 1].double()))
                kl["last"][i, j] = float(kl_divergence(logits[-1].double(), base[p, -1].double()))
    for where in ("next", "last"):
        expected = (kl[where][:, 1:] < kl[where][:, :1]).mean(axis=0)
        np.testing.assert_array_equal(got["win_rate"][where], expected)
        np.testing.assert_allclose(got["median_ratio"][where], np.median(kl[where][:, 1:] / kl[where][:, :1], axis=0),
                                   rtol=1e-3, atol=1e-6)
    # the native write itself (c = 1) moves nothing, so it beats deletion wherever deletion moves the output
    assert got["win_rate"]["next"][-1] == 1.0
    assert got["n"] == 4 and got["cosine_for"]["next"]["0.5"] is not None


def test_oracle_curve_refuses_positions_without_a_later_one(model):
    tokens = torch.randint(3, 300, (1, 8))
    with pytest.raises(ValueError, match="later position"):
        oracle_curve(model, LAYER, HEAD, tokens, [(0, 7)])
