"""Train the WriteSAE release bundled for the toy GDN model, and SAELens's flat TopK SAE beside it.

    python scripts/train_toy_saes.py [--tokens 1000000] [--device cuda] [--out writesae_lens/releases/writesae-toy-gdn]

For each site (``hook_state`` and ``hook_write`` of layer 1, head 0) it trains, through SAELens's
runner (``writesae_lens.training.build_runner``) on the toy's training mixture (corpus text and
synthetic memory tasks, ``hooked_ssm.pretrained.toy.data``), a ``writesae`` (bilinear encoder,
rank-1 decoder) and SAELens's flat ``topk`` SAE with the same atoms, k, tokens and schedule (the
paper's reference, App. C Table 7). Each is scored on held-out windows of the same mixture (the
validation split): FVU, MSE, L0 and the fraction of atoms that never fire, at its periodic
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
from writesae_lens.training import build_runner

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "writesae_lens" / "releases" / "writesae-toy-gdn"
LAYER, HEAD = 1, 0  # the demo's head
SITES = ("state", "write")
ARCHITECTURES = ("writesae", "topk")  # ours, and SAELens's flat reference
ACTIVATION_SCALER_FILE = "activation_scaler.json"


@torch.no_grad()
def site_activations(model: HookedSSM, site: str, tokens: torch.Tensor) -> torch.Tensor:
    """``[tokens, d_k*d_v]``: the head's ``hook_{site}`` on ``tokens``, flattened."""
    hook = f"blocks.{LAYER}.mixer.hook_{site}"
    _, cache = model.run_with_cache(tokens, names_filter=hook)
    return cache[hook][:, :, HEAD].flatten(0, 1).float()


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


def train_one(model, dataset, site: str, architecture: str, args, scratch: Path, held_out: torch.Tensor) -> tuple[SAE, dict]:
    start = time.time()
    runner = build_runner(
        model, dataset, LAYER, HEAD, site, architecture=architecture, d_sae=args.d_sae, k=args.k,
        training_tokens=args.tokens, context_size=args.context_size, train_batch_size_tokens=256, lr=args.lr,
        output_path=str(scratch / "final"), checkpoint_path=str(scratch / "checkpoints"),
        n_checkpoints=args.checkpoints, seed=0, factored=False,
        # A constant rate after a brief warm-up, decayed over the last fifth.
        lr_scheduler_name="constant", lr_warm_up_steps=20, lr_decay_steps=args.tokens // 256 // 5,
    )
    sae = runner.run().eval()
    seconds = time.time() - start
    curve = checkpoint_curve(scratch / "checkpoints", held_out) + [{"tokens": args.tokens, **score(sae.to("cpu"), held_out)}]
    return sae, {"architecture": architecture, "site": site, "tokens": args.tokens, "d_sae": args.d_sae, "k": args.k,
                 "lr": args.lr, "seconds": round(seconds, 1), **curve[-1], "curve": curve}


def write_card(report: dict, out: Path, args) -> None:
    lines = [
        "# writesae-toy-gdn",
        "",
        f"WriteSAEs (`\"writesae\"`: bilinear encoder, rank-1 decoder; {args.d_sae} atoms, TopK k = {args.k}) for the",
        f"bundled `toy-gdn` model, layer {LAYER}, head {HEAD}, trained by `scripts/train_toy_saes.py` through SAELens's",
        "runner on the toy's training mixture (corpus text and synthetic memory tasks), inputs scaled by",
        "SAELens's `expected_average_only_in` and centred on the site mean. Beside each, SAELens's flat `topk`",
        "SAE on the same site with the same atoms, k, tokens and schedule (the paper's reference: rank-1 within",
        "about 8% of the flat MSE, App. C Table 7); the flat SAEs are scored, not shipped.",
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
            sae_id = f"`blocks.{LAYER}.mixer.hook_{site}.h{HEAD}`" if arch == "writesae" else "(flat, not shipped)"
            lines.append(f"| {sae_id} | {site} | {arch} | {r['tokens']:,} | {r['fvu']:.4f} | {r['mse']:.3e} | {ratio} | "
                         f"{r['l0']:.1f} | {100 * r['dead_fraction']:.1f}% |")
    lines += ["", "Held-out FVU along training (SAELens's periodic checkpoints, then the final SAE):", ""]
    for key, r in report.items():
        lines.append(f"- {key}: " + ", ".join(f"{c['tokens']:,} tok {c['fvu']:.4f}" for c in r["curve"]))
    still_falling = [key for key, r in report.items()
                     if len(r["curve"]) > 1 and r["curve"][-1]["fvu"] < 0.99 * r["curve"][-2]["fvu"]]
    if still_falling:
        lines += ["", f"**Not converged**: held-out FVU still fell by more than 1% over the last interval for "
                      f"{', '.join(still_falling)} (a CPU-sized budget; raise `--tokens`)."]
    lines += ["", "Spliced into the model and scored with SAELens's evals on documentation text (CE-loss score,",
              "KL, explained variance): `scripts/eval_toy_saes.py`, which writes `eval_report.json` here."]
    lines += [
        "",
        "```python",
        "import writesae_lens",
        "from sae_lens import SAE",
        f"sae = SAE.from_pretrained(\"writesae-toy-gdn\", \"blocks.{LAYER}.mixer.hook_state.h{HEAD}\")",
        "```",
        "",
        "Reproduce: `python scripts/train_toy_saes.py "
        f"--tokens {args.tokens} --d-sae {args.d_sae} --k {args.k} --lr {args.lr:g} --checkpoints {args.checkpoints}`",
        "",
    ]
    (out / "README.md").write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1_000_000)
    parser.add_argument("--d-sae", type=int, default=512)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--context-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--checkpoints", type=int, default=4, help="periodic checkpoints scored for the FVU curve")
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--sites", default=",".join(SITES))
    parser.add_argument("--architectures", default=",".join(ARCHITECTURES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = HookedSSM.from_pretrained("toy-gdn", device=args.device)
    n_text = len(text_windows("train", args.context_size))
    dataset = Dataset.from_dict({"input_ids": mixed_windows("train", args.context_size, 2 * n_text).tolist()})
    held_out_tokens = mixed_windows("validation", args.context_size, args.eval_windows).to(args.device)
    report_path = args.out / "training_report.json"

    def saved_report() -> dict:  # re-read: one process per site may run at once
        return json.loads(report_path.read_text()) if report_path.exists() else {}

    for site in args.sites.split(","):
        held_out = site_activations(model, site, held_out_tokens).cpu()
        for arch in args.architectures.split(","):
            scratch = Path("runs") / "toy-saes" / f"{site}-{arch}"
            shutil.rmtree(scratch, ignore_errors=True)
            _, result = train_one(model, dataset, site, arch, args, scratch, held_out)
            print(f"{site}/{arch}", {k: v for k, v in result.items() if k != "curve"}, flush=True)
            if arch == "writesae":
                target = args.out / f"blocks.{LAYER}.mixer.hook_{site}.h{HEAD}"
                shutil.rmtree(target, ignore_errors=True)
                target.mkdir(parents=True)
                for name in ("cfg.json", "sae_weights.safetensors", "sparsity.safetensors"):
                    shutil.copy(scratch / "final" / name, target / name)
            report_path.write_text(json.dumps({**saved_report(), f"{site}/{arch}": result}, indent=1) + "\n")
    write_card(saved_report(), args.out, args)


if __name__ == "__main__":
    main()
