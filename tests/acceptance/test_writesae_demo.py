"""`writesae demo` runs offline on the toy GDN model and its bundled WriteSAE and prints both tables."""

import json
import os
import subprocess
import sys

from writesae_lens.demo import toy_site


def test_writesae_demo_prints_the_headline_tables(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "writesae_lens.cli", "demo", "--windows", "4", "--firings", "40", "--atoms", "4",
         "--json", str(tmp_path / "demo.json")],
        capture_output=True, text=True, env=env, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "Substitution test" in out and "win rate P(KL_atom < KL_delete)" in out
    assert "toy-gdn (toy)" in out and "paper: Qwen3.5-0.8B L1/L9/L17 H4" in out
    assert "Closed-form logit shift" in out and "null baseline" in out
    assert "not a replication" in out and "whole-state ablation KL" in out
    summaries = json.loads((tmp_path / "demo.json").read_text())
    assert summaries["substitution"]["population"]["min_firings_per_atom"] == 5
    assert "fitted_null" in summaries["logit_shift"]["forms"]
    memory = summaries["memory"]
    assert memory["state_ablation_kl"] > 0 and (memory["layer"], memory["head"]) == toy_site("toy-gdn")
    assert memory["linear_response"]["n"] == summaries["substitution"]["n"]
    assert memory["model_metric"]["last"]["n"] == summaries["substitution"]["n"]
    assert "in the model's own metric" in out
    curve = memory["oracle_curve"]
    assert 0 < curve["n"] <= summaries["substitution"]["n"]
    assert len(curve["win_rate"]["last"]) == len(curve["cosines"]) and "median_cos" in curve["atoms"]
    assert set(curve["by_side"]) == {"key", "value"} and "key side only" in out
    assert "oracle rank-1 writes" in out
