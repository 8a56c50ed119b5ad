"""MiniMax (lightning attention + softmax attention + MoE, residuals on normed inputs) from a tiny
random ``save_pretrained`` checkpoint: parity with transformers (chunked and recurrent), write edits
and states against a brute-force per-token loop run inside the transformers model, exact causality,
and generation with the recurrent cache."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from random_weights import randomize_
from test_mamba2_hybrids import check_generation
from transformers import MiniMaxConfig, MiniMaxForCausalLM

from hooked_ssm import HookedSSM

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, TOL, LAYER = 300, 1e-4, 2  # layer 2 is a lightning-attention layer


def build() -> MiniMaxForCausalLM:
    # Residual factors away from 1 (alpha on the normed input, beta on the sublayer), blocks of 16.
    cfg = MiniMaxConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=32, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, layer_types=["linear_attention", "full_attention", "linear_attention",
                                                         "linear_attention"],
        num_local_experts=4, num_experts_per_tok=2, block_size=16, linear_attn_alpha_factor=1.5,
        linear_attn_beta_factor=0.8, full_attn_alpha_factor=1.2, full_attn_beta_factor=0.9, mlp_alpha_factor=1.1,
        mlp_beta_factor=0.7, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(0)
    return randomize_(MiniMaxForCausalLM(cfg))


@pytest.fixture(scope="module")
def minimax(tmp_path_factory):
    hf_model = build()
    directory = tmp_path_factory.mktemp("minimax")
    hf_model.save_pretrained(directory)
    return directory, hf_model


def _tokens(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def explicit_lightning(attn, hidden, write_override=None, states=None):
    """transformers' MiniMaxLightningAttention recomputed token by token from its weights.

    ``write_override``: ``{t: [batch, head, d, d]}`` replaces the write ``k_t v_t^T`` (key-major).
    ``states``: filled with ``S_t`` ``[batch, head, d, d]``.
    """
    batch, length, _ = hidden.shape
    heads, d = attn.num_attention_heads, attn.head_dim
    q, k, v = F.silu(attn.qkv_proj(hidden)).view(batch, length, heads, 3 * d).split(d, dim=-1)
    decay = torch.exp(-attn.slope_rate.flatten())[None, :, None, None]
    state = hidden.new_zeros(batch, heads, d, d)
    outputs = []
    for t in range(length):
        write = k[:, t, :, :, None] * v[:, t, :, None, :]
        if write_override is not None and t in write_override:
            write = write_override[t]
        state = decay * state + write
        if states is not None:
            states[t] = state
        outputs.append(torch.einsum("bhkv,bhk->bhv", state, q[:, t]))
    o = attn.norm(torch.stack(outputs, dim=1).reshape(batch, length, heads * d))
    return attn.out_proj(torch.sigmoid(attn.output_gate(hidden)) * o), None


def brute_force_logits(hf_model, tokens, write_override=None, states=None):
    attn = hf_model.model.layers[LAYER].self_attn
    attn.forward = lambda hidden_states, *args, **kwargs: explicit_lightning(attn, hidden_states, write_override, states)
    try:
        with torch.no_grad():
            return hf_model(input_ids=tokens, use_cache=False).logits
    finally:
        del attn.forward


@pytest.mark.parametrize("execution", ["chunked", "recurrent"])
def test_logits_match_transformers(minimax, execution):
    directory, hf_model = minimax
    model = HookedSSM.from_pretrained(directory, execution=execution)
    for length in (37, 70):
        tokens = _tokens(2, length, seed=length)
        with torch.no_grad():
            diff = (model(tokens) - hf_model(input_ids=tokens, use_cache=False).logits).abs().max().item()
        assert diff <= TOL, f"{execution}/T={length}: max |logit diff| {diff:.2e}"


def test_brute_force_reference_matches_transformers(minimax):
    _, hf_model = minimax
    tokens = _tokens(2, 37)
    with torch.no_grad():
        expected = hf_model(input_ids=tokens, use_cache=False).logits
    assert (brute_force_logits(hf_model, tokens) - expected).abs().max() <= TOL


@pytest.mark.parametrize("execution", ["chunked", "recurrent"])
def test_write_edit_is_exact_and_causal(minimax, execution):
    directory, hf_model = minimax
    model = HookedSSM.from_pretrained(directory, execution=execution)
    tokens, edits_at = _tokens(2, 70, seed=3), (21, 45)
    gen = torch.Generator().manual_seed(7)
    replacement = {t: torch.randn(2, model.cfg.n_heads, model.cfg.d_k, model.cfg.d_v, generator=gen) for t in edits_at}

    def replace_write(write, hook):
        write = write.clone()
        for t, matrix in replacement.items():
            write[:, t] = matrix.flatten(-2)
        return write

    with torch.no_grad():
        clean = model(tokens)
        edited = model.run_with_hooks(tokens, fwd_hooks=[(f"blocks.{LAYER}.mixer.hook_write", replace_write)])
    diff = (edited - brute_force_logits(hf_model, tokens, replacement)).abs().max().item()
    assert diff <= TOL, f"{execution}: edited logits vs brute force {diff:.2e}"
    first = min(edits_at)
    assert torch.equal(edited[:, :first], clean[:, :first])
    assert (edited[:, first] - clean[:, first]).abs().max() > 1e-3


def test_state_hook_equals_brute_force_states(minimax):
    directory, hf_model = minimax
    model = HookedSSM.from_pretrained(directory)
    tokens, states = _tokens(2, 40, seed=5), {}
    brute_force_logits(hf_model, tokens, states=states)
    expected = torch.stack([states[t] for t in range(40)], dim=1).flatten(-2)
    name = f"blocks.{LAYER}.mixer.hook_state"
    _, cache = model.run_with_cache(tokens, names_filter=name)
    torch.testing.assert_close(cache[name], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("execution", ["chunked", "recurrent"])
def test_generation_with_the_recurrent_cache(minimax, execution):
    directory, hf_model = minimax
    check_generation(HookedSSM.from_pretrained(directory, execution=execution), hf_model)
