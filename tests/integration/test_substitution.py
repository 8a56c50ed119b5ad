"""The substitution test: the fast path (shared prefix + batched branches) equals naive full
re-runs, conditions are independent of their order, runs resume, and an oracle dictionary wins."""

import json

import pytest
import torch

import writesae_lens.saes  # noqa: F401  (registers the architectures)
from hooked_ssm import HookedSSM
from writesae_lens.analysis.report import format_summary_table
from writesae_lens.interventions import find_firings, run_substitution_test
from writesae_lens.interventions.engine import select_rows
from writesae_lens.interventions.sites import resolve_site
from writesae_lens.interventions.substitution import condition_writes, summarize_substitution
from writesae_lens.saes import WriteSAE, WriteSAEConfig

LAYER, HEAD = 1, 2  # a Gated DeltaNet layer of the hybrid fixture (layers: lin, lin, full, lin, full)


# Many tiny forwards: on a shared CPU one thread is far faster (fixture in tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(qwen35):
    return HookedSSM.from_pretrained(qwen35[0])


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(3, 300, (3, 20), generator=torch.Generator().manual_seed(0))


def random_sae(model, site="write", d_sae=24, k=4, seed=0, layer=LAYER, head=HEAD):
    torch.manual_seed(seed)
    d_k, d_v = model.cfg.d_k, model.cfg.d_v
    cfg = WriteSAEConfig(d_in=d_k * d_v, d_sae=d_sae, d_k=d_k, d_v=d_v, k=k)
    cfg.metadata.hook_name = f"blocks.{layer}.mixer.hook_{site}"
    cfg.metadata.hook_head_index = head
    return WriteSAE(cfg)


def kls(rows):
    return torch.tensor([[r["kl_atom"], r["kl_delete"], r["kl_random"]] for r in rows], dtype=torch.float64)


@pytest.mark.parametrize(
    "site,scale,score,horizon",
    [("write", "native_norm", "last", None), ("state", "coefficient", "next", None),
     ("write", "native_norm", "mean_after", 5), ("state", "native_norm", "last", 4),
     ("write", "coefficient", "current", None)],
)
def test_fast_path_equals_naive_full_reruns(model, tokens, site, scale, score, horizon):
    sae = random_sae(model, site)
    kwargs = dict(tokens=tokens, scale=scale, score=score, horizon=horizon, max_firings=14, progress=False, max_rows=9,
                  min_firings_per_atom=1)
    fast, summary = run_substitution_test(model, sae, **kwargs)
    naive, _ = run_substitution_test(model, sae, method="naive", **kwargs)
    assert len(fast) == len(naive) == 14
    assert [(r["prompt"], r["position"]) for r in fast] == [(r["prompt"], r["position"]) for r in naive]
    torch.testing.assert_close(kls(fast), kls(naive), atol=1e-6, rtol=0)
    assert (kls(fast) > 0).all()  # every condition changes the output somewhat
    assert summary["n"] == 14 and summary["config"]["site"] == site


def test_fast_path_reuses_one_prefix_state_per_batch(model, tokens):
    """The branches continue from copies: a branch's run never changes the shared prefix state."""
    from hooked_ssm.state import RecurrentState

    state = RecurrentState.empty(model.cfg.layer_types)
    model(tokens[:, :7], return_type=None, past_state=state)
    before = [t.clone() for cache in state.layers for t in vars(cache).values() if isinstance(t, torch.Tensor)]
    branch = select_rows(state, torch.tensor([0, 0, 2]))
    model(tokens[[0, 0, 2], 7:], past_state=branch)
    after = [t for cache in state.layers for t in vars(cache).values() if isinstance(t, torch.Tensor)]
    assert all(torch.equal(a, b) for a, b in zip(before, after)) and state.n_tokens == 7
    # ... and continuing from the copy equals a full run.
    full = model(tokens[[0, 0, 2]])
    again = model(tokens[[0, 0, 2], 7:], past_state=select_rows(state, torch.tensor([0, 0, 2])))
    torch.testing.assert_close(again, full[:, 7:], atol=1e-5, rtol=1e-5)


def test_results_do_not_depend_on_condition_order(model, tokens):
    sae = random_sae(model)
    kwargs = dict(tokens=tokens, max_firings=8, progress=False, min_firings_per_atom=1)
    rows, _ = run_substitution_test(model, sae, **kwargs)
    swapped, _ = run_substitution_test(model, sae, conditions=("random", "delete", "atom"), **kwargs)
    torch.testing.assert_close(kls(rows), kls(swapped), atol=1e-7, rtol=1e-6)
    only_atom, _ = run_substitution_test(model, sae, conditions=("atom",), **kwargs)
    torch.testing.assert_close(kls(rows)[:, 0], torch.tensor([r["kl_atom"] for r in only_atom], dtype=torch.float64),
                               atol=1e-7, rtol=1e-6)


def test_condition_writes_match_the_protocol(model, tokens):
    sae = random_sae(model)
    site = resolve_site(model, sae)
    firings = find_firings(model, sae, tokens, site, max_firings=6, min_firings_per_atom=1)
    d_k, d_v = model.cfg.d_k, model.cfg.d_v
    prompts = list(tokens)
    for scale in ("native_norm", "coefficient"):
        writes = condition_writes(model, sae, site, prompts, firings, scale).view(len(firings), 3, d_k, d_v)
        target = torch.tensor([f.native_norm if scale == "native_norm" else f.contribution_norm for f in firings])
        torch.testing.assert_close(writes[:, 0].flatten(1).norm(dim=-1), target)
        torch.testing.assert_close(writes[:, 2].flatten(1).norm(dim=-1), target)  # random: same norm as atom
        assert (writes[:, 1] == 0).all()
        assert (torch.linalg.matrix_rank(writes[:, 2]) == 1).all()
        u, w = sae.atoms()
        for f, atom in zip(firings, writes[:, 0]):
            expected = torch.outer(u[f.atom], w[f.atom]) * atom.norm()
            torch.testing.assert_close(atom, expected.detach())
        # The default random control is the atom of a feature that does not fire there.
        control = [f.control_atom for f in firings]
        assert all(c is not None and c != f.atom for c, f in zip(control, firings))
        expected = torch.stack([torch.outer(u[c], w[c]) for c in control]).detach()
        torch.testing.assert_close(writes[:, 2] / target[:, None, None], expected)
    # The random control is a fixed function of the firing (not of batching or order).
    again = condition_writes(model, sae, site, prompts, list(reversed(firings)))
    torch.testing.assert_close(again.flip(0), condition_writes(model, sae, site, prompts, firings))


def test_resume_skips_finished_firings(model, tokens, tmp_path):
    sae = random_sae(model)
    out = tmp_path / "rows.jsonl"
    full, full_summary = run_substitution_test(model, sae, tokens=tokens, max_firings=10, progress=False,
                                               min_firings_per_atom=1)
    firings = find_firings(model, sae, tokens, max_firings=10, min_firings_per_atom=1)
    # An interrupted run: the first 4 firings finished, then half a line was written.
    run_substitution_test(model, sae, tokens=tokens, firings=firings[:4], out=out, progress=False, min_firings_per_atom=1)
    with open(out, "a") as handle:
        handle.write('{"prompt": 0, "posi')
    rows, summary = run_substitution_test(model, sae, tokens=tokens, firings=firings, out=out, resume=True, progress=False,
                                          min_firings_per_atom=1)
    assert len(rows) == 10
    torch.testing.assert_close(kls(rows), kls(full), atol=1e-7, rtol=1e-6)
    on_disk = [json.loads(line) for line in out.read_text().splitlines()[1:]]  # after the run record
    assert len(on_disk) == 10 and len({(r["prompt"], r["position"], r["atom"]) for r in on_disk}) == 10
    assert summary["win_rate"] == full_summary["win_rate"]
    with pytest.raises(ValueError, match="Cannot resume.*settings.scale_mode: file has 'native_norm', this run has 'coefficient'"):
        run_substitution_test(model, sae, tokens=tokens, firings=firings, out=out, resume=True, scale="coefficient",
                              progress=False)


def test_oracle_dictionary_of_native_writes_wins(model, tokens):
    """Atoms that *are* the native writes (unit k, unit v) substitute with ~zero KL: they win."""
    site_hook = f"blocks.{LAYER}.mixer"
    _, cache = model.run_with_cache(tokens, names_filter=[f"{site_hook}.hook_k", f"{site_hook}.hook_v"])
    k = cache[f"{site_hook}.hook_k"][:, 1:-1, HEAD].flatten(0, 1)
    v = cache[f"{site_hook}.hook_v"][:, 1:-1, HEAD].flatten(0, 1)
    sae = random_sae(model, d_sae=k.shape[0], k=1)
    with torch.no_grad():
        sae.U_dec.copy_(k / k.norm(dim=-1, keepdim=True))
        sae.V_dec.copy_(v / v.norm(dim=-1, keepdim=True))
        sae.A_enc.copy_(sae.U_dec)
        sae.B_enc.copy_(sae.V_dec)
        sae.b_dec.zero_()
    rows, summary = run_substitution_test(model, sae, tokens=tokens, max_firings=20, progress=False,
                                          selection="dominant", min_firings_per_atom=1)
    assert summary["win_rate"] >= 0.9
    assert summary["median_kl"]["atom"] < 1e-3 * summary["median_kl"]["delete"]
    table = format_summary_table(summary)
    assert "Wilson 95% CI" in table and "92.4%" in table and "Qwen3.5-0.8B" in table
    assert summarize_substitution(rows, min_firings_per_atom=1)["population"]["n_atoms"] == summary["population"]["n_atoms"]


def test_suite_over_several_sites_reports_per_layer_rows(model, tokens, tmp_path):
    from writesae_lens.interventions import run_substitution_suite

    saes = [random_sae(model, layer=0, head=1, seed=1), random_sae(model, layer=LAYER, head=HEAD)]
    out = tmp_path / "suite.jsonl"
    rows, summary = run_substitution_suite(model, saes, tokens, max_firings=4, out=out, progress=False,
                                           min_firings_per_atom=1, max_per_atom=4)
    assert len(rows) == 8 and set(summary["per_layer"]) == {0, LAYER}
    again, _ = run_substitution_suite(model, saes, tokens, max_firings=4, out=out, resume=True, progress=False,
                                      min_firings_per_atom=1, max_per_atom=4)
    torch.testing.assert_close(kls(again), kls(rows))
    assert len(out.read_text().splitlines()) == 1 + 8  # the run record, then the rows
