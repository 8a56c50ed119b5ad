"""Fixtures of the cache-intervention probes (erasure, sign prediction, sustained installs): a tiny
one-layer Gated DeltaNet whose forget gates are slow, a random WriteSAE on its head 1 writes, and
hooks that make the read -> logits map linear (so the closed form is exact)."""

from contextlib import contextmanager

import pytest
import torch
from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

import writesae_lens.saes  # noqa: F401
from hooked_ssm import HookedSSM
from writesae_lens.saes import WriteSAE, WriteSAEConfig

HEAD = 1


@pytest.fixture(scope="package")
def model(tmp_path_factory):
    """1-layer Gated DeltaNet (Qwen3.5 layout), slow forget gates (a ~ 0.97), untied embeddings."""
    config = Qwen3_5TextConfig(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=1, layer_types=["linear_attention"],
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
        linear_key_head_dim=16, linear_value_head_dim=8, linear_conv_kernel_dim=4, hidden_act="silu",
        rms_norm_eps=1e-6, max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    hf = Qwen3_5ForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in hf.named_parameters():
            param.add_((0.3 if "norm" in name or "dt_bias" in name else 0.05) * torch.randn(param.shape, generator=gen))
        hf.model.layers[0].linear_attn.A_log.fill_(-3.0)
    directory = tmp_path_factory.mktemp("install_gdn")
    hf.save_pretrained(directory)
    return HookedSSM.from_pretrained(directory)


@pytest.fixture(scope="package")
def contexts():
    return torch.randint(3, 300, (6, 12), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="package")
def sae(model):
    """A random WriteSAE (8 atoms, k = 2) on head 1's native writes."""
    d_k, d_v = model.cfg.d_k, model.cfg.d_v
    cfg = WriteSAEConfig(d_in=d_k * d_v, d_sae=8, d_k=d_k, d_v=d_v, k=2)
    cfg.metadata.hook_name, cfg.metadata.hook_head_index = "blocks.0.mixer.hook_write", HEAD
    torch.manual_seed(0)
    return WriteSAE(cfg)


@pytest.fixture(scope="package")
def linearised(model):
    """A context in which read -> logits is linear (gated norm, MLP and final norm bypassed): the
    closed form is then the exact logit change, so a written direction does what the formula says."""

    @contextmanager
    def context():
        seen = {}
        hooks = [
            ("blocks.0.mixer.hook_read", lambda act, hook: seen.__setitem__("read", act)),
            ("blocks.0.mixer.hook_z", lambda act, hook: seen["read"]),
            ("blocks.0.hook_mlp_out", lambda act, hook: torch.zeros_like(act)),
        ]
        norm = model.ln_final
        norm.forward = lambda x: norm.hook_normalized(x)  # the final norm becomes the identity
        try:
            with model.hooks(fwd_hooks=hooks):
                yield
        finally:
            del norm.forward

    return context


@pytest.fixture(scope="package")
def rerun_with_write():
    """The independent reference: a full re-run of one prompt whose head-1 write at ``position``
    becomes ``fn(write)``; returns the logits (float64) at every position."""

    def rerun(model, prompt, position, fn, extra_hooks=()):
        def hook(act, hook):
            act[:, position, HEAD] = fn(act[:, position, HEAD])
            return act

        with torch.no_grad(), model.hooks(fwd_hooks=[*extra_hooks, ("blocks.0.mixer.hook_write", hook)]):
            return model(prompt[None]).double()[0]

    return rerun
