"""The dictionary comparison on a tiny model: every method's held-out FVU against an independent
computation (numpy SVD / PCA for the baselines; the saved SAE reloaded and run in numpy terms for the
others), the downstream column against downstream_cost, resuming, and the CLI's outputs."""

import json

import numpy as np
import pytest
import torch
from sae_lens import SAE

from hooked_ssm import HookedSSM
from writesae_lens.compare import METHODS, compare_dictionaries, format_table
from writesae_lens.recipe import SiteCache

LAYER, HEAD = 1, 2
SETTINGS = dict(k=2, epochs=1, n_sequences=96, context_size=32, train_batch_size_tokens=64, lr=3e-3, substitution_firings=4)


@pytest.fixture(scope="module")
def model(qwen35):
    return HookedSSM.from_pretrained(qwen35[0])


@pytest.fixture(scope="module")
def comparison(model, dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    rows = compare_dictionaries(model, dataset, LAYER, HEAD, "write", budget=16, out_dir=out, progress=False, **SETTINGS)
    return out, {r["method"]: r for r in rows}


def numpy_fvu(x, r):
    return float(((x - r) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())


def test_every_method_reports_every_column(comparison):
    _, rows = comparison
    assert list(rows) == list(METHODS)
    d = 8 * 16  # the tiny model's d_k * d_v
    assert rows["svd"]["parameters"] == 2 * d and rows["pca"]["parameters"] == 2 * d + d
    assert rows["topk"]["parameters"] == 2 * 16 * d + 16 + d  # flat: 2 n d_in + n + d_in
    assert rows["writesae_matrix"]["parameters"] == 16 * d + 16 * (16 + 8) + 16 + d
    assert rows["writesae"]["parameters"] == 2 * 16 * (16 + 8) + 16 + d
    assert rows["writesae_tied"]["parameters"] == 16 * (16 + 8) + 16 + d
    for method, row in rows.items():
        assert 0 < row["fvu"] < 1.5 and row["explained_variance"] == pytest.approx(1 - row["fvu"])
        assert np.isfinite(row["ppl_change"])
        if method in ("svd", "pca"):
            assert row["l0"] == 2 and row["atom_write_cos"] is None
        else:
            assert 0 < row["l0"] <= 2 and 0 <= row["dead_fraction"] <= 1
    assert "paper" in format_table(list(rows.values()))


def test_baseline_fvu_equals_numpy_svd(comparison):
    out, rows = comparison
    cache = SiteCache.open(out / "inputs")
    train, heldout = cache.load("train").double().numpy(), cache.load("heldout").double().numpy()
    _, _, vt = np.linalg.svd(train, full_matrices=False)
    v = vt[:2]
    assert rows["svd"]["fvu"] == pytest.approx(numpy_fvu(heldout, heldout @ v.T @ v), rel=1e-4)
    mean = train.mean(0)
    _, _, vt = np.linalg.svd(train - mean, full_matrices=False)
    v = vt[:2]
    assert rows["pca"]["fvu"] == pytest.approx(numpy_fvu(heldout, (heldout - mean) @ v.T @ v + mean), rel=1e-4)


@pytest.mark.parametrize("method", ["topk", "writesae_matrix", "writesae_bilinear", "writesae", "writesae_tied"])
def test_sae_fvu_equals_the_saved_sae_on_the_held_out_split(comparison, method):
    out, rows = comparison
    heldout = SiteCache.open(out / "inputs").load("heldout")
    sae = SAE.load_from_disk(out / "saes" / method)
    with torch.no_grad():
        recon = sae(heldout).double().numpy()
    assert rows[method]["fvu"] == pytest.approx(numpy_fvu(heldout.double().numpy(), recon), rel=1e-3)


def test_a_rerun_resumes_and_other_settings_are_refused(model, dataset, comparison):
    out, rows = comparison
    (out / "rows" / "pca.json").unlink()
    stamp = (out / "rows" / "svd.json").stat().st_mtime_ns
    again = compare_dictionaries(model, dataset, LAYER, HEAD, "write", budget=16, out_dir=out, progress=False,
                                 **{**SETTINGS, "methods": ["svd", "pca"]})
    assert (out / "rows" / "svd.json").stat().st_mtime_ns == stamp
    assert again[1]["fvu"] == pytest.approx(rows["pca"]["fvu"])
    with pytest.raises(ValueError, match="other settings"):
        compare_dictionaries(model, dataset, LAYER, HEAD, "write", budget=32, out_dir=out, progress=False, **SETTINGS)
    with pytest.raises(ValueError, match="Unknown method"):
        compare_dictionaries(model, dataset, LAYER, HEAD, "write", out_dir=out, methods=["lda"])


def test_cli_writes_table_json_and_plot(comparison, tmp_path, capsys, monkeypatch, model, dataset):
    import writesae_lens.compare as compare
    from writesae_lens.cli import main

    out, _ = comparison
    monkeypatch.setattr(HookedSSM, "from_pretrained", classmethod(lambda cls, *a, **k: model))
    monkeypatch.setattr(compare, "toy_training_dataset", lambda m, c: dataset)
    argv = ["compare", "--layer", str(LAYER), "--head", str(HEAD), "--budget", "16", "--k", "2", "--epochs", "1",
            "--context-size", "32", "--lr", "3e-3", "--n-sequences", "96", "--batch-size", "64", "--substitution-firings", "4", "--out-dir", str(out),
            "--json", str(tmp_path / "rows.json"), "--plot", str(tmp_path / "fvu.png"), "--quiet",
            "--methods", "svd", "writesae"]
    assert main(argv) == 0
    assert [r["method"] for r in json.loads((tmp_path / "rows.json").read_text())] == ["svd", "writesae"]
    assert (tmp_path / "fvu.png").stat().st_size > 0
    assert "writesae" in capsys.readouterr().out
