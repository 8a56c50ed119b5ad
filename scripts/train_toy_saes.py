"""Train the WriteSAE release bundled for a toy model, and SAELens's flat TopK SAE beside it.

    python scripts/train_toy_saes.py [--model toy-gdn] [--layer L] [--head memory|H] [--epochs 20] [--device cuda]

The head: by default (``--head memory``) the head of ``--layer`` (default: the last layer) whose
memory the model relies on most, i.e. the largest median whole-state ablation KL at the window's end
(``writesae_lens.analysis.diagnostics.state_ablation_kl`` on validation windows: the position the
substitution test scores). The choice reads only the model, never an SAE or a win rate, and the
card records every head's value.

For each site (``hook_state`` and ``hook_write`` of that head) it trains, through SAELens's runner
with the paper's recipe (``writesae_lens.training.build_runner``: a fixed set of the head's inputs
cast to bf16, split 80/20 with seed 42, ``--epochs`` epochs through SAELens's cached store, atoms
re-normalised and dead ones resampled on the recipe's schedule) on the toy's training mixture
(corpus text and synthetic memory tasks, ``hooked_ssm.pretrained.toy.data``), a ``writesae``
(bilinear encoder, rank-1 decoder) and SAELens's flat ``topk`` SAE with the same atoms, k, inputs and
schedule (the paper's reference, App. C Table 7). Each is scored on held-out windows of the
validation split: FVU, MSE, L0 and the fraction of atoms that never fire, at its periodic
checkpoints and at the end, so the card shows whether held-out loss had stopped improving.

The WriteSAEs are saved in SAELens's format under ``--out/blocks.{layer}.mixer.hook_{site}.h{head}``;
the flat SAEs are scored only (they are 16x larger). ``training_report.json`` and ``README.md``
(the release card) are written beside them.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch
from datasets import Dataset
from sae_lens import SAE

import writesae_lens  # noqa: F401  (registers the WriteSAE architectures)
from hooked_ssm import HookedSSM
from hooked_ssm.pretrained.toy.data import mixed_windows, text_windows
from writesae_lens.analysis.diagnostics import state_ablation_kl
from writesae_lens.recipe import TrainingRecipe
from writesae_lens.training import build_runner

RELEASES = Path(__file__).resolve().parents[1] / "writesae_lens" / "releases"
SITES = ("state", "write")
ARCHITECTURES = ("writesae", "topk")  # ours, and SAELens's flat reference
ACTIVATION_SCALER_FILE = "activation_scaler.json"


@torch.no_grad()
def site_activations(model: HookedSSM, layer: int, head: int, site: str, tokens: torch.Tensor) -> torch.Tensor:
    """``[tokens, d_k*d_v]``: the head's ``hook_{site}`` on ``tokens``, flattened."""
    hook = f"blocks.{layer}.mixer.hook_{site}"
    _, cache = model.run_with_cache(tokens, names_filter=hook)
    return cache[hook][:, :, head].flatten(0, 1).float()


def memory_head(model: HookedSSM, layer: int, windows: int = 24, length: int = 128) -> tuple[int, dict[int, dict]]:
    """The head of ``layer`` with the largest median whole-state ablation KL at the window's end on
    validation windows, and every head's ablation summary."""
    tokens = mixed_windows("validation", length, windows)
    by_head = {}
    for head in range(model.cfg.n_heads):
        result = state_ablation_kl(model, layer, head, tokens)
        by_head[head] = {k: v for k, v in result.items() if not k.startswith("kl_")}
    return max(by_head, key=lambda h: by_head[h]["median_last"]), by_head


@torch.no_grad()
def score(sae: SAE, x: torch.Tensor, scale: float = 1.0) -> dict[str, float]:
    """Held-out FVU, MSE, L0 and never-firing fraction of ``sae`` on ``x`` (``scale``: SAELens's
    activation scaling of a mid-training checkpoint, which the final SAE has folded in)."""
    codes = sae.encode(x * scale)
    recon = sae.decode(codes) / scale
    err = (recon - x).pow(2).sum()
    return {
        "fvu": float(err / (x - x.mean(0)).pow(2).sum()),
        "mse": float(err / x.numel()),
        "l0": float((codes != 0).sum(-1).float().mean()),
        "dead_fraction": float(((codes != 0).sum(0) == 0).float().mean()),
    }


def checkpoint_curve(checkpoints: Path, x: torch.Tensor) -> list[dict[str, float]]:
    """Held-out scores at each periodic checkpoint SAELens saved (``<run id>/<training tokens>/``)."""
    curve = []
    saved = [p.parent for p in checkpoints.glob(f"*/*/{ACTIVATION_SCALER_FILE}") if p.parent.name.isdigit()]
    for path in sorted(saved, key=lambda p: int(p.name)):
        scale = json.loads((path / ACTIVATION_SCALER_FILE).read_text()).get("scaling_factor") or 1.0
        sae = SAE.load_from_disk(str(path), device="cpu").eval()
        curve.append({"tokens": int(path.name), **score(sae, x, scale)})
    return curve


def train_one(model, dataset, layer: int, head: int, site: str, architecture: str, args, scratch: Path,
              held_out: torch.Tensor) -> tuple[SAE, dict]:
    start = time.time()
    runner = build_runner(
        model, dataset, layer, head, site, architecture=architecture, d_sae=args.d_sae, k=args.k,
        recipe=TrainingRecipe(epochs=args.epochs), site_cache=scratch.parent / f"{site}-inputs",
        n_sequences=args.sequences, context_size=args.context_size, train_batch_size_tokens=args.batch_tokens,
        lr=args.lr, output_path=str(scratch / "final"), checkpoint_path=str(scratch / "checkpoints"),
        n_checkpoints=args.checkpoints, seed=0, factored=False,
        # A constant rate after a brief warm-up, decayed over the last fifth.
        lr_scheduler_name="constant", lr_warm_up_steps=20,
    )
    tokens = runner.cfg.training_tokens
    runner.cfg.lr_decay_steps = tokens // args.batch_tokens // 5
    sae = runner.run().eval()
    seconds = time.time() - start
    curve = checkpoint_curve(scratch / "checkpoints", held_out) + [{"tokens": tokens, **score(sae.to("cpu"), held_out)}]
    return sae, {"architecture": architecture, "site": site, "layer": layer, "head": head, "tokens": tokens,
                 "epochs": args.epochs, "sequences": args.sequences, "d_sae": args.d_sae, "k": args.k,
                 "lr": args.lr, "seconds": round(seconds, 1), **curve[-1], "curve": curve}


def write_card(report: dict, heads: dict, layer: int, head: int, args) -> None:
    release = f"writesae-{args.model}"  # the name it ships under, wherever --out put it
    lines = [
        f"# {release}",
        "",
        f"WriteSAEs (`\"writesae\"`: bilinear encoder, rank-1 decoder; {args.d_sae} atoms, TopK k = {args.k}) for the",
        f"bundled `{args.model}` model, layer {layer}, head {head}, trained by `scripts/train_toy_saes.py` through SAELens's",
        f"runner with the paper's recipe (a fixed set of {args.sequences} windows x {args.context_size} tokens of the toy's",
        "training mixture, corpus text and synthetic memory tasks, cast to bf16 and split 80/20; "
        f"{args.epochs:g} epochs through",
        "SAELens's cached store; atoms re-normalised every 100 steps, dead ones resampled every 250), inputs",
        "centred on the site mean. Beside each, SAELens's flat `topk` SAE on the same site with the same atoms,",
        "k, inputs and schedule (the paper's reference: rank-1 within about 8% of the flat MSE, App. C Table 7);",
        "the flat SAEs are scored, not shipped.",
        "",
        f"**Why head {head}**: the head of layer {layer} whose memory the model relies on most, i.e. the largest median",
        "whole-state ablation KL (S_t <- 0 at a random position, KL at the window's end, as the substitution test",
        "scores; 24 validation windows x 128 tokens). The choice reads the model only, never an SAE:",
        "",
        "| head | median KL at the window's end | median KL at t+1 | mean KL at t+1 |",
        "|---|---|---|---|",
        *[f"| {h} | {v['median_last']:.3g} | {v['median_next']:.3g} | {v['mean_next']:.3g} |" for h, v in heads.items()],
        "",
        f"Scores on {args.eval_windows} held-out windows x {args.context_size} tokens of the validation mixture:",
        "",
        "| sae_id | site | architecture | training tokens | held-out FVU | MSE | MSE / flat MSE | L0 | never fires |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for site in SITES:
        flat = report.get(f"{site}/topk")
        for arch in ARCHITECTURES:
            r = report.get(f"{site}/{arch}")
            if r is None:
                continue
            ratio = f"{r['mse'] / flat['mse']:.3f}" if flat else "n/a"
            sae_id = f"`blocks.{layer}.mixer.hook_{site}.h{head}`" if arch == "writesae" else "(flat, not shipped)"
            lines.append(f"| {sae_id} | {site} | {arch} | {r['tokens']:,} | {r['fvu']:.4f} | {r['mse']:.3e} | {ratio} | "
                         f"{r['l0']:.1f} | {100 * r['dead_fraction']:.1f}% |")
    lines += ["", "Held-out FVU along training (SAELens's periodic checkpoints, then the final SAE):", ""]
    for key, r in report.items():
        lines.append(f"- {key}: " + ", ".join(f"{c['tokens']:,} tok {c['fvu']:.4f}" for c in r["curve"]))
    still_falling = [key for key, r in report.items()
                     if len(r["curve"]) > 1 and r["curve"][-1]["fvu"] < 0.99 * r["curve"][-2]["fvu"]]
    if still_falling:
        lines += ["", f"**Not converged**: held-out FVU still fell by more than 1% over the last interval for "
                      f"{', '.join(still_falling)} (a CPU-sized budget; raise `--epochs` or `--sequences`)."]
    else:
        lines += ["", "Converged: held-out FVU fell by less than 1% over the last checkpoint interval for every SAE."]
    lines += [
        "",
        "```python",
        "import writesae_lens",
        "from sae_lens import SAE",
        f"sae = SAE.from_pretrained(\"{release}\", \"blocks.{layer}.mixer.hook_state.h{head}\")",
        "```",
        "",
        f"Reproduce: `python scripts/train_toy_saes.py --model {args.model} --layer {layer} --head {args.head} --sites {args.sites} "
        f"--sequences {args.sequences} --epochs {args.epochs:g} --d-sae {args.d_sae} --k {args.k} --lr {args.lr:g} "
        f"--batch-tokens {args.batch_tokens} --checkpoints {args.checkpoints}`",
        "",
    ]
    (args.out / "README.md").write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="toy-gdn")
    parser.add_argument("--layer", type=int, default=None, help="default: the last layer")
    parser.add_argument("--head", default="memory", help="a head index, or 'memory' (see the module docstring)")
    parser.add_argument("--sequences", type=int, default=600, help="windows in the fixed training set (80%% trained on)")
    parser.add_argument("--epochs", type=float, default=20)
    parser.add_argument("--batch-tokens", type=int, default=1024)
    parser.add_argument("--d-sae", type=int, default=512)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--context-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--checkpoints", type=int, default=4, help="periodic checkpoints scored for the FVU curve")
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--sites", default=",".join(SITES))
    parser.add_argument("--architectures", default=",".join(ARCHITECTURES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=None, help="default: writesae_lens/releases/writesae-<model>")
    args = parser.parse_args()
    args.out = args.out or RELEASES / f"writesae-{args.model}"

    torch.manual_seed(0)
    model = HookedSSM.from_pretrained(args.model, device=args.device)
    layer = model.cfg.n_layers - 1 if args.layer is None else args.layer
    chosen, heads = memory_head(model, layer)
    head = chosen if args.head == "memory" else int(args.head)
    print(f"layer {layer}: median whole-state ablation KL at the window's end per head "
          f"{ {h: round(v['median_last'], 12) for h, v in heads.items()} }; using head {head}", flush=True)
    n_text = len(text_windows("train", args.context_size))
    dataset = Dataset.from_dict({"input_ids": mixed_windows("train", args.context_size, 2 * n_text).tolist()})
    held_out_tokens = mixed_windows("validation", args.context_size, args.eval_windows).to(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    report_path = args.out / "training_report.json"

    def saved_report() -> dict:  # re-read: one process per site may run at once
        return json.loads(report_path.read_text()) if report_path.exists() else {}

    for site in args.sites.split(","):
        held_out = site_activations(model, layer, head, site, held_out_tokens).cpu()
        # The fixed input set is shared by this site's SAEs, and sampled afresh on each run: a set
        # left by an earlier run may come from another model or head.
        shutil.rmtree(Path("runs") / f"{args.model}-saes" / f"{site}-inputs", ignore_errors=True)
        for arch in args.architectures.split(","):
            scratch = Path("runs") / f"{args.model}-saes" / f"{site}-{arch}"
            shutil.rmtree(scratch, ignore_errors=True)
            _, result = train_one(model, dataset, layer, head, site, arch, args, scratch, held_out)
            print(f"{site}/{arch}", {k: v for k, v in result.items() if k != "curve"}, flush=True)
            if arch == "writesae":
                target = args.out / f"blocks.{layer}.mixer.hook_{site}.h{head}"
                staging = target.with_name(target.name + ".partial")
                shutil.rmtree(staging, ignore_errors=True)
                staging.mkdir(parents=True)
                for name in ("cfg.json", "sae_weights.safetensors", "sparsity.safetensors"):
                    shutil.copy(scratch / "final" / name, staging / name)
                shutil.rmtree(target, ignore_errors=True)
                staging.rename(target)  # never a half-copied SAE under its real id
            report_path.write_text(json.dumps({**saved_report(), f"{site}/{arch}": result}, indent=1) + "\n")
    (args.out / "head_choice.json").write_text(json.dumps({"layer": layer, "head": head, "rule": args.head,
                                                           "state_ablation": heads}, indent=1) + "\n")
    write_card(saved_report(), heads, layer, head, args)


if __name__ == "__main__":
    main()
