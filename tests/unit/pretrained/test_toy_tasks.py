"""The synthetic memory tasks: deterministic, and every memory target is what a brute-force reading
of the earlier context says it must be."""

import pytest

from hooked_ssm.pretrained.toy import BOS_TOKEN_ID
from hooked_ssm.pretrained.toy.data import mixed_windows, toy_tokenizer
from hooked_ssm.pretrained.toy.tasks import TASKS, TaskVocabulary, task_document, task_stream


@pytest.fixture(scope="module")
def vocab():
    return TaskVocabulary.from_tokenizer(toy_tokenizer())


def _body(vocab, kind, seed):
    ids, mask = task_document(kind, vocab, seed)
    head = 1 + len(vocab.markers[kind])
    assert ids[0] == BOS_TOKEN_ID and tuple(ids[1:head]) == vocab.markers[kind] and not any(mask[:head])
    return ids[head:], mask[head:]


def test_documents_are_deterministic_and_words_are_single_tokens(vocab):
    tokenizer = toy_tokenizer()
    assert len(vocab.words) == 128
    assert all(len(tokenizer(tokenizer.decode([w]), add_special_tokens=False)["input_ids"]) == 1 for w in vocab.words[:50])
    for kind in TASKS:
        assert task_document(kind, vocab, 7) == task_document(kind, vocab, 7)
        assert task_document(kind, vocab, 7) != task_document(kind, vocab, 8)
    with pytest.raises(KeyError, match="unknown task"):
        task_document("sorting", vocab, 0)


@pytest.mark.parametrize("seed", range(5))
def test_memory_targets_follow_from_the_context(vocab, seed):
    ids, mask = _body(vocab, "recall", seed)
    q = ids.index(vocab.query[0])
    pairs = dict(zip(ids[0:q:3], ids[1:q:3]))  # key value , key value , ...
    for i in (i for i, m in enumerate(mask) if m):
        assert i > q and ids[i] == pairs[ids[i - 1]]

    ids, mask = _body(vocab, "copy", seed)
    bar = ids.index(vocab.bar)
    assert ids[bar + 1 :] == ids[:bar] and mask == [False] * (bar + 1) + [True] * bar

    ids, mask = _body(vocab, "induction", seed)
    for i in (i for i, m in enumerate(mask) if m):
        last = max(j for j in range(i - 1) if ids[j] == ids[i - 1])  # the previous occurrence
        assert ids[i] == ids[last + 1]

    ids, mask = _body(vocab, "brackets", seed)
    stack = []
    for token, is_target in zip(ids, mask):
        if token in vocab.openers:
            stack.append(vocab.openers.index(token))
            assert not is_target
        else:
            assert is_target and vocab.closers.index(token) == stack.pop()
    assert not stack


def test_streams_and_mixed_windows_have_the_asked_shape(vocab):
    ids, mask = task_stream(vocab, "validation:0:0", 300)
    assert len(ids) == len(mask) == 300 and ids[0] == BOS_TOKEN_ID
    rows = mixed_windows("validation", 64, 5)
    assert rows.shape == (5, 64)
    assert rows[1].tolist() == task_stream(vocab, "validation:0:0", 64)[0]
