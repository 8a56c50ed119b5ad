"""``writesae dashboard``: the atom dashboard of one SAE as a static site.

    writesae dashboard --sae writesae-toy-gdn/blocks.1.mixer.hook_write.h1 --out site/
    writesae dashboard --model M --sae RELEASE/ID --out DIR [--text FILE ...] [--substitution rows.jsonl]

Registered by ``writesae_lens.cli``, which imports this module only when ``dashboard`` runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="toy-gdn", help="bundled toy name, checkpoint directory or Hub id (default: toy-gdn)")
    p.add_argument("--sae", required=True, help="SAE directory (cfg.json + sae_weights.safetensors) or release/sae_id")
    p.add_argument("--sae-id", default=None, help="SAE id within the release given by --sae")
    p.add_argument("--out", required=True, help="output folder of the site (index.html, atoms/, data.json, neuronpedia/)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--text", nargs="*", default=None, help="text files (default: the toy corpus validation split)")
    p.add_argument("--context-size", type=int, default=128)
    p.add_argument("--n-windows", type=int, default=None, help="windows of the corpus to use (default: all)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--substitution", default=None, help="a substitution run's rows (JSONL of `writesae substitute --out`)")
    p.add_argument("--n-contexts", type=int, default=8, help="top-activating and top-read contexts per atom")
    p.add_argument("--min-firings", type=int, default=5, help="firings for an atom to be listed (alive)")
    p.add_argument("--cache-dir", default=None, help="default: OUT/.cache")
    p.add_argument("--no-neuronpedia", action="store_true", help="skip the Neuronpedia batch files")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    from writesae_lens.cli import add_json_argument

    add_json_argument(p)


def run(args: argparse.Namespace) -> int:
    from writesae_lens.cli import load_model, load_sae
    from writesae_lens.dashboard.build import build_dashboard
    from writesae_lens.dashboard.data import DashboardConfig
    from writesae_lens.interventions.tokens import toy_validation_texts

    model = load_model(args.model, args.device, args.dtype)
    sae = load_sae(args.sae, args.sae_id, str(model.cfg.device))
    if args.text:
        texts = (Path(p).read_text(encoding="utf-8") for p in args.text)  # read one file at a time
    else:
        texts = iter(toy_validation_texts())
    config = DashboardConfig(n_contexts=args.n_contexts, min_firings=args.min_firings, batch_size=args.batch_size)
    data = build_dashboard(model, sae, texts, args.out, args.substitution, context_size=args.context_size,
                           max_windows=args.n_windows, config=config, cache_dir=args.cache_dir,
                           neuronpedia=not args.no_neuronpedia, progress=not args.quiet)
    meta = data["meta"]
    from writesae_lens.cli import write_summary_json

    write_summary_json(args.json, meta)
    print(f"{meta['n_alive']} alive atoms of {meta['d_sae']} ({meta['n_tokens']} tokens) -> {Path(args.out) / 'index.html'}")
    return 0

