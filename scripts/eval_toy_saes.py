"""Evaluate the bundled WriteSAE releases of the toy GDN model on the toy corpus's validation split.

    python scripts/eval_toy_saes.py [--sae-ids blocks.1.mixer.hook_state.h1,...] [--prompts 32] [--out report.json]

For each SAE: the spliced-model loss (``HookedSAESSM.run_with_saes``, mean next-token cross-entropy
in nats/token, against the clean model) and SAELens's eval metrics through
``writesae_lens.run_evals`` (CE-loss score, KL, explained variance, L0...). The numbers go into the
release card (``writesae_lens/releases/writesae-toy-gdn/README.md``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from datasets import Dataset
from sae_lens import SAE, ActivationsStore
from sae_lens.evals import EvalConfig

import writesae_lens  # noqa: F401  (registers the architecture and the bundled releases)
from hooked_ssm.pretrained.toy.corpus import iter_documents
from writesae_lens import run_evals
from writesae_lens.demo import toy_sae_id
from writesae_lens.splicing import HookedSAESSM

RELEASE = "writesae-toy-gdn"
SAE_IDS = (toy_sae_id(site="state"), toy_sae_id(site="write"))


def validation_tokens(model: HookedSAESSM, n_prompts: int, context_size: int) -> torch.Tensor:
    """The first ``n_prompts`` rows of ``context_size`` tokens of the validation split (BOS-joined docs)."""
    tokenizer, ids = model.tokenizer, []
    for doc in iter_documents("validation"):
        ids += [tokenizer.bos_token_id, *tokenizer(doc, add_special_tokens=False)["input_ids"]]
        if len(ids) >= n_prompts * context_size:
            break
    return torch.tensor(ids[: n_prompts * context_size]).view(n_prompts, context_size)


@torch.no_grad()
def evaluate(model: HookedSAESSM, sae_id: str, tokens: torch.Tensor, batch: int) -> dict[str, object]:
    sae = SAE.from_pretrained(RELEASE, sae_id)
    clean, spliced = [], []
    for rows in tokens.split(batch):
        clean.append(model(rows, return_type="loss", loss_per_token=True))
        spliced.append(model.run_with_saes(rows, saes=[sae], return_type="loss", loss_per_token=True))
    clean_loss, spliced_loss = torch.cat(clean).mean().item(), torch.cat(spliced).mean().item()

    store = ActivationsStore.from_sae(
        model=model, sae=sae, dataset=Dataset.from_dict({"input_ids": tokens.tolist()}),
        context_size=tokens.shape[1], streaming=False, store_batch_size_prompts=batch,
        train_batch_size_tokens=batch * tokens.shape[1], n_batches_in_buffer=2,
    )
    config = EvalConfig(
        batch_size_prompts=batch, n_eval_reconstruction_batches=len(tokens) // batch,
        n_eval_sparsity_variance_batches=len(tokens) // batch, compute_kl=True, compute_ce_loss=True,
        compute_l2_norms=True, compute_sparsity_metrics=True, compute_variance_metrics=True,
    )
    metrics, _ = run_evals(sae, store, model, eval_config=config, exclude_special_tokens=False)
    return {"clean_loss": clean_loss, "spliced_loss": spliced_loss, "run_evals": metrics}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sae-ids", default=",".join(SAE_IDS))
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--context-size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = HookedSAESSM.from_pretrained("toy-gdn")
    tokens = validation_tokens(model, args.prompts, args.context_size)
    report = {sae_id: evaluate(model, sae_id, tokens, args.batch) for sae_id in args.sae_ids.split(",")}
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
