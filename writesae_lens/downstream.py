"""Downstream cost of a dictionary: the perplexity change when one head's state (or write) is replaced
by the SAE's reconstruction (the paper's §3 / METHOD.md §8).

Protocol (paper): windows of 1,024 tokens; positions ``0 .. prefix-1`` (0-511) are context, and the
teacher-forced next-token loss is averaged over positions ``prefix .. end`` (512-1023), once with the
model as is and once with the SAE spliced into its head (``HookedSAESSM``: at every position of the
window, so the recurrence carries the reconstructed state forward). The cost is
``exp(mean spliced loss - mean clean loss) - 1``, the relative perplexity change. On the bundled toys
the default window is 256 tokens with a 128-token prefix (their validation documents are short).

``writesae downstream --model toy-gdn --sae writesae-toy-gdn`` runs it for every SAE of a release (or
the given ``--sae-id``s / SAE folders), one row per (layer, head, site).
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Union
from pathlib import Path

import torch
from jaxtyping import Float, Int
from sae_lens import SAE
from torch import Tensor
from tqdm.auto import tqdm

from hooked_ssm import HookedSSM

PAPER_DOWNSTREAM = {  # Qwen3.5-0.8B L9 H4, perplexity change with the SAE spliced in (METHOD.md §8)
    "writesae": 0.0058, "topk": 0.0331, "writesae_matrix": 0.1118, "writesae_bilinear": 0.0133,
}


@dataclass(frozen=True)
class HeadReplacement:
    """A replacement of one head of ``hook_name`` by ``fn(x)`` (``x``: ``[batch, pos, d]``) for a
    dictionary that is not an SAE (e.g. an SVD / PCA projection); run through a plain forward hook."""

    hook_name: str
    head: int
    fn: Callable[[Tensor], Tensor]

    def hook(self, act: Tensor, hook: object = None) -> Tensor:
        act = act.clone()
        act[:, :, self.head] = self.fn(act[:, :, self.head]).to(act.dtype)
        return act


Replacement = Union[SAE, HeadReplacement]


@dataclass(frozen=True)
class DownstreamCost:
    """Mean teacher-forced loss (nats/token) over the scored positions, clean and with the SAE."""

    hook_name: str
    head: int | None
    clean_loss: float
    spliced_loss: float
    n_tokens: int
    prefix: int
    context_size: int

    @property
    def ppl_change(self) -> float:
        """Relative perplexity change, ``exp(spliced - clean) - 1`` (0.01 = +1%)."""
        return math.expm1(self.spliced_loss - self.clean_loss)

    def as_row(self) -> dict[str, float | int | str | None]:
        return {**asdict(self), "ppl_change": self.ppl_change}


def next_token_losses(
    logits: Float[Tensor, "batch pos vocab"], tokens: Int[Tensor, "batch pos"], prefix: int
) -> Float[Tensor, "batch scored"]:
    """Teacher-forced loss of tokens ``prefix ..`` (each predicted from the logits one position earlier)."""
    logp = logits[:, prefix - 1 : -1].double().log_softmax(-1)
    return -logp.gather(-1, tokens[:, prefix:, None].to(logp.device)).squeeze(-1)


def _write_site(sae: SAE) -> SAE:
    # An SAE trained on hook_write_factors splices in its hook_write form.
    return sae.to_write_site() if getattr(sae, "reads_write_factors", False) else sae


@torch.no_grad()
def downstream_costs(
    model: HookedSSM,
    saes: Sequence[Replacement],
    tokens: Int[Tensor, "window pos"],
    prefix: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> list[DownstreamCost]:
    """:class:`DownstreamCost` of each SAE (or :class:`HeadReplacement`) on ``tokens`` (the clean pass
    runs once for all of them).

    ``prefix`` defaults to half the window (the paper: 512 of 1,024). The model is given SAE splicing
    in place (``HookedSAESSM.from_hooked_ssm``); no SAE stays attached afterwards."""
    from writesae_lens.splicing import HookedSAESSM

    if tokens.dim() != 2:
        raise ValueError(f"tokens must be [window, pos], got shape {list(tokens.shape)}.")
    context = tokens.shape[1]
    prefix = context // 2 if prefix is None else prefix
    if not 1 <= prefix < context:
        raise ValueError(f"prefix must be in 1..{context - 1} (positions scored: prefix..{context - 1}), not {prefix}.")
    spliced_model = HookedSAESSM.from_hooked_ssm(model)
    saes = [sae if isinstance(sae, HeadReplacement) else _write_site(sae) for sae in saes]
    clean, spliced = 0.0, [0.0] * len(saes)
    batches = list(tokens.split(batch_size))
    bar = tqdm(total=len(batches) * (1 + len(saes)), desc="downstream loss", disable=not progress)
    for batch in batches:
        batch = batch.to(model.cfg.device)
        clean += next_token_losses(spliced_model(batch), batch, prefix).sum().item()
        bar.update()
        for i, sae in enumerate(saes):
            if isinstance(sae, HeadReplacement):
                logits = spliced_model.run_with_hooks(batch, fwd_hooks=[(sae.hook_name, sae.hook)])
            else:
                logits = spliced_model.run_with_saes(batch, saes=[sae])
            spliced[i] += next_token_losses(logits, batch, prefix).sum().item()
            bar.update()
    bar.close()
    n = tokens.shape[0] * (context - prefix)
    return [DownstreamCost(*_site(sae), clean / n, loss / n, n, prefix, context) for sae, loss in zip(saes, spliced)]


def _site(replacement: Replacement) -> tuple[str, int | None]:
    if isinstance(replacement, HeadReplacement):
        return replacement.hook_name, replacement.head
    return replacement.cfg.metadata.hook_name, replacement.cfg.metadata.hook_head_index


def downstream_cost(model: HookedSSM, sae: Replacement, tokens: Int[Tensor, "window pos"], **kwargs) -> DownstreamCost:
    """:func:`downstream_costs` of one SAE."""
    return downstream_costs(model, [sae], tokens, **kwargs)[0]


# ---------------------------------------------------------------- CLI: writesae downstream
def toy_windows(model: HookedSSM, context_size: int, n_windows: int, split: str = "validation") -> Tensor:
    """``n_windows`` windows of the bundled toy corpus's ``split`` (documents joined with BOS)."""
    from writesae_lens.demo import corpus_windows

    windows = corpus_windows(model, split, context_size, n_windows)
    if windows.shape[0] < n_windows:
        raise ValueError(f"The toy corpus's {split} split holds only {windows.shape[0]} windows of {context_size} tokens.")
    return windows


def load_saes(spec: str, sae_ids: Iterable[str] | None, device: str) -> list[SAE]:
    """SAEs from a folder, or from a release (every SAE of it unless ``sae_ids``)."""
    import writesae_lens  # noqa: F401  (registers the architectures and the bundled releases)
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    if Path(spec).is_dir() and (Path(spec) / "cfg.json").is_file():
        return [SAE.load_from_disk(spec, device=device)]
    directory = get_pretrained_saes_directory()
    if spec not in directory:
        raise SystemExit(f"--sae {spec!r} is neither an SAE folder (with cfg.json) nor a registered release.")
    ids = list(sae_ids or directory[spec].saes_map)
    return [SAE.from_pretrained(spec, sae_id, device=device) for sae_id in ids]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="toy-gdn", help="bundled toy name or checkpoint directory (default: toy-gdn)")
    p.add_argument("--sae", default="writesae-toy-gdn", help="SAE folder or release (default: writesae-toy-gdn)")
    p.add_argument("--sae-id", nargs="*", default=None, help="SAE ids within the release (default: all)")
    p.add_argument("--context-size", type=int, default=256, help="window length (paper: 1024; toy default 256)")
    p.add_argument("--prefix", type=int, default=None, help="unscored context positions (default: half the window)")
    p.add_argument("--n-windows", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None, help="write one row per SAE to this JSON file")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    model = HookedSSM.from_pretrained(args.model, device=args.device)
    saes = load_saes(args.sae, args.sae_id, args.device)
    tokens = toy_windows(model, args.context_size, args.n_windows)
    costs = downstream_costs(model, saes, tokens, args.prefix, args.batch_size, progress=not args.quiet)
    print(format_costs(costs))
    if args.json:
        Path(args.json).write_text(json.dumps([c.as_row() for c in costs], indent=2))
        print(f"rows -> {args.json}")
    return 0


def format_costs(costs: Sequence[DownstreamCost]) -> str:
    if not costs:
        return "no SAE"
    c = costs[0]
    lines = [
        f"Downstream cost: {c.n_tokens} tokens scored (positions {c.prefix}..{c.context_size - 1} of "
        f"{c.context_size}-token windows); clean loss {c.clean_loss:.4f} nats/token",
        f"{'site':<34} {'head':>4} {'spliced loss':>12} {'ppl change':>11}",
    ]
    lines += [f"{c.hook_name:<34} {c.head if c.head is not None else '-':>4} {c.spliced_loss:>12.4f} {c.ppl_change:>+10.2%}"
              for c in costs]
    return "\n".join(lines)


__all__ = ["DownstreamCost", "HeadReplacement", "PAPER_DOWNSTREAM", "downstream_cost", "downstream_costs", "next_token_losses"]
