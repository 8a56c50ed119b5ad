"""Token windows of the toy models' data: corpus text, synthetic memory tasks, or their mixture.

The toys are trained on a mixture of documentation text (:mod:`.corpus`) and synthetic memory
tasks (:mod:`.tasks`); held-out windows of the same mixture are what their SAEs and the
``writesae demo`` are evaluated on. Task rows of split ``s`` use the seeds ``f"{s}:0:{i}"``, the
ones ``scripts/train_toy_models.py`` scores its ``validation`` (and ``dev``) memory accuracy on;
training rows use other seeds (``train:...``), so no held-out task document was trained on.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from jaxtyping import Int
from torch import Tensor

from hooked_ssm.pretrained.toy import BOS_TOKEN_ID, TOKENIZER_DIR
from hooked_ssm.pretrained.toy.corpus import iter_documents
from hooked_ssm.pretrained.toy.tasks import TaskVocabulary, task_stream


@lru_cache(maxsize=1)
def toy_tokenizer():
    """The bundled tokenizer (``PreTrainedTokenizerFast``)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(TOKENIZER_DIR))


def text_windows(split: str, length: int, limit: int | None = None) -> Int[Tensor, "window pos"]:
    """Corpus documents of ``split``, tokenized, each behind a ``<|bos|>``, joined and cut into
    ``length``-token rows (the first ``limit`` rows)."""
    tokenizer = toy_tokenizer()
    ids: list[int] = []
    for doc in iter_documents(split):
        ids += [BOS_TOKEN_ID, *tokenizer(doc, add_special_tokens=False)["input_ids"]]
        if limit is not None and len(ids) >= limit * length:
            break
    rows = torch.tensor(ids[: len(ids) // length * length]).view(-1, length)
    return rows if limit is None else rows[:limit]


def task_windows(split: str, length: int, n: int) -> Int[Tensor, "window pos"]:
    """``n`` rows of ``length`` tokens of synthetic task documents of ``split``."""
    vocab = TaskVocabulary.from_tokenizer(toy_tokenizer())
    return torch.tensor([task_stream(vocab, f"{split}:0:{i}", length)[0] for i in range(n)])


def mixed_windows(split: str, length: int, n: int) -> Int[Tensor, "window pos"]:
    """``n`` rows alternating corpus text and task documents (text first), as the toys were trained."""
    n_task = n // 2
    text = text_windows(split, length, limit=n - n_task)
    if len(text) < n - n_task:
        raise ValueError(f"the {split!r} split has only {len(text)} windows of {length} tokens; ask for fewer.")
    rows = torch.empty(n, length, dtype=torch.long)
    rows[0::2], rows[1::2] = text, task_windows(split, length, n_task)
    return rows


__all__ = ["mixed_windows", "task_windows", "text_windows", "toy_tokenizer"]
