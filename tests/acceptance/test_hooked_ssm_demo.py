"""The hook tour runs offline on every bundled toy model and shows an exact, causal write edit."""

import os
import re
import subprocess
import sys

import pytest


@pytest.mark.parametrize("model", ["toy-gdn", "toy-mamba2", "toy-rwkv7"])
def test_demo_runs_offline_on_the_toy_model(model):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "hooked_ssm.demo", "--model", model], capture_output=True, text=True, env=env, timeout=600, check=True
    )
    out = result.stdout
    assert f"Loaded {model}" in out and "every write has matrix rank [1]" in out
    before = float(re.search(r"max \|logit shift\| before it: (\S+);", out).group(1))
    after = float(re.search(r"at and after it: (\S+)", out).group(1))
    assert before == 0.0 and after > 0.0
    assert "Greedy continuation" in out
