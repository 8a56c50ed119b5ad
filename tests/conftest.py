"""Shared fixtures: tiny random Hugging Face reference models built from config classes and saved
locally with ``save_pretrained`` (never downloaded)."""

from __future__ import annotations

import pytest
import torch
from random_weights import randomize_
from transformers import (
    Qwen3_5Config,
    Qwen3_5ForCausalLM,
    Qwen3_5ForConditionalGeneration,
    Qwen3_5TextConfig,
    Qwen3NextConfig,
    Qwen3NextForCausalLM,
)

VOCAB = 300
ROPE = {"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25,
        "mrope_section": [2, 1, 1], "mrope_interleaved": True}
HYBRID_LAYERS = ["linear_attention", "linear_attention", "full_attention", "linear_attention", "full_attention"]


def gdn_text_kwargs(**overrides) -> dict:
    kwargs = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=len(HYBRID_LAYERS),
        layer_types=HYBRID_LAYERS, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=8,
        linear_conv_kernel_dim=4, hidden_act="silu", rms_norm_eps=1e-6, rope_parameters=ROPE,
        max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    kwargs.update(overrides)
    return kwargs


def save(model, tmp_path_factory, name):
    directory = tmp_path_factory.mktemp(name)
    model.save_pretrained(directory)
    return directory



@pytest.fixture(scope="module")
def one_thread():
    """For modules that run many tiny forwards (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    with torch's default threads a shared CPU spends more time in OpenMP barriers than computing."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def dataset():
    """96 rows of 32 random token ids (vocabulary 3..299 of the tiny models), as SAELens's runners read."""
    from datasets import Dataset

    tokens = torch.randint(3, 300, (96, 32), generator=torch.Generator().manual_seed(0))
    return Dataset.from_dict({"input_ids": tokens.tolist()})


@pytest.fixture(scope="session")
def blinkdl_rwkv():
    """Loader of BlinkDL's ``rwkv`` package (0.8.32) in its RWKV-7 CPU fp32 mode: ``load(path.pth)``.

    The package reads ``RWKV_V7_ON`` at import time, so it is (re)imported in that mode if needed.
    """
    import importlib
    import os
    import sys

    def load(pth_path):
        os.environ["RWKV_V7_ON"] = "1"
        os.environ.setdefault("RWKV_JIT_ON", "0")
        os.environ["RWKV_CUDA_ON"] = "0"
        module = sys.modules.get("rwkv.model")
        if module is None or getattr(module, "RWKV", None) is not getattr(module, "RWKV_x070", object()):
            module = importlib.reload(module) if module is not None else importlib.import_module("rwkv.model")
        return module.RWKV(model=str(pth_path.with_suffix("")), strategy="cpu fp32")  # path WITHOUT .pth

    return load

@pytest.fixture(scope="session")
def qwen35(tmp_path_factory):
    torch.manual_seed(0)
    model = randomize_(Qwen3_5ForCausalLM(Qwen3_5TextConfig(**gdn_text_kwargs(tie_word_embeddings=True))))
    return save(model, tmp_path_factory, "qwen35"), model


@pytest.fixture(scope="session")
def qwen35_untied(tmp_path_factory):
    torch.manual_seed(1)
    model = randomize_(Qwen3_5ForCausalLM(Qwen3_5TextConfig(**gdn_text_kwargs(tie_word_embeddings=False))), seed=1)
    return save(model, tmp_path_factory, "qwen35_untied"), model


@pytest.fixture(scope="session")
def qwen35_vlm(tmp_path_factory):
    """The layout of the real Qwen/Qwen3.5-* releases: model.language_model.*, model.visual.*, text_config."""
    torch.manual_seed(2)
    config = Qwen3_5Config(
        text_config=gdn_text_kwargs(tie_word_embeddings=True),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=32, num_heads=2, out_hidden_size=64,
                           patch_size=4, temporal_patch_size=1, num_position_embeddings=16),
        tie_word_embeddings=True,
    )
    model = randomize_(Qwen3_5ForConditionalGeneration(config), seed=2)
    return save(model, tmp_path_factory, "qwen35_vlm"), model


@pytest.fixture(scope="session")
def qwen3_next(tmp_path_factory):
    torch.manual_seed(3)
    config = Qwen3NextConfig(**gdn_text_kwargs(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48,
        decoder_sparse_step=2, mlp_only_layers=[], norm_topk_prob=True, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.25},
    ))
    model = randomize_(Qwen3NextForCausalLM(config), seed=3)
    return save(model, tmp_path_factory, "qwen3_next"), model
