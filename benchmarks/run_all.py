"""Run the benchmark suite; write a JSON results file and print a markdown table.

    python benchmarks/run_all.py [--quick] [--device cpu|cuda] [--out benchmarks/results/<name>.json]
                                 [--threads N] [--only forward,hooks,generate,sae,substitution]

Not part of the test run (plain scripts, no pytest). See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path

BENCHES = ["forward", "hooks", "generate", "sae", "substitution", "rwkv7"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small grids (CPU: real shapes with 4 layers)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", type=Path, default=None, help="JSON results file (default benchmarks/results/<device>[-quick].json)")
    parser.add_argument("--threads", type=int, default=None,
                        help="intra-op threads (sets OMP_NUM_THREADS and torch.set_num_threads; default 1 on CPU: the 2 shared cores are busy and OpenMP barriers stall under contention)")
    parser.add_argument("--only", default=",".join(BENCHES), help=f"comma-separated subset of {BENCHES}")
    parser.add_argument("--budget", type=float, default=None, help="seconds of timed rounds per comparison")
    parser.add_argument("--deadline", type=float, default=None,
                        help="stop starting new comparisons after this many seconds (results so far are kept)")
    args = parser.parse_args(argv)

    threads = args.threads or (1 if args.device == "cpu" else None)
    if threads:
        os.environ["OMP_NUM_THREADS"] = str(threads)
        os.environ["MKL_NUM_THREADS"] = str(threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import torch  # after OMP_NUM_THREADS

    if threads:
        torch.set_num_threads(threads)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import ROOT, DeadlineReached, Settings, markdown_table

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False")
    if args.out is None:
        args.out = ROOT / "benchmarks" / "results" / f"{args.device}{'-quick' if args.quick else ''}.json"
    budget = args.budget if args.budget is not None else (4.0 if args.device == "cuda" else (8.0 if args.quick else 20.0))
    only = [b.strip() for b in args.only.split(",") if b.strip()]
    unknown = set(only) - set(BENCHES)
    if unknown:
        parser.error(f"unknown benchmarks {sorted(unknown)}; choose from {BENCHES}")
    settings = Settings(device=args.device, quick=args.quick, threads=threads, budget_s=budget, out=args.out, only=only,
                        deadline_s=args.deadline)
    torch.set_grad_enabled(True)
    for name in only:
        start = time.time()
        if args.deadline is not None and start - settings.started > args.deadline:
            settings.note(f"{name}: skipped, --deadline {args.deadline:.0f} s reached")
            continue
        print(f"== {name}", flush=True)
        from common import code_fingerprint

        settings.fingerprints[name] = code_fingerprint()
        module = __import__(f"bench_{name}")
        try:
            module.run(settings)
        except DeadlineReached as err:
            settings.note(f"{name}: stopped early, {err}")
        except Exception as err:  # noqa: BLE001 - one failing benchmark must not lose the others
            traceback.print_exc()
            settings.note(f"{name}: failed with {err!r}")
        print(f"   ({time.time() - start:.0f} s)", flush=True)
    settings.save()
    print()
    print(markdown_table(settings.results))
    if settings.notes:
        print()
        for note in settings.notes:
            print(f"- {note}")
    print(f"\nresults: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
