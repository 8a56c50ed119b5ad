"""Train the WriteSAE releases bundled for the toy GDN model, through SAELens's runner.

    python scripts/train_toy_saes.py [--tokens 2000000] [--device cuda] [--out writesae_lens/releases/writesae-toy-gdn]

Each SAE id is ``blocks.{layer}.mixer.hook_{site}.h{head}`` (the folder name), saved in SAELens's
on-disk format (cfg.json + sae_weights.safetensors + sparsity.safetensors). Deterministic seed;
SAELens shows the progress bar.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch
from datasets import Dataset

from hooked_ssm import HookedSSM
from hooked_ssm.pretrained.toy.corpus import iter_documents
from writesae_lens.training import build_runner

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "writesae_lens" / "releases" / "writesae-toy-gdn"
SITES = [("state", 1, 0), ("write", 1, 0)]  # (site, layer, head): head 0 of layer 1 keeps ~0.97 of its state per token


def token_dataset(model: HookedSSM, split: str, context_size: int) -> Dataset:
    """Documents tokenized, joined with BOS, cut into rows of ``context_size`` tokens."""
    tokenizer = model.tokenizer
    ids: list[int] = []
    for doc in iter_documents(split):
        ids += [tokenizer.bos_token_id, *tokenizer(doc, add_special_tokens=False)["input_ids"]]
    rows = [ids[i : i + context_size] for i in range(0, len(ids) - context_size + 1, context_size)]
    return Dataset.from_dict({"input_ids": rows})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2_000_000)
    parser.add_argument("--d-sae", type=int, default=1024)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--context-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--sites", default="state,write", help="which of the SITES to train")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = HookedSSM.from_pretrained("toy-gdn", device=args.device)
    dataset = token_dataset(model, "train", args.context_size)
    report = {}
    for site, layer, head in [entry for entry in SITES if entry[0] in args.sites.split(",")]:
        sae_id = f"blocks.{layer}.mixer.hook_{site}.h{head}"
        scratch = Path("runs") / "toy-saes" / sae_id
        start = time.time()
        runner = build_runner(
            model, dataset, layer, head, site, architecture="writesae", d_sae=args.d_sae, k=args.k,
            training_tokens=args.tokens, context_size=args.context_size, train_batch_size_tokens=256, lr=args.lr,
            output_path=str(scratch), seed=0,
            # Short runs: a brief warm-up and a constant rate (a cosine decay over a few hundred
            # steps leaves the bilinear encoder barely trained).
            lr_scheduler_name="constant", lr_warm_up_steps=20, lr_decay_steps=0,
        )
        runner.run()
        target = args.out / sae_id
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        for name in ("cfg.json", "sae_weights.safetensors", "sparsity.safetensors"):
            shutil.copy(scratch / name, target / name)
        report[sae_id] = {"seconds": round(time.time() - start, 1), "tokens": args.tokens}
        print(sae_id, report[sae_id], flush=True)
    report_path = args.out / "training_report.json"
    previous = json.loads(report_path.read_text()) if report_path.exists() else {}
    report_path.write_text(json.dumps({**previous, **report}, indent=2))


if __name__ == "__main__":
    main()
