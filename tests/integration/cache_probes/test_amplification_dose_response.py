"""The paper's amplification dose-response table (AUDIT.md item 11): boundary features selected by
mean code on sentence-boundary tokens minus elsewhere, offsets of dose x their mean boundary
activation, a dose-matched random-feature control, paired sampling, scipy statistics."""

import numpy as np
import pytest
import torch
from sae_lens import SAE
from scipy import stats

import writesae_lens  # noqa: F401  (registers the bundled release)
from hooked_ssm import HookedSSM
from writesae_lens.interventions.amplification import (
    AmplificationOptions,
    boundary_features,
    run_amplification,
    text_metrics,
)
from writesae_lens.interventions.tokens import token_windows, toy_validation_texts
from writesae_lens.demo import toy_sae_id

pytestmark = pytest.mark.usefixtures("one_thread")
SAE_ID = toy_sae_id(site="write")


@pytest.fixture(scope="module")
def toy():
    model = HookedSSM.from_pretrained("toy-gdn", device="cpu")
    sae = SAE.from_pretrained("writesae-toy-gdn", SAE_ID)
    return model, sae, token_windows(model, toy_validation_texts(), 64, 8)


def test_boundary_features_equal_a_hand_computed_selection(toy):
    model, sae, windows = toy
    options = AmplificationOptions(n_features=5)
    chosen = boundary_features(model, sae, windows, options)
    _, cache = model.run_with_cache(windows, names_filter="blocks.1.mixer.hook_write")
    codes = sae.encode(cache["blocks.1.mixer.hook_write"][:, :, sae.cfg.metadata.hook_head_index].flatten(0, 1)).detach().double()
    texts = model.to_str_tokens(windows.flatten())
    boundary = torch.tensor([t.strip() != "" and t.strip()[-1] in ".!?" for t in texts])
    score = codes[boundary].mean(0) - codes[~boundary].mean(0)
    top = score.topk(5).indices
    assert chosen["features"].tolist() == top.tolist()
    torch.testing.assert_close(chosen["boundary_activation"].double(), codes[boundary].mean(0)[top], rtol=1e-4, atol=1e-7)
    assert set(chosen["alive"].tolist()) == set(torch.nonzero((codes != 0).any(0)).flatten().tolist())


def test_dose_response_table_is_paired_and_matches_scipy(toy):
    model, sae, windows = toy
    options = AmplificationOptions(doses=(0.0, 5.0, 10.0), n_features=5, max_new_tokens=8)
    rows, summary = run_amplification(model, sae, windows[:3, :12], scoring_tokens=windows[3:], options=options,
                                      progress=False)
    cfg = summary["config"]
    assert not set(cfg["random_features"]) & set(cfg["features"]) and len(cfg["random_features"]) == 5
    by = lambda name: sorted((r for r in rows if r["condition"] == name), key=lambda r: r["prompt"])  # noqa: E731
    # offset 0 leaves the model as it is, and every condition samples with the same seed: paired
    assert [r["newlines"] for r in by("amplify 0x")] == [r["newlines"] for r in by("baseline")]
    assert [r["word_length"] for r in by("amplify 0x")] == [r["word_length"] for r in by("baseline")]
    assert {r["condition"] for r in rows} == {"baseline", "amplify 0x", "amplify 5x", "amplify 10x", "random 10x"}
    base = np.array([r["newlines"] for r in by("baseline")])
    table = summary["conditions"]
    for name in ("amplify 5x", "amplify 10x", "random 10x"):
        x = np.array([r["newlines"] for r in by(name)])
        assert table[name]["newlines"] == pytest.approx(x.mean())
        if np.any(x != base):
            assert table[name]["p_raw"] == pytest.approx(stats.ttest_rel(x, base).pvalue)
    tested = [n for n in ("amplify 0x", "amplify 5x", "amplify 10x") if "p_bonferroni" in table[n]]
    for n in tested:
        assert table[n]["p_bonferroni"] == pytest.approx(min(1.0, table[n]["p_raw"] * len(tested)))


def test_text_metrics():
    metrics = text_metrics("one two\n\nthree four five\nsix")
    assert metrics == {"newlines": 3.0, "paragraphs": 2.0, "word_length": pytest.approx(22 / 6)}
