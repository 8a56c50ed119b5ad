"""Tokenizer helpers mirror HookedTransformer's, with a tokenizer shipped in the checkpoint directory."""

import shutil

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from hooked_ssm import HookedSSM

TEXT = ["the state of the model is a matrix", "each token writes a rank one matrix into the cache"] * 20


@pytest.fixture(scope="module")
def model(qwen35, tmp_path_factory):
    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=200, special_tokens=["<pad>", "<bos>", "<eos>", "<unk>"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    directory = tmp_path_factory.mktemp("with_tokenizer")
    shutil.copytree(qwen35[0], directory, dirs_exist_ok=True)
    tokenizer.save_pretrained(directory)
    return HookedSSM.from_pretrained(directory)


def test_tokenizer_is_loaded_from_the_checkpoint(model):
    assert model.tokenizer is not None and model.tokenizer.bos_token == "<bos>"
    assert model.cfg.default_prepend_bos and not model.cfg.tokenizer_prepends_bos


def test_to_tokens_prepends_bos_and_pads(model):
    tokens = model.to_tokens(["the state", "each token writes a rank one matrix"])
    assert tokens.shape[0] == 2 and (tokens[:, 0] == model.tokenizer.bos_token_id).all()
    assert (tokens[0, -1] == model.tokenizer.pad_token_id).item()
    assert model.to_tokens("the state", prepend_bos=False)[0, 0] != model.tokenizer.bos_token_id
    left = model.to_tokens(["the state", "each token writes a rank one matrix"], padding_side="left")
    assert left[0, 0] == model.tokenizer.pad_token_id


def test_round_trips(model):
    tokens = model.to_tokens("the state of the model", prepend_bos=False)
    assert model.to_string(tokens[0]) == "the state of the model"
    assert "".join(model.to_str_tokens("the state of the model", prepend_bos=False)) == "the state of the model"
    token = model.to_single_token("the")
    assert model.to_string([token]) == "the"
    with pytest.raises(ValueError, match="not one"):
        model.to_single_token("the state of the model")


def test_text_input_and_generation(model):
    logits = model("the state of the model")
    assert logits.shape[:2] == model.to_tokens("the state of the model").shape
    _, cache = model.run_with_cache("the state of the model", names_filter="blocks.0.mixer.hook_state", pos_slice=-1)
    assert cache["blocks.0.mixer.hook_state"].shape[1] == 1
    text = model.generate("the state", max_new_tokens=3, do_sample=False, stop_at_eos=False, verbose=False)
    assert isinstance(text, str) and text.startswith("<bos>the state")


def test_device_moves_keep_cfg_in_sync(model):
    model.to(torch.float64)
    assert model.cfg.dtype == torch.float64 and model.W_E.dtype == torch.float64
    model.to(torch.float32).cpu()
    assert model.cfg.device == "cpu" and model.cfg.dtype == torch.float32
