"""`writesae demo` runs offline on the toy GDN model and its bundled WriteSAE and prints both tables."""

import os
import subprocess
import sys


def test_writesae_demo_prints_the_headline_tables():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "writesae_lens.cli", "demo", "--windows", "4", "--firings", "40", "--atoms", "4"],
        capture_output=True, text=True, env=env, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "Substitution test" in out and "atom beats delete" in out
    assert "Closed-form logit shift" in out
    assert "not a replication" in out
