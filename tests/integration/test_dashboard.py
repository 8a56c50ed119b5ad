"""writesae_lens.dashboard on the bundled toy GDN and its WriteSAEs, checked against quantities
recomputed here from a plain ``run_with_cache`` of the model (a tiny corpus: 6 windows of 48 tokens)."""

import json

import pytest
import torch

import writesae_lens  # noqa: F401  (registers the bundled releases)
from hooked_ssm import HookedSSM
from writesae_lens.analysis.partition import register_bundle_partition
from writesae_lens.analysis.stats import wilson_interval
from writesae_lens.cli import SUBCOMMANDS, load_sae, main
from writesae_lens.dashboard import (
    DashboardConfig,
    build_dashboard,
    compute_dashboard_data,
    load_substitution_rows,
    substitution_by_atom,
)
from writesae_lens.interventions.tokens import token_windows, toy_validation_texts
from writesae_lens.demo import toy_sae_id, toy_site

pytestmark = pytest.mark.usefixtures("one_thread")
CONFIG = DashboardConfig(n_contexts=3, min_firings=3)
SKIP = CONFIG.min_position
LAYER, HEAD = toy_site("toy-gdn")


@pytest.fixture(scope="module")
def model():
    return HookedSSM.from_pretrained("toy-gdn")


@pytest.fixture(scope="module")
def tokens(model):
    return token_windows(model, toy_validation_texts(), 48, 6)


@pytest.fixture(scope="module", params=["write", "state"])
def site_data(request, model, tokens):
    sae = load_sae("writesae-toy-gdn/" + toy_sae_id(site=request.param))
    return request.param, sae, compute_dashboard_data(model, sae, tokens, config=CONFIG, progress=False)


@pytest.fixture(scope="module")
def reference(model, tokens):
    names = [f"blocks.{LAYER}.mixer.hook_{kind}" for kind in ("write", "state", "q", "k")]
    _, cache = model.run_with_cache(tokens, names_filter=lambda name: name in names)
    return {name.rsplit(".", 1)[-1]: cache[name][:, :, HEAD].float() for name in names}


def test_counts_and_contexts_match_the_model(model, tokens, site_data, reference):
    kind, sae, data = site_data
    codes = sae.encode(reference[f"hook_{kind}"]).detach()  # [window, pos, d_sae]
    n_fire = (codes[:, SKIP:] > 0).sum(dim=(0, 1))
    alive = [i for i in range(sae.cfg.d_sae) if n_fire[i] >= CONFIG.min_firings]
    assert [a["atom"] for a in data["atoms"]] == alive and data["meta"]["n_alive"] == len(alive) > 0
    n_tokens = tokens.shape[0] * (tokens.shape[1] - SKIP)
    u, w = (x.detach() for x in sae.atoms())
    for a in data["atoms"][:: max(1, len(alive) // 12)]:
        i = a["atom"]
        assert a["n_firings"] == int(n_fire[i]) and a["density"] == pytest.approx(int(n_fire[i]) / n_tokens)
        fired = codes[:, SKIP:, i][codes[:, SKIP:, i] > 0]
        assert a["mean_act"] == pytest.approx(float(fired.mean()), rel=1e-4)
        assert a["max_act"] == pytest.approx(float(fired.max()), rel=1e-5)
        assert sum(a["histogram"]["counts"]) == int(n_fire[i])
        best = a["top_contexts"][0]
        assert best["score"] == pytest.approx(a["max_act"], rel=1e-4)
        scores = [c["score"] for c in a["top_contexts"]]
        assert scores == sorted(scores, reverse=True) and len({c["window"] for c in a["top_contexts"]}) == len(scores)
        for ctx in a["top_contexts"] + a["read_contexts"]:
            start = ctx["position"] - ctx["focus"]
            window, span = ctx["window"], slice(start, start + len(ctx["tokens"]))
            assert ctx["tokens"] == tokens[window, span].tolist()
            assert ctx["act"] == pytest.approx(codes[window, span, i].tolist(), abs=1e-4)
            read = reference["hook_q"][window, span] @ u[i]
            assert ctx["read"] == pytest.approx(read.tolist(), abs=1e-4)
            write = reference["hook_write"][window, span].view(-1, model.cfg.d_k, model.cfg.d_v)
            assert ctx["write"] == pytest.approx((write * torch.outer(u[i], w[i])).sum((1, 2)).tolist(), abs=1e-4)
        for ctx in a["read_contexts"]:
            assert ctx["in_state"][ctx["focus"]] and ctx["score"] == pytest.approx(abs(ctx["read"][ctx["focus"]]), abs=1e-4)
            if kind == "state":  # in the state = the state SAE's code is positive
                assert ctx["in_state"] == [v > 0 for v in ctx["act"]]


def test_factor_views_match_brute_force(model, tokens, site_data, reference):
    _, sae, data = site_data
    u, w = (x.detach() for x in sae.atoms())
    readout = (model.W_O[LAYER][HEAD].float() @ model.W_U.float()).detach()  # [d_v, vocab]
    keys = reference["hook_k"][:, SKIP:].reshape(-1, model.cfg.d_k)
    ids = tokens[:, SKIP:].reshape(-1)
    for a in data["atoms"][:5]:
        i = a["atom"]
        logit = w[i] @ readout
        assert [p["token"] for p in a["promoted"]] == logit.topk(CONFIG.n_tokens).indices.tolist()
        assert [s["token"] for s in a["suppressed"]] == (-logit).topk(CONFIG.n_tokens).indices.tolist()
        assert a["promoted"][0]["logit"] == pytest.approx(float(logit.max()), abs=1e-4)
        best = {}
        for token in set(ids.tolist()):
            sel = ids == token
            if int(sel.sum()) >= CONFIG.min_key_count:
                mean = keys[sel].mean(0)
                best[token] = float(mean @ u[i] / mean.norm())
        top = sorted(best, key=best.get, reverse=True)[: CONFIG.n_tokens]
        assert [k["token"] for k in a["key_tokens"]] == top
        assert a["key_tokens"][0]["cos"] == pytest.approx(best[top[0]], abs=1e-3)
        assert a["key_tokens"][0]["count"] == int((ids == top[0]).sum())


def test_partition_columns_match_the_partition_pass(model, tokens, site_data):
    _, sae, data = site_data
    rows, summary = register_bundle_partition(model, sae, tokens, min_firings=CONFIG.min_firings, min_position=SKIP,
                                              progress=False)
    for a in data["atoms"]:
        assert a["cls"] == rows[a["atom"]]["cls"]
        assert a["median_cos"] == pytest.approx(rows[a["atom"]]["median_cos"], abs=1e-5)
    assert data["partition"]["registers"] == summary["registers"]


@pytest.mark.parametrize("name", ["toy-mamba2", "toy-rwkv7"])
def test_other_families(name):
    """Mamba-2 (one decay per head) and RWKV-7 (one per key channel): a random WriteSAE's counts and
    reads match a plain run_with_cache."""
    from writesae_lens.saes import WriteSAE, WriteSAEConfig

    model = HookedSSM.from_pretrained(name)
    d_k, d_v = model.cfg.d_k, model.cfg.d_v
    torch.manual_seed(0)
    cfg = WriteSAEConfig(d_in=d_k * d_v, d_sae=24, d_k=d_k, d_v=d_v, k=3)
    cfg.metadata.hook_name, cfg.metadata.hook_head_index = "blocks.0.mixer.hook_write", 1
    sae = WriteSAE(cfg)
    tokens = token_windows(model, toy_validation_texts(), 24, 2)
    data = compute_dashboard_data(model, sae, tokens, config=DashboardConfig(n_contexts=2, min_firings=1), progress=False)
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in ("blocks.0.mixer.hook_write", "blocks.0.mixer.hook_q"))
    codes = sae.encode(cache["blocks.0.mixer.hook_write"][:, :, 1].float()).detach()
    n_fire = (codes[:, SKIP:] > 0).sum(dim=(0, 1))
    assert {a["atom"]: a["n_firings"] for a in data["atoms"]} == {i: int(n) for i, n in enumerate(n_fire) if n > 0}
    u = sae.atoms()[0].detach()
    for a in data["atoms"]:
        for ctx in a["read_contexts"]:
            q = cache["blocks.0.mixer.hook_q"][ctx["window"], ctx["position"], 1].float()
            assert ctx["score"] == pytest.approx(abs(float(q @ u[a["atom"]])), abs=1e-4)


def test_second_call_loads_the_cache_without_running_the_model(model, tokens, tmp_path, monkeypatch):
    sae = load_sae("writesae-toy-gdn/" + toy_sae_id(site="write"))
    first = compute_dashboard_data(model, sae, tokens[:2], config=CONFIG, cache_dir=tmp_path, progress=False)
    assert len(list(tmp_path.glob("dashboard-*.json"))) == 1

    def refuse(*args, **kwargs):
        raise AssertionError("the model ran although the data was cached")

    monkeypatch.setattr("writesae_lens.dashboard.data.observe_site", refuse)
    assert compute_dashboard_data(model, sae, tokens[:2], config=CONFIG, cache_dir=tmp_path, progress=False) == first
    with pytest.raises(AssertionError, match="cached"):  # other settings: another key
        compute_dashboard_data(model, sae, tokens[:2], config=DashboardConfig(n_contexts=2), cache_dir=tmp_path,
                               progress=False)


def test_substitution_rows_per_atom(tmp_path):
    rows = [
        dict(atom=3, prompt=0, position=5, layer=1, head=0, kl_atom=0.1, kl_delete=0.3, kl_random=0.9),
        dict(atom=3, prompt=1, position=7, layer=1, head=0, kl_atom=0.5, kl_delete=0.2, kl_random=0.4),
        dict(atom=3, prompt=2, position=2, layer=1, head=0, kl_atom=0.05, kl_delete=0.1, kl_random=0.2),
        dict(atom=3, prompt=2, position=2, layer=2, head=0, kl_atom=9.0, kl_delete=0.1, kl_random=0.2),  # other layer
        dict(atom=8, prompt=0, position=1, kl_atom=1.25e-9, kl_delete=0.5),
    ]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    by_atom = substitution_by_atom(load_substitution_rows(path), layer=1, head=0)
    assert by_atom[3]["n"] == 3 and by_atom[3]["wins"] == 2 and by_atom[3]["win_ci"] == pytest.approx(wilson_interval(2, 3))
    assert by_atom[3]["median_kl"] == pytest.approx(dict(atom=0.1, delete=0.2, random=0.4))
    assert by_atom[8]["win_rate"] == 1 and set(by_atom[8]["median_kl"]) == {"atom", "delete"}
    assert by_atom[8]["kl"]["atom"] == [1.25e-9]  # tiny KLs survive (the toy's are ~1e-8)
    with pytest.raises(ValueError, match="kl_delete"):
        load_substitution_rows([dict(atom=1, prompt=0, position=1, kl_atom=0.1)])


def test_build_dashboard_writes_the_site_and_the_neuronpedia_batch(model, tokens, tmp_path):
    sae = load_sae("writesae-toy-gdn/" + toy_sae_id(site="write"))
    config = DashboardConfig(n_contexts=2, min_firings=12)
    rows = [dict(atom=a, prompt=0, position=3, kl_atom=0.1, kl_delete=0.2 * a % 1, kl_random=0.5) for a in range(50)]
    data = build_dashboard(model, sae, tokens[:3], tmp_path / "site", rows, config=config, progress=False)
    site = tmp_path / "site"
    alive = [a["atom"] for a in data["atoms"]]
    assert sorted(p.name for p in (site / "atoms").iterdir()) == sorted(f"{a}.html" for a in alive)
    index = (site / "index.html").read_text()
    assert index.count('href="atoms/') == len(alive) and "cdn" not in index.lower()
    assert (site / "assets" / "plotly.min.js").stat().st_size > 1_000_000
    saved = json.loads((site / "data.json").read_text())
    assert saved == data and set(data["substitution"]) == {str(a) for a in range(50)}
    batch = json.loads((site / "neuronpedia" / "batch-0.json").read_text())
    assert (batch["model_id"], batch["layer"], batch["sae_set"]) == ("toy-gdn", LAYER, f"write-h{HEAD}")
    feature = batch["features"][0]
    assert feature["feature_index"] == alive[0] and feature["frac_nonzero"] == data["atoms"][0]["density"]
    assert len(feature["pos_str"]) == len(feature["pos_values"]) == config.n_tokens
    assert feature["activations"][0]["bin_min"] == -1
    assert len(feature["activations"][0]["tokens"]) == len(feature["activations"][0]["values"])
    assert set(feature) >= {"neg_str", "neg_values", "freq_hist_data_bar_values", "freq_hist_data_bar_heights",
                            "logits_hist_data_bar_values", "logits_hist_data_bar_heights", "n_prompts_total",
                            "n_tokens_in_prompt", "dataset", "decoder_weights_dist"}


def test_cli_dashboard(tmp_path, capsys):
    assert "dashboard" in SUBCOMMANDS
    out = tmp_path / "site"
    assert main(["dashboard", "--sae", "writesae-toy-gdn/" + toy_sae_id(site="state"), "--out", str(out),
                 "--context-size", "32", "--n-windows", "2", "--min-firings", "8", "--quiet", "--no-neuronpedia"]) == 0
    assert "alive atoms" in capsys.readouterr().out
    assert (out / "index.html").is_file() and not (out / "neuronpedia").exists()
    assert len(list((out / ".cache").glob("dashboard-*.json"))) == 1
