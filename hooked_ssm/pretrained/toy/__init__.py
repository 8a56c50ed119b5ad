"""Bundled toy models: tiny Gated DeltaNet (Qwen3.5-style), Mamba-2 and RWKV-7 checkpoints.

They are trained by ``scripts/train_toy_models.py`` on text that every Python installation
carries (see :mod:`hooked_ssm.pretrained.toy.corpus`), with a byte-level BPE tokenizer
(vocabulary 4096) trained by the same script and stored in ``tokenizer/``. Each model lives
in ``<name>/`` as an ordinary Hugging Face checkpoint directory (``config.json``,
``model.safetensors``, tokenizer files and a ``README.md`` model card), so the real
checkpoint-loading path is exercised offline. ``toy-rwkv7`` (no transformers class exists)
stores BlinkDL's ``.pth`` tensor names in its safetensors, behind a ``config.json`` that
declares ``rwkv7_blinkdl``. ``MODELS.md`` summarises their validation losses.

The tokenizer does NOT add ``<|bos|>`` automatically (it has no post-processor template):
callers prepend ``tokenizer.bos_token_id`` themselves, as the training data did at the start
of every document.
"""

from __future__ import annotations

from pathlib import Path

#: This package's directory (package data lives beside this file).
TOY_DIR: Path = Path(__file__).resolve().parent
#: The shared tokenizer directory (``PreTrainedTokenizerFast.save_pretrained`` output).
TOKENIZER_DIR: Path = TOY_DIR / "tokenizer"
#: Names of the bundled toy models; each is a sub-directory of :data:`TOY_DIR`.
TOY_MODEL_NAMES: tuple[str, ...] = ("toy-gdn", "toy-mamba2", "toy-rwkv7")
#: Special tokens and their ids in the bundled tokenizer.
BOS_TOKEN, EOS_TOKEN, PAD_TOKEN = "<|bos|>", "<|eos|>", "<|pad|>"
BOS_TOKEN_ID, EOS_TOKEN_ID, PAD_TOKEN_ID = 0, 1, 2
#: Vocabulary size of the bundled tokenizer (and of the toy models' embeddings).
TOY_VOCAB_SIZE: int = 4096


def toy_model_dir(name: str) -> Path:
    """Return the checkpoint directory of the bundled toy model ``name`` (e.g. ``"toy-gdn"``)."""
    if name not in TOY_MODEL_NAMES:
        raise KeyError(f"unknown toy model {name!r}; expected one of {TOY_MODEL_NAMES}")
    return TOY_DIR / name


__all__ = [
    "BOS_TOKEN",
    "BOS_TOKEN_ID",
    "EOS_TOKEN",
    "EOS_TOKEN_ID",
    "PAD_TOKEN",
    "PAD_TOKEN_ID",
    "TOKENIZER_DIR",
    "TOY_DIR",
    "TOY_MODEL_NAMES",
    "TOY_VOCAB_SIZE",
    "toy_model_dir",
]
