"""Synthetic documents that can only be predicted by reading the recurrent state.

The bundled toy models are trained on natural text (:mod:`hooked_ssm.pretrained.toy.corpus`)
mixed with these documents, so that their recurrent memory carries what the next token needs
(a model trained on a couple of MB of documentation alone barely reads its state: no edit of it
matters, and the substitution test has nothing to measure). Each document is a list of token ids
of the bundled tokenizer, ``<|bos|>`` first, with a boolean mask marking the *memory targets*:
the tokens that are determined by earlier context and by nothing else (scored as recall accuracy).

* ``recall``: ``recall: k1 v1, k2 v2, ... ? kq vq, ...``: key/value word pairs, then queries of
  earlier keys; the value after a queried key is the target (associative recall at a distance);
* ``copy``: ``copy: w1 ... wn | w1 ... wn``: the second copy is the target;
* ``induction``: random words in which, after a word seen before, the word that followed it then
  often follows again; those repeats are the targets;
* ``brackets``: ``brackets: ( [ { } ] ...``: balanced brackets; every closer is a target (which
  one is fixed by the stack of open brackets, when it comes is not).

This file imports nothing from ``hooked_ssm`` (the training script loads it by path). Documents
are a pure function of ``(kind, seed)`` and the token pools, so training batches are resumable.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

TASKS: tuple[str, ...] = ("recall", "copy", "induction", "brackets")
#: Word tokens: a space followed by 3-8 lowercase letters (about 1,200 of the 4,096 tokens), of
#: which the WORD_POOL lowest ids (the BPE's earliest merges, frequent words) are used: a small
#: pool lets a toy learn the tasks' mechanism in a CPU-sized run instead of 1,200 word embeddings.
WORD_PATTERN = re.compile(r"Ġ[a-z]{3,8}")
WORD_POOL = 128
BRACKETS: tuple[tuple[str, str], ...] = (("(", ")"), ("[", "]"), ("{", "}"))


@dataclass(frozen=True)
class TaskVocabulary:
    """Token ids the tasks are written with (all single tokens of the bundled tokenizer)."""

    bos: int
    words: tuple[int, ...]  # word tokens: keys, values, copied and induction words
    markers: dict[str, tuple[int, ...]]  # "recall:" etc., one per task
    comma: int
    query: tuple[int, ...]  # " ?"
    bar: int  # " |"
    openers: tuple[int, ...]
    closers: tuple[int, ...]

    @classmethod
    def from_tokenizer(cls, tokenizer) -> TaskVocabulary:
        vocab = tokenizer.get_vocab()
        words = tuple(sorted(i for s, i in vocab.items() if WORD_PATTERN.fullmatch(s))[:WORD_POOL])

        def ids(text: str) -> tuple[int, ...]:
            return tuple(tokenizer(text, add_special_tokens=False)["input_ids"])

        def single(text: str) -> int:
            (token,) = ids(text)
            return token

        return cls(
            bos=tokenizer.bos_token_id,
            words=words,
            markers={task: ids(f"{task}:") for task in TASKS},
            comma=single(","),
            query=ids(" ?"),
            bar=single(" |"),
            openers=tuple(single(o) for o, _ in BRACKETS),
            closers=tuple(single(c) for _, c in BRACKETS),
        )


def _recall(v: TaskVocabulary, rng: random.Random) -> tuple[list[int], list[bool]]:
    n_pairs = rng.randint(2, 16)
    keys = rng.sample(v.words, n_pairs)
    values = [rng.choice(v.words) for _ in keys]
    ids, mask = [], []
    for key, value in zip(keys, values):
        ids += [key, value, v.comma]
        mask += [False, False, False]
    ids += list(v.query)
    mask += [False] * len(v.query)
    for q in rng.choices(range(n_pairs), k=rng.randint(4, 12)):
        ids += [keys[q], values[q], v.comma]
        mask += [False, True, False]
    return ids, mask


def _copy(v: TaskVocabulary, rng: random.Random) -> tuple[list[int], list[bool]]:
    span = rng.choices(v.words, k=rng.randint(4, 32))
    return span + [v.bar] + span, [False] * (len(span) + 1) + [True] * len(span)


def _induction(v: TaskVocabulary, rng: random.Random) -> tuple[list[int], list[bool]]:
    pool = rng.sample(v.words, 32)  # a small pool, so that words recur
    ids, mask, follower = [rng.choice(pool)], [False], {}
    for _ in range(rng.randint(48, 128)):
        prev = ids[-1]
        if prev in follower and rng.random() < 0.7:
            ids.append(follower[prev])
            mask.append(True)
        else:
            follower[prev] = rng.choice(pool)
            ids.append(follower[prev])
            mask.append(False)
    return ids, mask


def _brackets(v: TaskVocabulary, rng: random.Random) -> tuple[list[int], list[bool]]:
    ids, mask, stack = [], [], []
    for _ in range(rng.randint(16, 80)):
        if stack and (len(stack) >= 12 or rng.random() < 0.45):
            ids.append(v.closers[stack.pop()])
            mask.append(True)
        else:
            stack.append(rng.randrange(len(v.openers)))
            ids.append(v.openers[stack[-1]])
            mask.append(False)
    while stack:
        ids.append(v.closers[stack.pop()])
        mask.append(True)
    return ids, mask


_MAKERS = {"recall": _recall, "copy": _copy, "induction": _induction, "brackets": _brackets}


def task_document(kind: str, vocab: TaskVocabulary, seed: int | str) -> tuple[list[int], list[bool]]:
    """One document of task ``kind``: ``<|bos|> marker body`` and its memory-target mask."""
    if kind not in _MAKERS:
        raise KeyError(f"unknown task {kind!r}; choose from {TASKS}")
    body, mask = _MAKERS[kind](vocab, random.Random(f"{kind}:{seed}"))
    head = [vocab.bos, *vocab.markers[kind]]
    return head + body, [False] * len(head) + mask


def task_stream(vocab: TaskVocabulary, seed: int | str, length: int, kinds: Sequence[str] = TASKS) -> tuple[list[int], list[bool]]:
    """Task documents of random kinds, concatenated, cut to ``length`` tokens (and their mask)."""
    rng = random.Random(f"stream:{seed}")
    ids: list[int] = []
    mask: list[bool] = []
    while len(ids) < length:
        doc, doc_mask = task_document(rng.choice(kinds), vocab, rng.getrandbits(48))
        ids += doc
        mask += doc_mask
    return ids[:length], mask[:length]


__all__ = ["BRACKETS", "TASKS", "TaskVocabulary", "task_document", "task_stream"]
