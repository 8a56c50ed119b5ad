"""Sustained installs (AUDIT.md item 10): magnitude m ||k_t v_t^T|| (not the beta-scaled write) at
three consecutive positions, a sweep over five start positions, the four strata (frequent, mid,
rare, semantic), greedy continuations equal to a cache-free decoding loop, non-monotonicity in m."""

import pytest
import torch

from writesae_lens.interventions.sites import Site
from writesae_lens.interventions.engine import Branch
from writesae_lens.interventions.installs import (
    InstallOptions,
    TargetRank,
    install_edits,
    observe_installs,
    run_installs,
    start_positions,
    summarize_installs,
)
from writesae_lens.interventions.protocol import run_branches
from writesae_lens.interventions.logit_shift import readout_matrix
from writesae_lens.interventions.sign_prediction import target_directions

HEAD = 1
SITE = Site(0, HEAD)
pytestmark = pytest.mark.usefixtures("one_thread")


def test_install_magnitude_is_m_times_the_unscaled_outer_product(model, contexts):
    """The matrix added at each of the three positions has Frobenius norm m ||k_t|| ||v_t||, key
    side the native k_t, value side w*_T."""
    seen = {}
    keep = lambda key: (lambda act, hook: seen.__setitem__(key, act[:, :, HEAD].detach().clone()))  # noqa: E731
    with torch.no_grad(), model.hooks(fwd_hooks=[(f"blocks.0.mixer.{leaf}", keep(leaf)) for leaf in ("hook_k", "hook_v", "hook_beta")]):
        model(contexts)
    observed = observe_installs(model, SITE, contexts, InstallOptions())
    w_star = target_directions(model, 0, HEAD, torch.tensor([42]))[0]
    edits = install_edits(SITE, observed, 1, 4, w_star, 3.0, 3)
    assert [e.position for e in edits] == [4, 5, 6]
    assert all(e.hook_name == "blocks.0.mixer.hook_write" and e.head == HEAD and e.mode == "add" for e in edits)
    for e in edits:
        k, v = seen["hook_k"][1, e.position], seen["hook_v"][1, e.position]
        assert float(e.value.norm()) == pytest.approx(3.0 * float(k.norm() * v.norm()), rel=1e-4)
        torch.testing.assert_close(e.value, 3.0 * k.norm() * v.norm() * torch.outer(k / k.norm(), w_star), rtol=1e-4, atol=1e-6)
    assert (seen["hook_beta"] < 0.99).all()  # so the beta-scaled magnitude would differ


def test_installs_with_a_large_m_put_the_target_in_the_continuation(model, contexts, linearised):
    """Under the linearised read a large install makes an extreme mid-rank target the argmax."""
    readout = readout_matrix(model, 0, HEAD)
    unit = readout / readout.norm(dim=0, keepdim=True)
    along = unit.T @ readout
    wins = along.diagonal() >= along.max(dim=1).values - 1e-6  # T beats every token along its own direction
    opts = InstallOptions(key="query", n_positions=1)  # one write, read right away: u . q_t = |q_t| > 0
    last = contexts.shape[1] - 1
    with torch.no_grad(), linearised():
        order = model(contexts)[:, -1].argsort(dim=-1, descending=True)
        targets = torch.tensor([max((int(t) for t in order[r, 20:150] if wins[t]), key=lambda t: float(readout[:, t].norm()))
                                for r in range(len(contexts))])
        w_star = target_directions(model, 0, HEAD, targets)
        observed = observe_installs(model, SITE, contexts, opts)
        outs = {}
        for m in (0.01, 5000.0):
            branches = [Branch(c, install_edits(SITE, observed, c, last, w_star[c], m, 1), generate=8) for c in range(len(contexts))]
            done = run_branches(model, list(contexts), branches, TargetRank(targets))
            outs[m] = torch.stack([r.generated for r in done])
    assert (outs[5000.0] == targets[:, None]).any(-1).all()
    assert not (outs[0.01] == targets[:, None]).any(-1).any()


def greedy_without_cache(model, prompt, edits, steps):
    """Reference decoding: re-run the whole sequence at every step (no recurrent cache), adding
    each edit's matrix to the write at its position through a plain hook. Returns the greedy
    tokens and the first step's log-probabilities."""

    def hook(act, hook):
        for e in edits:
            act[:, e.position, HEAD] += e.value.flatten()
        return act

    seq, first = prompt[None], None
    for _ in range(steps):
        with torch.no_grad(), model.hooks(fwd_hooks=[("blocks.0.mixer.hook_write", hook)]):
            logits = model(seq)[:, -1]
        first = logits[0].double().log_softmax(-1) if first is None else first
        seq = torch.cat([seq, logits.argmax(-1)[:, None]], dim=1)
    return seq[0, prompt.numel():], first


def test_run_installs_sweeps_starts_and_strata_like_a_cache_free_loop(model, contexts):
    options = InstallOptions(max_new_tokens=6, semantic_seed=50)
    rows, summary = run_installs(model, contexts, layer=0, head=HEAD, options=options, progress=False)
    starts = start_positions(contexts.shape[1], options)
    assert starts == [5, 6, 7, 8, 9] and summary["config"]["starts"] == starts
    assert {r["stratum"] for r in rows} == {"frequent", "mid", "rare", "semantic"}
    for stratum in ("frequent", "mid", "rare", "semantic"):
        per_target = {(r["context"], r["target"]) for r in rows if r["stratum"] == stratum}
        for key in per_target:  # every target is crossed with the five starts and the three multipliers
            trials = [(r["start"], r["multiplier"]) for r in rows if (r["context"], r["target"]) == key and r["stratum"] == stratum]
            assert sorted(trials) == sorted((s, m) for s in starts for m in (1.5, 3.0, 6.0))
    limits = summary["config"]["thresholds"]
    assert limits == {"mid_lo": 1, "mid_hi": 2, "out_of_context": 34, "rare": 20}  # 300 / 151,936 of the paper's ranks
    for r in rows:
        if r["stratum"] == "mid":
            assert limits["mid_lo"] <= r["native_rank"] <= limits["mid_hi"]
        else:
            assert r["target"] not in contexts[r["context"]].tolist()
            assert r["native_rank"] >= (limits["rare"] if r["stratum"] == "rare" else limits["out_of_context"])
    observed = observe_installs(model, SITE, contexts, options)
    for r in rows[:: max(1, len(rows) // 4)]:
        w_star = target_directions(model, 0, HEAD, torch.tensor([r["target"]]))[0]
        edits = install_edits(SITE, observed, r["context"], r["start"], w_star, r["multiplier"], 3)
        expected, first = greedy_without_cache(model, contexts[r["context"]], edits, 6)
        assert r["included"] == bool((expected == r["target"]).any())
        assert r["logp"] == pytest.approx(float(first[r["target"]]), abs=1e-5)
        assert r["rank"] == int((first > first[r["target"]]).sum()) + 1


def test_summary_flags_non_monotone_dose_response():
    def rows(m, hits):
        return [dict(stratum="mid", multiplier=m, included=i < hits, native_included=False, rank=1, native_rank=2,
                     logp_lift=0.5) for i in range(4)]

    summary = summarize_installs(rows(1.5, 1) + rows(3.0, 3) + rows(6.0, 1))
    assert summary["non_monotone"] and summary["best_multiplier"] == 3.0
    assert summary["strata"]["pooled"][3.0]["lift_pp"] == 75.0
    assert not summarize_installs(rows(1.5, 1) + rows(3.0, 2) + rows(6.0, 3))["non_monotone"]


def test_unscaled_size_on_mamba2_is_B_times_x():
    """Mamba-2 writes B_t (dt_t x_t)^T: the unscaled size is ||B_t|| ||x_t||, the native one dt_t times it."""
    from hooked_ssm import HookedSSM

    model = HookedSSM.from_pretrained("toy-mamba2", device="cpu")
    tokens = torch.randint(3, model.cfg.d_vocab, (2, 10), generator=torch.Generator().manual_seed(0))
    layer = model.cfg.layer_types.index("mamba2")
    site = Site(layer, 0)
    seen = {}
    keep = lambda key: (lambda act, hook: seen.__setitem__(key, act[:, :, 0].detach()))  # noqa: E731
    with torch.no_grad(), model.hooks(fwd_hooks=[(f"blocks.{layer}.mixer.{leaf}", keep(leaf)) for leaf in ("hook_k", "hook_x", "hook_dt")]):
        model(tokens)
    unscaled = seen["hook_k"].norm(dim=-1) * seen["hook_x"].norm(dim=-1)
    torch.testing.assert_close(observe_installs(model, site, tokens, InstallOptions())["size"], unscaled, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(observe_installs(model, site, tokens, InstallOptions(norm="write"))["size"],
                               seen["hook_dt"] * unscaled, rtol=1e-4, atol=1e-6)
