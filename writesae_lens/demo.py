"""``writesae demo``: the paper's headline checks on the bundled toy GDN model and its WriteSAE.

Loads ``toy-gdn`` (or ``--model``, another bundled toy) and its bundled release
``writesae-<model>`` at the head that release was trained on (the head whose memory the model
relies on most, recorded in the release's ``head_choice.json``; or, with ``--train``, trains a
fresh WriteSAE there through SAELens's runner first), then on held-out windows of the toy's data (the
validation split: corpus text and synthetic memory tasks, alternating, as the toy was trained) runs

1. the substitution test with the paper's defaults (feature i's own atom at its firings, >= 5
   and <= 30 firings per feature, a silent feature's atom as the random control, KL at the window's
   end with t+1 beside it),
2. the memory diagnostics (whole-state ablation KL of the head, median KL per condition, the
   firing atoms' cosine to the native writes against the linear-response prediction), and
3. the closed-form logit-shift audit (gate / jvp forms, then the fitted form beside its null
   baseline; R^2 per (atom, eps) cell),

and prints the tables beside the paper's numbers, naming which column is the toy and which is
Qwen3.5-0.8B (and at which layers). ``--json PATH`` writes the summaries (``substitution``,
``memory``, ``logit_shift``). The toy model has about a million parameters, trained for minutes on
a CPU: its numbers test the machinery, they are not a replication.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

RELEASES = Path(__file__).resolve().parent / "releases"
TOY_MODELS = ("toy-gdn", "toy-mamba2", "toy-rwkv7")


def toy_release(model: str = "toy-gdn") -> str:
    """The bundled WriteSAE release of toy model ``model``."""
    return f"writesae-{model}"


def toy_site(model: str = "toy-gdn") -> tuple[int, int]:
    """``(layer, head)`` of the bundled release of ``model`` (its ``head_choice.json``)."""
    path = RELEASES / toy_release(model) / "head_choice.json"
    if not path.exists():
        raise FileNotFoundError(f"{model} has no bundled WriteSAE release ({path} is missing); "
                                "train one with scripts/train_toy_saes.py --model {model}.")
    choice = json.loads(path.read_text())
    return int(choice["layer"]), int(choice["head"])


def toy_sae_id(model: str = "toy-gdn", site: str = "state") -> str:
    """The id of the bundled ``hook_{site}`` WriteSAE of ``model``, e.g. ``blocks.1.mixer.hook_state.h1``."""
    layer, head = toy_site(model)
    return f"blocks.{layer}.mixer.hook_{site}.h{head}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", choices=TOY_MODELS, default="toy-gdn", help="the bundled toy model")
    parser.add_argument("--train", action="store_true", help="retrain the WriteSAE through SAELens first")
    parser.add_argument("--train-tokens", type=int, default=51_200, help="tokens for --train")
    parser.add_argument("--site", choices=["state", "write"], default="state")
    parser.add_argument("--windows", type=int, default=24, help="held-out windows of --length tokens")
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--firings", type=int, default=520, help="firings for the substitution test (whole features, "
                        ">= 5 and <= 30 firings each)")
    parser.add_argument("--atoms", type=int, default=12, help="atoms for the logit-shift audit")
    parser.add_argument("--seed", type=int, default=0)


def corpus_windows(model, split: str, length: int, limit: int | None = None) -> torch.Tensor:
    """Toy-corpus documents of ``split``, tokenized, joined with BOS and cut into ``length``-token rows."""
    from hooked_ssm.pretrained.toy.corpus import iter_documents

    ids: list[int] = []
    for doc in iter_documents(split):
        ids += [model.tokenizer.bos_token_id, *model.tokenizer(doc, add_special_tokens=False)["input_ids"]]
        if limit is not None and len(ids) >= limit * length:
            break
    rows = torch.tensor(ids[: len(ids) // length * length]).view(-1, length)
    return rows if limit is None else rows[:limit]


def load_or_train_sae(model, args: argparse.Namespace):
    from sae_lens import SAE

    layer, head = toy_site(args.model)
    if not args.train:
        return SAE.from_pretrained(toy_release(args.model), toy_sae_id(args.model, args.site))
    from datasets import Dataset

    from hooked_ssm.pretrained.toy.data import mixed_windows, text_windows
    from writesae_lens.training import build_runner

    rows = mixed_windows("train", 128, 2 * len(text_windows("train", 128)))
    runner = build_runner(
        model, Dataset.from_dict({"input_ids": rows.tolist()}), layer, head, args.site, architecture="writesae",
        d_sae=512, k=16, training_tokens=args.train_tokens, context_size=128, lr=1e-3,
        output_path=tempfile.mkdtemp(prefix="writesae-demo-"),
    )
    print(f"Training a WriteSAE on {runner.cfg.hook_name} head {head} through SAELens ({args.train_tokens:,} tokens)...")
    return runner.run().eval()


def run(args: argparse.Namespace) -> int:
    import writesae_lens  # noqa: F401  (registers architectures and the bundled releases)
    from hooked_ssm import HookedSSM
    from writesae_lens.analysis import PAPER_LOGIT_SHIFT, PAPER_SUBSTITUTION
    from writesae_lens.analysis.report import format_logit_shift_table, format_summary_table
    from writesae_lens.interventions.logit_shift import run_logit_shift_audit
    from writesae_lens.interventions.substitution import run_substitution_test
    from hooked_ssm.pretrained.toy.data import mixed_windows
    from writesae_lens.analysis.diagnostics import format_diagnostics, memory_diagnostics

    torch.manual_seed(args.seed)
    start = time.time()
    model = HookedSSM.from_pretrained(args.model, device="cpu")
    sae = load_or_train_sae(model, args)
    layer, head = toy_site(args.model)
    tokens = mixed_windows("validation", args.length, args.windows)
    print(f"{args.model}, WriteSAE on blocks.{layer}.mixer.hook_{args.site} head {head}: {sae.cfg.d_sae} atoms, "
          f"k={sae.cfg.k}; held-out text: {tokens.shape[0]} windows x {tokens.shape[1]} tokens\n")

    with torch.no_grad():
        rows, summary = run_substitution_test(
            model, sae, layer, head, tokens, max_firings=args.firings, seed=args.seed, progress=True
        )
    summary["config"]["model"] = f"{args.model} (toy)"
    print(format_summary_table(summary, paper=PAPER_SUBSTITUTION,
                               title="Substitution test: the toy GDN (this run) beside the paper's Qwen3.5-0.8B"))
    with torch.no_grad():
        diagnostics = memory_diagnostics(model, sae, tokens, rows, seed=args.seed)
    print()
    print(format_diagnostics(diagnostics))
    _, shift_summary = run_logit_shift_audit(
        model, sae, layer, head, tokens, n_atoms=args.atoms, seed=args.seed, progress=True
    )
    shift_summary["config"]["model"] = f"{args.model} (toy)"
    print()
    print(format_logit_shift_table(shift_summary, paper=PAPER_LOGIT_SHIFT,
                                   title="Closed-form logit shift: R^2 against measured shifts, toy GDN beside the paper"))
    if getattr(args, "json", None):
        from writesae_lens.cli import write_summary_json

        write_summary_json(args.json, {"substitution": summary, "memory": diagnostics, "logit_shift": shift_summary})
    n_params = sum(p.numel() for p in model.parameters())
    print(f"\nToy-model numbers ({n_params / 1e6:.1f}M parameters, minutes of training) test the machinery; they are not a "
          f"replication of the paper. Total {time.time() - start:.0f} s.")
    return 0


def main(argv: list[str] | None = None) -> int:
    from writesae_lens.cli import add_json_argument

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    add_json_argument(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
