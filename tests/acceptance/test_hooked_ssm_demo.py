"""The README's main job runs offline on the bundled toy model and shows an exact, causal write edit."""

import os
import re
import subprocess
import sys


def test_demo_runs_offline_on_the_toy_model():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "hooked_ssm.demo"], capture_output=True, text=True, env=env, timeout=600, check=True
    )
    out = result.stdout
    assert "Loaded toy-gdn" in out and "every write has matrix rank [1]" in out
    before = float(re.search(r"max \|logit shift\| before it: (\S+);", out).group(1))
    after = float(re.search(r"at and after it: (\S+)", out).group(1))
    assert before == 0.0 and after > 0.0
    assert "Greedy continuation" in out
