"""The bundled toy models' data path: corpus, tokenizer and (if present) the saved checkpoints."""

from __future__ import annotations

import json
import math

import pytest
import torch

from hooked_ssm.pretrained.toy import (
    BOS_TOKEN,
    BOS_TOKEN_ID,
    EOS_TOKEN,
    EOS_TOKEN_ID,
    PAD_TOKEN,
    PAD_TOKEN_ID,
    TOKENIZER_DIR,
    TOY_DIR,
    TOY_MODEL_NAMES,
    TOY_VOCAB_SIZE,
    corpus,
    toy_model_dir,
)

ROUND_TRIP_TEXTS = [
    "def f(x):\n    return x + 1\n",
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces,\ttabs\tand trailing newlines\n\n\n",
    "unicode: héllo wörld → 世界 🐍 \u00a0nbsp",
    "",
]


# --------------------------------------------------------------------------------------------
# corpus
# --------------------------------------------------------------------------------------------
def test_corpus_is_deterministic_across_fresh_builds():
    # _build_titled runs a fresh `python -I -S` subprocess (random hash seed each time).
    first = corpus._build_titled.__wrapped__()
    second = corpus._build_titled.__wrapped__()
    assert first == second
    assert first == corpus._build_titled()


def test_corpus_splits_are_disjoint_and_cover_everything():
    built = corpus.build_corpus()
    assert set(built) == {"train", "validation"}
    train_titles = [t for t, _ in corpus.titled_documents("train")]
    val_titles = [t for t, _ in corpus.titled_documents("validation")]
    all_titles = [t for t, _ in corpus.titled_documents()]
    assert not set(train_titles) & set(val_titles)
    assert sorted(train_titles + val_titles) == all_titles == sorted(set(all_titles))
    assert all(corpus.document_split(t) == "train" for t in train_titles)
    assert all(corpus.document_split(t) == "validation" for t in val_titles)
    assert 0.02 < len(val_titles) / len(all_titles) < 0.12
    assert len(built["train"]) == len(train_titles) and len(built["validation"]) == len(val_titles)


def test_corpus_content_and_size():
    built = corpus.build_corpus()
    n_chars = sum(len(d) for d in built["train"])
    assert n_chars > 500_000  # a couple of MB on CPython 3.10+
    assert all(isinstance(d, str) and d.strip() for split in built.values() for d in split)
    titles = {t for t, _ in corpus.titled_documents()}
    assert any(t.startswith("module:") for t in titles)
    assert any(t.startswith("class:") for t in titles)
    text = "\n".join(built["train"] + built["validation"])
    assert " at 0x" not in text  # no memory addresses in signatures
    # never third-party modules, never the excluded ones
    for title in titles:
        if title.startswith(("module:", "class:")):
            modname = title.split(":", 1)[1]
            if title.startswith("class:"):
                modname = modname.rsplit(".", 1)[0]
            assert modname in corpus.STDLIB_MODULES
    assert not set(corpus.STDLIB_MODULES) & corpus.EXCLUDED_MODULES


def test_build_corpus_returns_fresh_lists_and_iter_documents_agrees():
    a = corpus.build_corpus()
    a["train"].clear()
    b = corpus.build_corpus()
    assert b["train"]
    assert list(corpus.iter_documents("validation")) == b["validation"]
    with pytest.raises(ValueError):
        list(corpus.iter_documents("test"))


def test_document_split_is_a_fixed_function_of_the_title():
    assert corpus.document_split("module:json") == corpus.document_split("module:json")
    splits = {corpus.document_split(f"doc{i}") for i in range(200)}
    assert splits == {"train", "validation"}


# --------------------------------------------------------------------------------------------
# tokenizer
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer():
    from transformers import PreTrainedTokenizerFast

    if not (TOKENIZER_DIR / "tokenizer.json").exists():
        pytest.skip("no bundled tokenizer (run scripts/train_toy_models.py --prepare-only)")
    return PreTrainedTokenizerFast.from_pretrained(str(TOKENIZER_DIR))


def test_tokenizer_special_tokens(tokenizer):
    assert len(tokenizer) == TOY_VOCAB_SIZE
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (
        BOS_TOKEN_ID,
        EOS_TOKEN_ID,
        PAD_TOKEN_ID,
    )
    assert tokenizer.convert_tokens_to_ids([BOS_TOKEN, EOS_TOKEN, PAD_TOKEN]) == [0, 1, 2]
    # special tokens are single tokens when they appear in text
    assert tokenizer(f"{BOS_TOKEN}x{EOS_TOKEN}")["input_ids"][0] == BOS_TOKEN_ID


def test_tokenizer_adds_no_special_tokens(tokenizer):
    ids = tokenizer("hello world")["input_ids"]
    assert ids == tokenizer("hello world", add_special_tokens=False)["input_ids"]
    assert BOS_TOKEN_ID not in ids and EOS_TOKEN_ID not in ids
    assert tokenizer("")["input_ids"] == []


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_tokenizer_round_trips(tokenizer, text):
    ids = tokenizer(text)["input_ids"]
    assert all(0 <= i < TOY_VOCAB_SIZE for i in ids)
    assert tokenizer.decode(ids) == text


def test_tokenizer_round_trips_corpus_documents(tokenizer):
    docs = corpus.build_corpus()["validation"][:20]
    for doc, ids in zip(docs, tokenizer(docs)["input_ids"]):
        assert tokenizer.decode(ids) == doc
    # the BPE was fit on this corpus: it should compress it well (bytes per token)
    total_chars = sum(len(d.encode("utf-8")) for d in docs)
    total_tokens = sum(len(ids) for ids in tokenizer(docs)["input_ids"])
    assert total_chars / total_tokens > 3.0


def test_tokenizer_loads_with_auto_tokenizer():
    from transformers import AutoTokenizer

    if not (TOKENIZER_DIR / "tokenizer.json").exists():
        pytest.skip("no bundled tokenizer")
    tok = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    assert tok.bos_token_id == BOS_TOKEN_ID and len(tok) == TOY_VOCAB_SIZE
    assert tok.decode(tok("x = 1")["input_ids"]) == "x = 1"


# --------------------------------------------------------------------------------------------
# bundled checkpoints (skipped where they have not been trained yet)
# --------------------------------------------------------------------------------------------
# toy-rwkv7 has no transformers class: its config.json declares BlinkDL's layout, loaded by HookedSSM
_CLASSES = {"toy-gdn": "Qwen3_5ForCausalLM", "toy-mamba2": "Mamba2ForCausalLM", "toy-rwkv7": "rwkv7_blinkdl"}


def _model_dir_or_skip(name):
    path = toy_model_dir(name)
    if not (path / "config.json").exists():
        pytest.skip(f"bundled model {name} not present (run scripts/train_toy_models.py)")
    return path


@pytest.mark.parametrize("name", TOY_MODEL_NAMES)
def test_bundled_model_directory_layout(name):
    path = _model_dir_or_skip(name)
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md"):
        assert (path / f).is_file(), f
    assert (path / "model.safetensors").stat().st_size < 16 * 2**20
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["architectures"] == [_CLASSES[name]]
    assert cfg["vocab_size"] == TOY_VOCAB_SIZE
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (BOS_TOKEN_ID, EOS_TOKEN_ID, PAD_TOKEN_ID)
    # the tokenizer shipped with the model is the bundled one
    assert (path / "tokenizer.json").read_bytes() == (TOKENIZER_DIR / "tokenizer.json").read_bytes()


def test_toy_model_dir_rejects_unknown_names():
    with pytest.raises(KeyError):
        toy_model_dir("toy-transformer")


@pytest.mark.parametrize("name", TOY_MODEL_NAMES)
def test_bundled_model_loads_and_predicts(name, tokenizer):
    import transformers

    path = _model_dir_or_skip(name)
    doc = corpus.build_corpus()["validation"][0]
    ids = torch.tensor([[BOS_TOKEN_ID] + tokenizer(doc)["input_ids"][:95]])
    if _CLASSES[name] == "rwkv7_blinkdl":
        from hooked_ssm import HookedSSM

        with torch.no_grad():
            logits = HookedSSM.from_pretrained(str(path), device="cpu")(ids)
    else:
        cls = getattr(transformers, _CLASSES[name])
        model = cls.from_pretrained(str(path), dtype=torch.float32).eval()
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False).logits
    assert logits.shape == (1, ids.shape[1], TOY_VOCAB_SIZE)
    assert torch.isfinite(logits).all()
    loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]).item()
    # trained weights: far below the uniform (ln 4096 = 8.3) and unigram (~6.7) levels
    assert loss < 6.0, loss
    assert not math.isnan(loss)


def test_models_summary_matches_cards():
    path = TOY_DIR / "training_metrics.json"
    if not path.exists():
        pytest.skip("no training_metrics.json")
    summary = json.loads(path.read_text())
    table = (TOY_DIR / "MODELS.md").read_text()
    for name, m in summary["models"].items():
        assert m["validation_loss"] < summary["unigram_baseline"]["validation_ce"]
        assert f"{m['validation_loss']:.4f}" in table
        assert f"{m['validation_loss']:.4f}" in (toy_model_dir(name) / "README.md").read_text()
