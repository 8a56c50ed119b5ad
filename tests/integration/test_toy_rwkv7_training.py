"""``scripts/toy_rwkv7.py`` (the toy-rwkv7 half of the toy training script): BlinkDL's init gives
every head a long memory and starts as a bigram model, and what ``save_blinkdl`` writes loads back
through ``from_pretrained`` to the same model."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from hooked_ssm import HookedSSM

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "toy_rwkv7.py"
VOCAB = 300


@pytest.fixture(scope="module")
def toy_rwkv7():
    spec = importlib.util.spec_from_file_location("_toy_rwkv7_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def fresh(toy_rwkv7):
    torch.set_num_threads(1)
    return toy_rwkv7.build_model(seed=0, vocab_size=VOCAB)


def test_init_gives_every_head_a_long_memory(fresh):
    tokens = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(0))
    _, cache = fresh.run_with_cache(tokens, names_filter=lambda name: name.endswith("hook_decay"))
    for layer in range(fresh.cfg.n_layers):
        decay = cache[f"blocks.{layer}.mixer.hook_decay"]  # [batch, pos, head, d_k]
        per_head_max = decay.amax(dim=(0, 1, 3))
        assert (per_head_max > 0.98).all(), (layer, per_head_max)  # every head remembers >= ~50 tokens
        assert decay.max() > 0.999 and decay.min() < 0.6, layer  # from ~1000-token memory to the fastest


def test_init_starts_as_a_bigram_model(fresh):
    """Zero output projections and channel-mix values: every block is the identity at step 0."""
    tokens = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = fresh(tokens)
        embedded = fresh.blocks[0].ln0(fresh.embed(tokens))
        expected = fresh.unembed(fresh.ln_final(embedded))
    torch.testing.assert_close(logits, expected)
    assert abs(F.cross_entropy(logits.flatten(0, 1), tokens.flatten()).item() - math.log(VOCAB)) < 1.0


def test_saved_blinkdl_layout_loads_back(fresh, toy_rwkv7, tmp_path):
    with torch.no_grad():  # move every weight off its init so the round trip is a real check
        gen = torch.Generator().manual_seed(2)
        for param in fresh.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=gen))
    toy_rwkv7.save_blinkdl(fresh, tmp_path, torch.bfloat16, bos=0, eos=1, pad=2)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["rwkv7_blinkdl"] and config["vocab_size"] == VOCAB
    loaded = HookedSSM.from_pretrained(tmp_path, device="cpu")
    assert loaded.cfg.layer_types == fresh.cfg.layer_types
    assert (loaded.cfg.rwkv_decay_lora, loaded.cfg.rwkv_gate_lora, loaded.cfg.d_mlp) == (
        fresh.cfg.rwkv_decay_lora, fresh.cfg.rwkv_gate_lora, fresh.cfg.d_mlp)
    rounded = {name: p.detach().to(torch.bfloat16).float() for name, p in fresh.named_parameters()}
    loaded_params = dict(loaded.named_parameters())
    assert set(loaded_params) == set(rounded)
    for name, value in rounded.items():
        assert torch.equal(loaded_params[name], value), name
