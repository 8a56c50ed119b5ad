"""The bundled ``toy-rwkv7``: it loads offline, its logits match BlinkDL's ``rwkv`` package on
held-out text, it beats the unigram baseline (computed here from the corpus, not read from the
metrics file), its write hooks work, and the training-only chunked forward gives the recurrent
form's logits and parameter gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from hooked_ssm import HookedSSM
from hooked_ssm.pretrained.toy import BOS_TOKEN_ID, EOS_TOKEN_ID, PAD_TOKEN_ID, TOY_VOCAB_SIZE, corpus, toy_model_dir

NAME = "toy-rwkv7"
TOL = 1e-4  # as in test_rwkv7_parity.py: max |logit diff| vs the rwkv package, fp32
SEQ = 256  # the evaluation window of scripts/train_toy_models.py


# Many tiny forwards: on a shared CPU one thread is far faster (fixture in tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    if not (toy_model_dir(NAME) / "model.safetensors").is_file():
        pytest.skip(f"{NAME} not present (run scripts/train_toy_models.py --models {NAME})")
    import huggingface_hub

    def no_network(*args, **kwargs):
        raise AssertionError("toy-rwkv7 must load without the Hub")

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(huggingface_hub, "snapshot_download", no_network)
        mp.setattr(huggingface_hub, "hf_hub_download", no_network)
        return HookedSSM.from_pretrained(NAME, device="cpu")


@pytest.fixture(scope="module")
def validation_tokens(model) -> torch.Tensor:
    """The validation split as one stream, each document as ``[bos] + ids`` (as the training script)."""
    docs = [text for _, text in corpus.titled_documents("validation")]
    ids = model.tokenizer(docs, add_special_tokens=False)["input_ids"]
    return torch.tensor([tok for doc in ids for tok in [BOS_TOKEN_ID, *doc]])


@pytest.fixture(scope="module")
def rwkv_reference(tmp_path_factory, blinkdl_rwkv):
    """BlinkDL's ``rwkv`` package (0.8.32, CPU fp32) on the same tensors, written out as a ``.pth``."""
    state = {k: v.float() for k, v in load_file(toy_model_dir(NAME) / "model.safetensors").items()}
    path = tmp_path_factory.mktemp("toy_rwkv7") / "toy-rwkv7.pth"
    torch.save(state, path)
    return blinkdl_rwkv(path)


def test_loads_offline_with_its_config_and_tokenizer(model):
    cfg = model.cfg
    assert cfg.layer_types == ["rwkv7"] * 2 and cfg.original_architecture == "rwkv7_blinkdl"
    assert (cfg.d_model, cfg.n_heads, cfg.d_k, cfg.d_vocab, cfg.d_mlp) == (128, 2, 64, TOY_VOCAB_SIZE, 512)
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (BOS_TOKEN_ID, EOS_TOKEN_ID, PAD_TOKEN_ID)
    assert model.tokenizer is not None and len(model.tokenizer) == TOY_VOCAB_SIZE
    assert model.to_tokens("x = 1")[0, 0].item() == BOS_TOKEN_ID  # trained with <|bos|> before each document
    assert next(model.parameters()).dtype == torch.float32
    n_params = sum(p.numel() for p in model.parameters())
    assert 1e6 < n_params < 2e6, n_params


def test_logits_match_the_rwkv_package_on_held_out_text(model, validation_tokens, rwkv_reference):
    tokens = validation_tokens[:160]
    assert tokens[0].item() == BOS_TOKEN_ID
    with torch.no_grad():
        logits = model(tokens[None])[0]
    expected, _ = rwkv_reference.forward(tokens.tolist(), None, full_output=True)
    diff = (logits - expected).abs().max().item()
    assert diff <= TOL, f"max |logit diff| vs rwkv package {diff:.2e} (logits up to {expected.abs().max():.1f})"
    assert torch.equal(logits.argmax(-1), expected.argmax(-1))


def test_beats_the_unigram_baseline_on_validation_text(model, validation_tokens):
    train_docs = [text for _, text in corpus.titled_documents("train")]
    train_ids = model.tokenizer(train_docs, add_special_tokens=False)["input_ids"]
    counts = torch.zeros(TOY_VOCAB_SIZE, dtype=torch.float64)
    for doc in train_ids:
        counts += torch.bincount(torch.tensor([BOS_TOKEN_ID, *doc]), minlength=TOY_VOCAB_SIZE).double()
    unigram_logp = ((counts + 1) / (counts + 1).sum()).log()  # add-one smoothing, as the training script

    windows = validation_tokens[: 8 * SEQ].view(8, SEQ)  # non-overlapping windows, first token unscored
    with torch.no_grad():
        logits = model(windows[:, :-1])
    model_loss = F.cross_entropy(logits.reshape(-1, TOY_VOCAB_SIZE), windows[:, 1:].reshape(-1)).item()
    unigram_loss = -unigram_logp[windows[:, 1:]].mean().item()
    assert 6.0 < unigram_loss < 7.5, unigram_loss
    assert model_loss < unigram_loss - 1.5, (model_loss, unigram_loss)
    assert model_loss < math.log(TOY_VOCAB_SIZE)


def test_write_hooks_cache_and_edit(model, validation_tokens):
    tokens, t, layer = validation_tokens[None, :40], 25, 1
    name = f"blocks.{layer}.mixer.hook_write"
    clean_logits, cache = model.run_with_cache(tokens, names_filter=[name, f"blocks.{layer}.mixer.hook_k",
                                                                     f"blocks.{layer}.mixer.hook_v"])
    write = cache[name]
    assert write.shape == (1, 40, 2, 64 * 64)
    k, v = cache[f"blocks.{layer}.mixer.hook_k"], cache[f"blocks.{layer}.mixer.hook_v"]
    torch.testing.assert_close(write, (k[..., :, None] * v[..., None, :]).flatten(-2))  # key-major k~ v^T

    def erase_write(x, hook):
        x = x.clone()
        x[:, t] = 0
        return x

    with torch.no_grad():
        edited = model.run_with_hooks(tokens, fwd_hooks=[(name, erase_write)])
    assert torch.equal(edited[:, :t], clean_logits[:, :t])
    assert (edited[:, t:] - clean_logits[:, t:]).abs().max() > 1e-3


def test_chunked_training_forward_equals_the_recurrent_form(model, validation_tokens):
    """What training ran (the chunked form) gives the loaded model's logits and every gradient."""
    batch = validation_tokens[: 2 * 97].view(2, 97)

    def loss_and_grads(execution):
        for block in model.blocks:
            block.mixer.execution = execution
        try:
            model.zero_grad(set_to_none=True)
            logits = model(batch[:, :-1])
            F.cross_entropy(logits.reshape(-1, TOY_VOCAB_SIZE), batch[:, 1:].reshape(-1)).backward()
            return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        finally:
            for block in model.blocks:
                block.mixer.execution = "chunked"
            model.zero_grad(set_to_none=True)

    logits_ref, grads_ref = loss_and_grads("recurrent")
    logits, grads = loss_and_grads("chunked")
    torch.testing.assert_close(logits, logits_ref, atol=1e-4, rtol=1e-4)
    # every parameter gets a gradient through the recurrent form (nothing detaches) ...
    assert set(grads_ref) == {n for n, _ in model.named_parameters()}
    assert all(g.abs().sum() > 0 and torch.isfinite(g).all() for g in grads_ref.values())
    # ... and the chunked form gives the same gradients
    for name, g in grads_ref.items():
        torch.testing.assert_close(grads[name], g, atol=1e-4 * g.abs().max().item() + 1e-9, rtol=1e-3, msg=name)
