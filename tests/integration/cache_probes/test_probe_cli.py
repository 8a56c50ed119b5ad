"""`writesae steer`, `writesae erase` and `writesae amplify` on the toy GDN and its bundled SAE:
each prints its table beside the paper's column, states its variant and writes its summary."""

import json

import pytest

from safetensors.torch import load_file

from writesae_lens.cli import main
from writesae_lens.demo import RELEASES, toy_release, toy_sae_id

pytestmark = pytest.mark.usefixtures("one_thread")
SAE = "writesae-toy-gdn/" + toy_sae_id(site="write")
COMMON = ["--sae", SAE, "--quiet", "--context-size", "16"]


def most_frequent_feature() -> int:
    """The bundled write SAE's densest feature (its SAELens sparsity file): it fires on any few windows."""
    sparsity = load_file(str(RELEASES / toy_release() / toy_sae_id(site="write") / "sparsity.safetensors"))["sparsity"]
    return int(sparsity.argmax())


def run(capsys, tmp_path, *argv):
    out = tmp_path / f"{argv[0]}.json"
    assert main([*argv, *COMMON, "--json", str(out)]) == 0
    return capsys.readouterr().out, json.loads(out.read_text())


def test_steer_erase_amplify(capsys, tmp_path):
    printed, summary = run(capsys, tmp_path, "steer", "--n-windows", "2", "--max-new-tokens", "3", "--multipliers", "3",
                           "--strata", "mid", "semantic", "--sign-trials", "10")
    assert "variant: multipliers=(3.0,), norm='kv'" in printed and "paper (Qwen3.5-0.8B L9 H4)" in printed
    assert "100.0% (native 33.3%" in printed and "84.6%" in printed and "key='atom'" in printed
    assert summary["installs"]["config"]["starts"] == [9, 10, 11, 12, 13] and summary["sign_prediction"]["n"] == 10

    printed, summary = run(capsys, tmp_path, "erase", "--n-windows", "8", "--feature", str(most_frequent_feature()), "--n", "5",
                           "--control-n", "3", "--dose-n", "2")
    assert "variant: erase='write'" in printed and "-0.116" in printed and "m=4" in printed
    assert summary["firing"]["n"] == 5 and len(summary["dose_sweep"]["median_by_dose"]) == 6

    printed, summary = run(capsys, tmp_path, "amplify", "--n-windows", "6", "--n-prompts", "2", "--prompt-length", "8",
                           "--max-new-tokens", "4", "--n-features", "3")
    assert "random 10x" in printed and "11.2 [8.6, 13.9]" in printed
    assert set(summary["conditions"]) == {"baseline", "amplify 1x", "amplify 2x", "amplify 5x", "amplify 10x", "random 10x"}
