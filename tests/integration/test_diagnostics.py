"""Memory diagnostics: the whole-state ablation equals the same erasure made through ``hook_write``
(an independent edit path), and the firing cosines equal a hand-computed Frobenius cosine."""

import numpy as np
import pytest
import torch

import writesae_lens.saes  # noqa: F401  (registers the architectures)
from hooked_ssm import HookedSSM
from writesae_lens.analysis.diagnostics import (
    atom_alone_kl,
    firing_cosines,
    linear_response,
    model_metric,
    state_ablation_kl,
)
from writesae_lens.interventions.engine import kl_divergence
from writesae_lens.saes import WriteSAE, WriteSAEConfig

LAYER, HEAD = 1, 2  # a Gated DeltaNet layer of the hybrid fixture (layers: lin, lin, full, lin, full)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(qwen35):
    return HookedSSM.from_pretrained(qwen35[0])


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(3, 300, (3, 20), generator=torch.Generator().manual_seed(0))


def test_state_ablation_equals_cancelling_the_state_through_the_write(model, tokens):
    got = state_ablation_kl(model, LAYER, HEAD, tokens, positions_per_window=2, min_position=3, batch_size=4, seed=1)
    assert got["n"] == 6 and got["median_last"] > 0
    # the same positions, re-drawn as state_ablation_kl draws them
    positions = torch.randint(3, tokens.shape[1] - 1, (2 * len(tokens),), generator=torch.Generator().manual_seed(1))
    hook = f"blocks.{LAYER}.mixer.hook_state"
    with torch.no_grad():
        base, cache = model.run_with_cache(tokens, names_filter=hook)
        expected_next, expected_last = [], []
        for i, t in enumerate(positions.tolist()):
            w = i // 2
            state = cache[hook][w, t, HEAD].clone()

            def cancel(write, hook, t=t, state=state):  # S_t = ... + W_t: W_t - S_t leaves S_t = 0
                write[:, t, HEAD] = write[:, t, HEAD] - state
                return write

            logits = model.run_with_hooks(tokens[w : w + 1], fwd_hooks=[(f"blocks.{LAYER}.mixer.hook_write", cancel)])
            expected_next.append(float(kl_divergence(logits[0, t + 1], base[w, t + 1])))
            expected_last.append(float(kl_divergence(logits[0, -1], base[w, -1])))
    # float32 forwards: a KL of 1e-6 carries an absolute error of ~1e-8
    np.testing.assert_allclose(got["kl_next"], expected_next, rtol=1e-3, atol=1e-7)
    np.testing.assert_allclose(got["kl_last"], expected_last, rtol=1e-3, atol=1e-7)


def test_firing_cosines_match_a_hand_computed_frobenius_cosine(model, tokens):
    cfg = model.cfg
    torch.manual_seed(0)
    sae_cfg = WriteSAEConfig(d_in=cfg.d_k * cfg.d_v, d_sae=8, d_k=cfg.d_k, d_v=cfg.d_v, k=2)
    sae_cfg.metadata.hook_name = f"blocks.{LAYER}.mixer.hook_write"
    sae_cfg.metadata.hook_head_index = HEAD
    sae = WriteSAE(sae_cfg)
    rows = [{"prompt": 2, "position": 5, "atom": 3}, {"prompt": 0, "position": 11, "atom": 6}]
    got = firing_cosines(model, sae, tokens, rows)
    _, cache = model.run_with_cache(tokens, names_filter=f"blocks.{LAYER}.mixer.hook_write")
    u, w = (x.detach() for x in sae.atoms())
    for r, cos in zip(rows, got):
        atom = torch.outer(u[r["atom"]], w[r["atom"]]).flatten()
        write = cache[f"blocks.{LAYER}.mixer.hook_write"][r["prompt"], r["position"], HEAD]
        assert cos == pytest.approx(float(atom @ write / (atom.norm() * write.norm())), abs=1e-5)


def test_linear_response_bins_and_prediction():
    cos = np.array([0.9, 0.8, 0.1, -0.2])
    rows = [{"kl_atom": a, "kl_delete": 1.0} for a in (0.2, 0.5, 2.0, 1.5)]
    out = linear_response(rows, cos, n_bins=2)
    assert out["predicted_winner_agreement"] == 1.0  # cos > 1/2 exactly where the atom won
    assert out["median_predicted_ratio"] == pytest.approx(np.median(2 * (1 - cos)))
    assert [b["win_rate"] for b in out["bins"]] == [0.0, 1.0] and [b["n"] for b in out["bins"]] == [2, 2]
    with pytest.raises(ValueError, match="one cosine per row"):
        linear_response(rows, cos[:3])


def _tiny_sae(cfg):
    torch.manual_seed(0)
    sae_cfg = WriteSAEConfig(d_in=cfg.d_k * cfg.d_v, d_sae=8, d_k=cfg.d_k, d_v=cfg.d_v, k=2)
    sae_cfg.metadata.hook_name = f"blocks.{LAYER}.mixer.hook_write"
    sae_cfg.metadata.hook_head_index = HEAD
    return WriteSAE(sae_cfg)


def test_atom_alone_kl_equals_adding_the_atom_in_a_full_rerun(model, tokens):
    sae = _tiny_sae(model.cfg)
    rows = [{"prompt": 2, "position": 5, "atom": 3, "scale": 0.7, "window_end": 19},
            {"prompt": 0, "position": 11, "atom": 6, "scale": 1.3, "window_end": 14}]
    got = atom_alone_kl(model, sae, tokens, rows)
    u, w = (x.detach() for x in sae.atoms())
    hook = f"blocks.{LAYER}.mixer.hook_write"
    with torch.no_grad():
        base = model(tokens)
        for r, kn, kl in zip(rows, got["next"], got["last"]):
            atom = torch.outer(u[r["atom"]], w[r["atom"]])
            atom = r["scale"] * atom / atom.norm()

            def add(write, hook, t=r["position"], atom=atom):
                write[:, t, HEAD] = write[:, t, HEAD] + atom.flatten()
                return write

            p = r["prompt"]
            logits = model.run_with_hooks(tokens[p : p + 1], fwd_hooks=[(hook, add)])
            assert kn == pytest.approx(float(kl_divergence(logits[0, r["position"] + 1], base[p, r["position"] + 1])),
                                       rel=1e-3, abs=1e-7)
            assert kl == pytest.approx(float(kl_divergence(logits[0, r["window_end"]], base[p, r["window_end"]])),
                                       rel=1e-3, abs=1e-7)


def test_model_metric_recovers_the_cosine_of_a_quadratic_metric():
    # A quadratic "KL" Q(x) = x^T F x / 2 with an anisotropic F: rho must be the F-cosine of atom
    # and write, r the ratio of their F-norms, and the atom wins exactly where rho > r / 2.
    rng = np.random.default_rng(0)
    basis = rng.standard_normal((6, 6))
    metric = basis @ np.diag([9.0, 4.0, 1.0, 0.3, 0.1, 0.01]) @ basis.T
    q = lambda x: float(x @ metric @ x) / 2  # noqa: E731
    writes, atoms = rng.standard_normal((40, 6)), rng.standard_normal((40, 6))
    atoms[:20] = writes[:20] + 0.4 * atoms[:20]  # half of them close to their write
    rows = [{"kl_atom": q(a - e), "kl_delete": q(e)} for a, e in zip(atoms, writes)]
    kl_add = np.array([q(a) for a in atoms])
    got = model_metric(rows, kl_add)
    f_norm = lambda x: np.sqrt(x @ metric @ x)  # noqa: E731
    rho = np.array([a @ metric @ e / (f_norm(a) * f_norm(e)) for a, e in zip(atoms, writes)])
    strength = np.array([f_norm(a) / f_norm(e) for a, e in zip(atoms, writes)])
    assert got["median_rho"] == pytest.approx(np.median(rho), rel=1e-9)
    assert got["median_read_strength"] == pytest.approx(np.median(strength), rel=1e-9)
    assert got["fraction_rho_outside_unit"] == 0.0
    assert got["win_rate"] == pytest.approx(np.mean(rho > strength / 2))
    assert got["win_rate_at_equal_strength"] == pytest.approx(np.mean(rho > 0.5))
