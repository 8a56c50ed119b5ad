#!/usr/bin/env python
"""The three numbers a toy model's cards report (issue 17), with the demo's protocol unchanged.

    python scripts/toy_memory_numbers.py --model toy-mamba2 [--json out.json]

Loads the bundled toy ``--model`` and its release ``writesae-<model>``, takes the (layer, head) the
release was trained at from its ``head_choice.json`` (chosen by whole-state ablation KL, never by an
SAE), and runs what ``writesae demo`` runs on the same held-out windows (the validation mixture,
24 windows x 128 tokens, at most 520 firings, seed 0):

1. the substitution test with the paper's defaults (``run_substitution_test``): the atom's win rate
   over deletion with its Wilson 95% interval and n, and the strict-chain rate;
2. the memory diagnostics (``memory_diagnostics``): the whole-state ablation KL at the head, the
   median KL per condition, the linear-response table and the model-metric decomposition.

It prints both reports and, with ``--json``, writes ``{"substitution", "memory"}``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import writesae_lens  # noqa: F401  (registers the architectures and the bundled releases)
from hooked_ssm import HookedSSM
from hooked_ssm.pretrained.toy.data import mixed_windows
from writesae_lens.analysis import PAPER_SUBSTITUTION
from writesae_lens.analysis.diagnostics import format_diagnostics, memory_diagnostics
from writesae_lens.analysis.report import format_summary_table
from writesae_lens.cli import write_summary_json
from writesae_lens.interventions.substitution import run_substitution_test

RELEASES = Path(writesae_lens.__file__).parent / "releases"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a bundled toy, e.g. toy-mamba2")
    parser.add_argument("--site", choices=["state", "write"], default="state")
    parser.add_argument("--json", default=None, metavar="PATH")
    args = parser.parse_args(argv)

    release = f"writesae-{args.model}"
    choice = json.loads((RELEASES / release / "head_choice.json").read_text())
    layer, head = choice["layer"], choice["head"]
    torch.manual_seed(0)
    start = time.time()
    model = HookedSSM.from_pretrained(args.model, device="cpu")
    from sae_lens import SAE

    sae = SAE.from_pretrained(release, f"blocks.{layer}.mixer.hook_{args.site}.h{head}")
    tokens = mixed_windows("validation", 128, 24)
    with torch.no_grad():
        rows, summary = run_substitution_test(model, sae, layer, head, tokens, max_firings=520, seed=0, progress=True)
        diagnostics = memory_diagnostics(model, sae, tokens, rows, seed=0)
    summary["config"]["model"] = f"{args.model} (toy)"
    print(format_summary_table(summary, paper=PAPER_SUBSTITUTION,
                               title=f"Substitution test: {args.model} layer {layer} head {head} beside the paper"))
    print()
    print(format_diagnostics(diagnostics))
    write_summary_json(args.json, {"substitution": summary, "memory": diagnostics})
    print(f"Total {time.time() - start:.0f} s.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
