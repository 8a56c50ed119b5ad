"""Fault catalogue, command line (``writesae``): every bad argument, file or resume prints one clear
line naming the problem and the fix, exits non-zero, and shows no traceback unless ``--debug``.
Plus the guarantees of results files: a record of what made them, whole rows, and a killed run
that resumes to the summary of an uninterrupted one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from writesae_lens.cli import main
from writesae_lens.loading import load_sae
from writesae_lens.demo import toy_sae_id, toy_site

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[2]
SAE = "writesae-toy-gdn/" + toy_sae_id(site="write")
SMALL = ["--n-windows", "3", "--context-size", "32", "--batch-size", "2", "--quiet", "--no-paper"]


def substitute(*extra: str) -> list[str]:
    return ["substitute", "--sae", SAE, *SMALL, "--max-firings", "12", *extra]


@pytest.fixture(scope="module")
def truncated_sae(tmp_path_factory):
    folder = tmp_path_factory.mktemp("truncated_sae")
    load_sae(SAE).save_model(folder)
    weights = folder / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    return str(folder)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "rows.jsonl"
    assert main(substitute("--out", str(out))) == 0
    return out


USAGE_ERRORS = [  # argparse: usage line + one error line, exit status 2
    ("non-integer --t0", ["logit-shift", "--sae", SAE, "--t0", "abc"], ["--t0", "expected 'firing' or an integer position", "'abc'"]),
    ("negative --t0", ["logit-shift", "--sae", SAE, "--t0", "-3"], ["--t0", "a position is >= 0"]),
    ("non-integer --layer", ["substitute", "--sae", SAE, "--layer", "one"], ["--layer", "invalid int value: 'one'"]),
    ("bad --target", ["erase", "--sae", SAE, "--atom", "1", "--target", "up"], ["--target", "'detected' or a token id"]),
    ("bad --scale choice", ["substitute", "--sae", SAE, "--scale", "big"], ["--scale", "invalid choice: 'big'"]),
    ("unknown subcommand", ["substitue"], ["invalid choice: 'substitue'"]),
    ("missing --sae", ["substitute"], ["the following arguments are required: --sae"]),
]


@pytest.mark.parametrize("argv, fragments", [c[1:] for c in USAGE_ERRORS], ids=[c[0] for c in USAGE_ERRORS])
def test_bad_argument_is_a_usage_error(argv, fragments, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in: {err}"
    assert "Traceback" not in err


RUN_ERRORS = [  # the run itself fails: one line, exit status 1
    ("release without an id", lambda d: ["substitute", "--sae", "writesae-toy-gdn", *SMALL],
     ["holds SAEs under ids", toy_sae_id(site="write"), "--sae-id"]),
    ("release with an unknown id", lambda d: ["substitute", "--sae", "writesae-toy-gdn/nope", *SMALL],
     ["has no SAE 'nope'", "its ids are"]),
    ("SAE directory that does not exist", lambda d: ["substitute", "--sae", "no/such/dir", *SMALL],
     ["neither an existing directory nor a known release"]),
    ("truncated SAE weights", lambda d: ["substitute", "--sae", d["truncated"], *SMALL],
     ["sae_weights.safetensors", "not a readable safetensors file", "re-save or re-download"]),
    ("bundled model misspelled", lambda d: ["substitute", "--sae", SAE, "--model", "toy-gdm", *SMALL],
     ["'toy-gdm'", "toy-gdn, toy-mamba2, toy-rwkv7", "Did you mean 'toy-gdn'?"]),
    ("unknown --dtype", lambda d: ["substitute", "--sae", SAE, "--dtype", "float33", *SMALL],
     ["Unknown dtype 'float33'", "bfloat16"]),
    ("atom out of range", lambda d: ["erase", "--sae", SAE, "--atom", "512", *SMALL],
     ["feature 512 out of range", "indices 0..511"]),
    ("resume with another seed", lambda d: substitute("--out", str(d["finished"]), "--resume", "--seed", "1"),
     ["Cannot resume", "would mix two runs", "seed: file has 0, this run has 1", "--seed", "Use another --out file"]),
    ("resume with another SAE", lambda d: [*substitute("--out", str(d["finished"]), "--resume")[:2],
                                           "writesae-toy-gdn/" + toy_sae_id(site="state"),
                                           *substitute("--out", str(d["finished"]), "--resume")[3:]],
     ["Cannot resume", "sae.weights_sha256", "sae.hook_name: file has 'blocks.1.mixer.hook_write'"]),
    ("resume a file without a run record", lambda d: substitute("--out", str(d["legacy"]), "--resume"),
     ["has no run record", "Use another --out file"]),
]


@pytest.mark.parametrize("make_argv, fragments", [c[1:] for c in RUN_ERRORS], ids=[c[0] for c in RUN_ERRORS])
def test_failed_run_prints_one_line(make_argv, fragments, truncated_sae, finished_run, tmp_path, capsys):
    legacy = tmp_path / "legacy.jsonl"
    legacy.write_text('{"prompt": 0, "position": 3, "layer": 1, "head": 0}\n')
    before = finished_run.read_bytes()
    code = main(make_argv({"truncated": truncated_sae, "finished": finished_run, "legacy": legacy}))
    err = capsys.readouterr().err
    assert code == 1
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("writesae ") and "error:" in lines[0], err
    assert "Traceback" not in err and "--debug" in err
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in: {err}"
    assert finished_run.read_bytes() == before  # a refused resume leaves the file alone


def test_debug_shows_the_traceback():
    with pytest.raises(ValueError, match="holds SAEs under ids"):
        main(["--debug", "substitute", "--sae", "writesae-toy-gdn", *SMALL])


def test_results_file_records_what_made_it(finished_run):
    header = json.loads(finished_run.read_text().splitlines()[0])["_run"]
    assert header["protocol"] == "substitution" and header["model"]["name"] == "toy-gdn"
    assert header["sae"]["hook_name"] == "blocks.1.mixer.hook_write" and len(header["sae"]["weights_sha256"]) == 64
    layer, head = toy_site("toy-gdn")
    assert header["site"] == {"layer": layer, "head": head, "kind": "write"} and header["seed"] == 0
    assert header["settings"]["--max-firings"] == 12 and header["versions"]["writesae_lens"]
    summary = json.loads(finished_run.with_name(finished_run.name + ".summary.json").read_text())
    assert summary["run"] == header


def test_help_loads_no_torch():
    """``writesae --help`` parses arguments without importing torch, transformers or sae_lens."""
    code = ("import sys, writesae_cli\n"
            "try:\n    writesae_cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('torch', 'sae_lens', 'transformers', 'writesae_lens') if m in sys.modules]\n"
            "print('HEAVY', heavy)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert "usage: writesae" in result.stdout and "HEAVY []" in result.stdout, result.stdout + result.stderr


def _summary(out: Path) -> dict:
    summary = json.loads(out.with_name(out.name + ".summary.json").read_text())
    summary.pop("run")  # compared separately: the same record
    return summary


def _assert_close(a, b, path="summary"):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            _assert_close(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_close(x, y, f"{path}[{i}]")
    elif isinstance(a, float):
        assert b == pytest.approx(a, rel=1e-4, abs=1e-6), path
    else:
        assert a == b, path


# The killed run: `writesae` with a pause after each appended row, so that the kill (at any moment
# of a pause) lands mid-run however fast the toy run is and however loaded the machine is.
SLOW_APPENDS = """
import sys, time
from writesae_lens.run_record import ResultsFile
append = ResultsFile.append
ResultsFile.append = lambda self, rows: (append(self, rows), time.sleep(0.5))[0]
import writesae_cli
sys.exit(writesae_cli.main(sys.argv[1:]))
"""


def test_killed_run_resumes_to_the_uninterrupted_summary(finished_run, tmp_path):
    """SIGKILL a run mid-way: every line left is a whole row; --resume finishes it; the summary
    equals the uninterrupted run's (same rows, same record)."""
    out = tmp_path / "killed.jsonl"
    argv = [sys.executable, "-c", SLOW_APPENDS, *substitute("--out", str(out))]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if out.exists() and out.read_text().count("\n") >= 3:  # the record and two rows
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    lines = out.read_text().splitlines()
    assert 2 <= len(lines) < len(finished_run.read_text().splitlines()), "the run was not interrupted mid-way"
    for line in lines:
        json.loads(line)  # whole rows only

    assert main(substitute("--out", str(out), "--resume")) == 0
    rows = lambda path: sorted(path.read_text().splitlines()[1:], key=lambda r: json.loads(r)["position"] + 1000 * json.loads(r)["prompt"])  # noqa: E731
    assert len(rows(out)) == len(rows(finished_run))
    assert out.read_text().splitlines()[0] == finished_run.read_text().splitlines()[0]  # the same record
    _assert_close(_summary(out), _summary(finished_run))
