"""Single-position sign prediction (AUDIT.md item 9): the key side of the written direction is the
atom's own key factor u_i; every measured logit change equals a full re-run with that write, and
under the linearised read the closed form's sign and size are exact."""

import numpy as np
import pytest
import torch
from scipy import stats

from writesae_lens.interventions.atoms import unit_factors
from writesae_lens.interventions.observe import observe_site
from writesae_lens.interventions.sites import resolve_site
from writesae_lens.interventions.sign_prediction import SignPredictionOptions, run_sign_prediction, target_directions

pytestmark = pytest.mark.usefixtures("one_thread")
OPTIONS = SignPredictionOptions(n_trials=12, min_firings=2, magnitude=2.0)


def test_writes_the_atoms_key_factor_and_matches_full_reruns(model, sae, contexts, rerun_with_write):
    rows, summary = run_sign_prediction(model, sae, contexts, options=OPTIONS, progress=False)
    assert summary["n"] == len(rows) == 12 and "key='atom'" in summary["variant"]
    seen = observe_site(model, contexts, resolve_site(model, sae), sae, leaves=("hook_q",))
    for r in rows:
        p, t, target = r["prompt"], r["position"], r["target"]
        assert seen["codes"][p, t, r["feature"]] != 0  # t0 is a firing of the feature
        u, _ = unit_factors(sae, torch.tensor([r["feature"]]))
        w = target_directions(model, 0, 1, torch.tensor([target]))[0]
        s = OPTIONS.magnitude * float(seen["write_norm"][p, t])
        write = s * torch.outer(u[0].detach(), w).flatten()
        with torch.no_grad():
            edited = rerun_with_write(model, contexts[p], t, lambda x: x + write)
            native = model(contexts[p][None]).double()[0]
        measured = float(edited[t, target] - native[t, target])
        assert r["measured"] == pytest.approx(measured, abs=1e-5)
        assert r["u_dot_q"] == pytest.approx(float(u[0] @ seen["hook_q"][p, t].float()), abs=1e-5)


def test_sign_is_exact_under_the_linearised_read(model, sae, contexts, linearised):
    with linearised():
        rows, summary = run_sign_prediction(model, sae, contexts, options=OPTIONS, progress=False)
    assert summary["sign_accuracy"] == 1.0
    np.testing.assert_allclose([r["measured"] for r in rows], [r["predicted"] for r in rows], rtol=1e-3, atol=1e-6)
    pred, meas = [r["predicted"] for r in rows], [r["measured"] for r in rows]
    assert summary["pearson_r"] == pytest.approx(stats.pearsonr(pred, meas).statistic)
    lo, hi = stats.binomtest(12, 12).proportion_ci(method="wilson")
    assert summary["sign_ci"] == pytest.approx((lo, hi))

