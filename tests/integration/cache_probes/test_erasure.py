"""Cache-slot erasure (AUDIT.md item 8): the target is fixed before the run by the paper's feature
detection on held-out prompts, the control *adds* the atom at non-firing positions, and a dose
sweep is fitted; every measured delta equals a full re-run of the model with the same edit."""

import numpy as np
import pytest
import torch
from scipy import stats

from writesae_lens.interventions.erasure import ErasureOptions, run_erasure
from writesae_lens.interventions.observe import observe_site
from writesae_lens.interventions.sites import resolve_site
from writesae_lens.interventions.protocol import atom_per_unit_code

pytestmark = pytest.mark.usefixtures("one_thread")
FEATURE = 3


@pytest.fixture(scope="module")
def erasure(model, sae, contexts):
    options = ErasureOptions(n=12, control_n=6, dose_n=3, max_detection_firings=1000)
    return run_erasure(model, sae, contexts, feature=FEATURE, options=options, progress=False)


def codes(model, sae, contexts):
    return observe_site(model, contexts, resolve_site(model, sae), sae, logits=False)["codes"][:, :, FEATURE]


def test_target_is_detected_on_held_out_prompts_before_the_run(model, sae, contexts, erasure, rerun_with_write):
    rows, summary = erasure
    detect, evaluate = summary["detection"]["prompts"], summary["config"]["evaluation_prompts"]
    assert detect and evaluate and not set(detect) & set(evaluate)
    target = summary["config"]["target"]
    assert {r["token"] for r in rows} == {target}  # one token, fixed before the trials
    assert {r["prompt"] for r in rows if r["condition"] != "detection"} <= set(evaluate)
    # The paper's detection, by brute force: sum over every detection firing of log p_native - log p_deleted.
    code = codes(model, sae, contexts)
    score = torch.zeros(model.cfg.d_vocab, dtype=torch.float64)
    with torch.no_grad():
        for p in detect:
            native = torch.log_softmax(model(contexts[p][None]).double(), dim=-1)[0]
            for t in range(1, contexts.shape[1] - 1):
                if code[p, t] != 0:
                    score += native[t] - rerun_with_write(model, contexts[p], t, torch.zeros_like)[t].log_softmax(-1)
    assert int(score.argmax()) == target
    assert summary["detection"]["summed_nats"] == pytest.approx(float(score.max()), rel=1e-4)


def test_erasure_and_control_equal_full_reruns(model, sae, contexts, erasure, rerun_with_write):
    rows, summary = erasure
    target, a_star = summary["config"]["target"], summary["config"]["a_star"]
    code = codes(model, sae, contexts)
    fired = code[:, 1:-1][code[:, 1:-1] != 0]  # firings at 1 <= t <= L-2
    assert a_star == pytest.approx(float(np.median(fired.numpy())))
    atom = atom_per_unit_code(sae, FEATURE, model.cfg.d_k, model.cfg.d_v).flatten()
    with torch.no_grad():
        native = {p: torch.log_softmax(model(contexts[p][None]).double(), dim=-1)[0] for p in range(len(contexts))}
    for r in rows:
        p, t = r["prompt"], r["position"]
        if r["condition"] == "firing":
            assert code[p, t] != 0
            edited = rerun_with_write(model, contexts[p], t, torch.zeros_like).log_softmax(-1)
        else:  # the control writes +m a* atom where the feature does not fire
            assert code[p, t] == 0
            edited = rerun_with_write(model, contexts[p], t, lambda w, m=r["dose"]: w + m * a_star * atom).log_softmax(-1)
        assert r["delta_logp"] == pytest.approx(float(edited[t, target] - native[p][t, target]), abs=1e-5)


def test_summary_reports_the_paper_tables_with_scipy(erasure):
    rows, summary = erasure
    firing = np.array([r["delta_logp"] for r in rows if r["condition"] == "firing"])
    assert summary["firing"]["n"] == firing.size and 0 < firing.size <= 12
    assert summary["firing"]["wilcoxon"]["p_value"] == pytest.approx(stats.wilcoxon(firing).pvalue)
    lo, hi = summary["firing"]["median_ci"]
    assert lo <= summary["firing"]["median_delta_logp"] <= hi
    assert sorted(summary["control"]) == [1.0, 2.0, 4.0] and all(c["n"] == 6 for c in summary["control"].values())
    sweep = [r for r in rows if r["condition"] == "dose"]
    assert len(sweep) == 3 * 6
    fit = stats.linregress([r["dose"] for r in sweep], [r["delta_logp"] for r in sweep])
    assert summary["dose_sweep"]["linregress"]["slope"] == pytest.approx(fit.slope)
    assert "erase='write'" in summary["variant"]
