"""Token windows of held-out text for the protocols."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
from jaxtyping import Int
from torch import Tensor

if TYPE_CHECKING:
    from hooked_ssm import HookedSSM


def token_windows(
    model: HookedSSM,
    texts: Iterable[str],
    context_size: int = 256,
    max_windows: int | None = None,
    prepend_bos: bool = True,
) -> Int[Tensor, "window pos"]:
    """Tokenise ``texts``, join them (each preceded by BOS when ``prepend_bos``), and cut the stream
    into non-overlapping windows of ``context_size`` tokens (the last partial window is dropped)."""
    tokenizer = model.tokenizer
    if tokenizer is None:
        raise ValueError("The model has no tokenizer; pass token ids instead of text.")
    ids: list[int] = []
    bos = tokenizer.bos_token_id
    need = None if max_windows is None else max_windows * context_size
    for text in texts:
        if prepend_bos and bos is not None:
            ids.append(bos)
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if need is not None and len(ids) >= need:
            break
    n = len(ids) // context_size
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"The text holds {len(ids)} tokens, fewer than one window of {context_size}.")
    return torch.tensor(ids[: n * context_size], dtype=torch.long).view(n, context_size)


def toy_validation_texts() -> list[str]:
    """The documents of the bundled toy corpus's validation split (the CLI's default text)."""
    from hooked_ssm.pretrained.toy.corpus import iter_documents

    return list(iter_documents("validation"))


__all__ = ["token_windows", "toy_validation_texts"]
