"""The register/bundle partition and the ``writesae`` command line."""

import json

import numpy as np
import pytest
import torch

import writesae_lens.saes  # noqa: F401
from hooked_ssm import HookedSSM
from writesae_lens.analysis.partition import atom_write_cosines, partition_atoms, register_bundle_partition
from writesae_lens.cli import SUBCOMMANDS, build_parser, main
from writesae_lens.saes import WriteSAE, WriteSAEConfig

LAYER, HEAD = 1, 2


# Many tiny forwards: on a shared CPU one thread is far faster (fixture in tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


def make_sae(d_k, d_v, d_sae, layer, head, k=4, seed=0):
    torch.manual_seed(seed)
    cfg = WriteSAEConfig(d_in=d_k * d_v, d_sae=d_sae, d_k=d_k, d_v=d_v, k=k)
    cfg.metadata.hook_name, cfg.metadata.hook_head_index = f"blocks.{layer}.mixer.hook_write", head
    return WriteSAE(cfg)


def test_atom_write_cosines_match_the_definition():
    torch.manual_seed(0)
    d_k, d_v = 5, 3
    sae = make_sae(d_k, d_v, 7, LAYER, HEAD, k=2)
    codes = torch.relu(torch.randn(11, 7))
    codes[3] = 0  # a position where nothing fires
    writes = torch.randn(11, d_k * d_v)
    atoms, cos = atom_write_cosines(sae, codes, writes, d_k, d_v)
    u, w = (x.detach() for x in sae.atoms())
    expected = [
        (i, float(torch.outer(u[i], w[i]).flatten() @ writes[n] / writes[n].norm()))
        for n in range(11) for i in range(7) if codes[n, i] > 0
    ]
    got = sorted(zip(atoms.tolist(), cos.tolist()))
    assert len(got) == len(expected)
    for (a, c), (ea, ec) in zip(got, sorted(expected)):
        assert a == ea and c == pytest.approx(ec, abs=1e-6)


def test_partition_atoms_finds_two_classes_only_when_there_are_two():
    rng = np.random.default_rng(0)
    cos = {a: rng.normal(0.3, 0.05, 30) for a in range(20)}  # registers: write-aligned
    cos.update({a: rng.normal(0.01, 0.01, 30) for a in range(20, 60)})  # bundles
    cos.update({a: rng.normal(0.5, 0.1, 2) for a in range(60, 65)})  # too few firings: dead
    rows, summary = partition_atoms(cos, 70, min_firings=5)
    assert summary["partitioned"] and summary["delta_bic"] < -20
    assert {r["atom"] for r in rows if r["cls"] == "register"} == set(range(20))
    assert (summary["alive"], summary["registers"], summary["bundles"], summary["dead"]) == (60, 20, 40, 10)
    rows, summary = partition_atoms({a: rng.normal(0.1, 0.05, 30) for a in range(50)}, 50)
    assert not summary["partitioned"] and summary["registers"] == 0 and summary["bundles"] == 50


def test_partition_end_to_end_picks_write_aligned_atoms(qwen35):
    """Atoms 0-19 are native writes of period-6 prompts (their writes recur), atoms 20-39 random."""
    model = HookedSSM.from_pretrained(qwen35[0])
    hook = f"blocks.{LAYER}.mixer"
    tokens = torch.randint(3, 300, (8, 6), generator=torch.Generator().manual_seed(6)).repeat(1, 6)
    _, cache = model.run_with_cache(tokens, names_filter=[f"{hook}.hook_k", f"{hook}.hook_v"])
    k = cache[f"{hook}.hook_k"][:, 12:18, HEAD].flatten(0, 1)
    v = cache[f"{hook}.hook_v"][:, 12:18, HEAD].flatten(0, 1)
    pick = torch.randperm(k.shape[0], generator=torch.Generator().manual_seed(0))[:20]
    sae = make_sae(model.cfg.d_k, model.cfg.d_v, 40, LAYER, HEAD, k=2)
    with torch.no_grad():
        sae.U_dec[:20] = k[pick] / k[pick].norm(dim=-1, keepdim=True)
        sae.V_dec[:20] = v[pick] / v[pick].norm(dim=-1, keepdim=True)
        sae.A_enc.copy_(sae.U_dec)
        sae.B_enc.copy_(sae.V_dec)
    rows, summary = register_bundle_partition(model, sae, tokens, min_firings=3, min_position=12, progress=False)
    registers = {r["atom"] for r in rows if r["cls"] == "register"}
    assert summary["delta_bic"] < 0 and registers and registers <= set(range(20))
    assert summary["register_mean_cos"] > summary["bundle_mean_cos"] + 0.2
    assert summary["alive"] + summary["dead"] == 40


def test_parser_lists_the_subcommands():
    assert {"substitute", "logit-shift", "steer", "erase", "partition", "demo"} <= set(SUBCOMMANDS)
    args = build_parser().parse_args(["substitute", "--sae", "x"])
    assert args.model == "toy-gdn" and args.scale == "native_norm" and args.score == "last"


def test_cli_substitute_and_partition_on_the_toy_model(tmp_path, capsys):
    model = HookedSSM.from_pretrained("toy-gdn")
    sae_dir = tmp_path / "sae"
    make_sae(model.cfg.d_k, model.cfg.d_v, 16, 1, 1).save_model(sae_dir)
    text = tmp_path / "text.txt"
    text.write_text("def f(x):\n    return x + 1\n\nThe list type supports append and pop. " * 4)
    out = tmp_path / "rows.jsonl"
    common = ["--sae", str(sae_dir), "--text", str(text), "--context-size", "24", "--n-windows", "2", "--quiet"]
    assert main(["substitute", *common, "--max-firings", "5", "--out", str(out), "--json", str(tmp_path / "s.json")]) == 0
    printed = capsys.readouterr().out
    assert "win rate P(KL_atom < KL_delete)" in printed and "92.4%" in printed and "Qwen3.5-0.8B" in printed
    assert "variant: scale=native_norm, atoms=feature" in printed
    written = json.loads((tmp_path / "s.json").read_text())
    assert {"paired_cliffs_delta", "wilcoxon", "win_ci", "population"} <= set(written)
    assert {"alternative", "p_value", "statistic", "method"} <= set(written["wilcoxon"])
    assert {"n_atoms", "min_firings_per_atom", "max_firings_per_atom"} <= set(written["population"])
    rows = [json.loads(line) for line in out.read_text().splitlines()[1:]]  # after the run record
    assert len(rows) == 5 and {"kl_atom", "kl_delete", "kl_random", "atom_wins"} <= set(rows[0])
    summary = json.loads((tmp_path / "rows.jsonl.summary.json").read_text())
    assert summary["n"] == 5 and summary["config"]["layer"] == 1
    assert main(["substitute", *common, "--max-firings", "5", "--out", str(out), "--resume"]) == 0
    assert len(out.read_text().splitlines()) == 1 + 5
    assert main(["partition", *common, "--min-firings", "1", "--no-paper", "--json", str(tmp_path / "p.json")]) == 0
    assert "registers" in capsys.readouterr().out
    assert "delta_bic" in json.loads((tmp_path / "p.json").read_text())


def test_every_subcommand_takes_json():
    for name in SUBCOMMANDS:
        args = ["--sae", "x"] if name in ("substitute", "logit-shift", "erase", "amplify", "partition", "dashboard") else []
        args += ["--atom", "0"] if name == "erase" else []
        args += ["--out", "site"] if name == "dashboard" else []
        assert build_parser().parse_args([name, *args, "--json", "s.json"]).json == "s.json"


def test_cli_oracle_curve_with_and_without_an_sae(tmp_path, capsys):
    model = HookedSSM.from_pretrained("toy-gdn")
    sae_dir = tmp_path / "sae"
    make_sae(model.cfg.d_k, model.cfg.d_v, 16, 1, 1).save_model(sae_dir)
    text = tmp_path / "text.txt"
    text.write_text("def f(x):\n    return x + 1\n\nThe list type supports append and pop. " * 4)
    common = ["--text", str(text), "--context-size", "24", "--n-windows", "2", "--quiet", "--cosines", "0.5", "1.0"]
    assert main(["oracle", *common, "--layer", "1", "--head", "1", "--positions-per-window", "3",
                 "--json", str(tmp_path / "o.json")]) == 0
    assert "win rate against deletion" in capsys.readouterr().out
    curve = json.loads((tmp_path / "o.json").read_text())
    assert curve["cosines"] == [0.5, 1.0] and curve["side"] == "both" and 0 < curve["n"] <= 6
    assert curve["win_rate"]["next"][1] == 1.0  # c = 1 is the native write itself
    assert main(["oracle", *common, "--sae", str(sae_dir), "--side", "key", "--json", str(tmp_path / "a.json")]) == 0
    assert "this SAE's atoms: median cosine" in capsys.readouterr().out
    with_sae = json.loads((tmp_path / "a.json").read_text())
    assert with_sae["side"] == "key" and "median_cos" in with_sae["atoms"]
