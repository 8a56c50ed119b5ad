"""The Kimi Delta Attention hybrids of transformers (Kimi Linear; BailingHybrid, Ling 3: full-rank
gates, bounded forget gate, latent attention with RoPE and a head gate), from tiny random
``save_pretrained`` checkpoints: parity with transformers (chunked and recurrent), write edits and
states against a brute-force per-token KDA run inside the transformers model, exact causality,
and generation with the recurrent cache. One row of ``HYBRIDS`` per family."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import pytest
import torch
from random_weights import randomize_
from test_mamba2_hybrids import check_generation
from transformers import (
    BailingHybridConfig,
    BailingHybridForCausalLM,
    KimiLinearConfig,
    KimiLinearForCausalLM,
    PreTrainedModel,
)
from transformers.models.bailing_hybrid import modeling_bailing_hybrid
from transformers.models.kimi_linear import modeling_kimi_linear

from hooked_ssm import HookedSSM, as_flat

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, TOL = 300, 1e-4
LAYER, KDA_CALL = 2, 2  # model layer 2 is the third Kimi Delta Attention layer of every row (calls count from 0)
# Three KDA layers, then latent attention (low-rank query) after them; dense and sparse MLPs,
# experts in two groups (one eligible per token).
COMMON = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=4, q_lora_rank=24, kv_lora_rank=16, qk_rope_head_dim=8,
    qk_nope_head_dim=16, v_head_dim=12, num_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1,
    pad_token_id=0, bos_token_id=1, eos_token_id=2,
)


def build_kimi_linear(**overrides) -> KimiLinearForCausalLM:
    kwargs = dict(**COMMON, linear_head_dim=16, linear_num_heads=4,
                  layer_types=["linear_attention", "linear_attention", "linear_attention", "full_attention"],
                  mlp_layer_types=["dense", "sparse", "sparse", "dense"])
    torch.manual_seed(0)
    model = randomize_(KimiLinearForCausalLM(KimiLinearConfig(**{**kwargs, **overrides})))
    with torch.no_grad():  # slower forget gates than the init's, so states carry over several chunks
        for layer in model.model.layers:
            if hasattr(layer.self_attn, "forget_gate"):
                layer.self_attn.forget_gate.A_log.sub_(2.0)
    return model


def build_bailing_hybrid(**overrides) -> BailingHybridForCausalLM:
    # The bounded gate log a = -5 sigmoid(exp(A_log) f): dt_bias spread so channels decay at different rates.
    kwargs = dict(**COMMON, head_dim=16, layer_group_size=4, first_k_dense_replace=1, rope_theta=1e4)
    torch.manual_seed(0)
    model = randomize_(BailingHybridForCausalLM(BailingHybridConfig(**{**kwargs, **overrides})))
    with torch.no_grad():
        for layer in model.model.layers:
            if hasattr(layer.self_attn, "forget_gate"):
                layer.self_attn.forget_gate.A_log.fill_(0.0)
                layer.self_attn.forget_gate.dt_bias.copy_(torch.linspace(-6.0, -1.0, 64))
    return model


@dataclass(frozen=True)
class Hybrid:
    build: Callable[..., PreTrainedModel]
    modeling: ModuleType  # where transformers looks up its chunk / recurrent KDA functions


HYBRIDS = {
    "kimi_linear": Hybrid(build_kimi_linear, modeling_kimi_linear),
    "bailing_hybrid": Hybrid(build_bailing_hybrid, modeling_bailing_hybrid),
}


@pytest.fixture(scope="module", params=list(HYBRIDS))
def hybrid(request, tmp_path_factory):
    row = HYBRIDS[request.param]
    hf_model = row.build()
    directory = tmp_path_factory.mktemp(request.param)
    hf_model.save_pretrained(directory)
    return directory, hf_model, row


def _tokens(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def brute_force_kda(write_override=None, states=None, delta_v_override=None):
    """A drop-in for transformers' chunk / recurrent KDA that runs the rule token by token and head by
    head, from the formula: ``S_t = (I - b k k^T) diag(a_t) S_{t-1} + b k v^T``, ``o_t = S_t^T q_t``.

    ``write_override``: ``{t: [batch, head, d_k, d_v]}`` replaces the write ``b_t k_t v_t^T`` of call
    ``KDA_CALL`` (key-major); ``delta_v_override``: ``{t: [batch, head, d_v]}`` replaces the delta-form
    value ``u_t`` (``S_t = A_t S_{t-1} + k_t u_t^T``); ``states``: filled with that call's ``S_t``.
    """
    calls = iter(range(1000))

    def rule(query, key, value, g, beta, initial_state=None, output_final_state=False,
             use_qk_l2norm_in_kernel=False, **_):
        call = next(calls)
        q, k, v, g, beta = (x.double() for x in (query, key, value, g, beta))
        q = q / torch.sqrt((q * q).sum(-1, keepdim=True) + 1e-6) * q.shape[-1] ** -0.5
        k = k / torch.sqrt((k * k).sum(-1, keepdim=True) + 1e-6)
        batch, length, heads, d_k = k.shape
        state = torch.zeros(batch, heads, d_k, v.shape[-1], dtype=torch.float64)
        if initial_state is not None:
            state = initial_state.double()
        eye = torch.eye(d_k, dtype=torch.float64)
        outputs = []
        for t in range(length):
            new = []
            for h in range(heads):
                kt, bt = k[:, t, h], beta[:, t, h, None, None]
                erase = eye - bt * kt[:, :, None] * kt[:, None, :]
                write = bt * kt[:, :, None] * v[:, t, h, None, :]
                if call == KDA_CALL and write_override is not None and t in write_override:
                    write = write_override[t][:, h].double()
                decayed = g[:, t, h].exp()[:, :, None] * state[:, h]
                if call == KDA_CALL and delta_v_override is not None and t in delta_v_override:
                    new.append(decayed + kt[:, :, None] * delta_v_override[t][:, h, None, :].double())
                else:
                    new.append(erase @ decayed + write)
            state = torch.stack(new, dim=1)
            if call == KDA_CALL and states is not None:
                states[t] = state
            outputs.append(torch.einsum("bhkv,bhk->bhv", state, q[:, t]))
        o = torch.stack(outputs, dim=1).to(query.dtype)
        return o, state.float() if output_final_state else None

    return rule


def brute_force_logits(
    hf_model, row, tokens, monkeypatch, write_override=None, states=None, delta_v_override=None
):
    rule = brute_force_kda(write_override, states, delta_v_override)
    with monkeypatch.context() as patch:
        patch.setattr(row.modeling, "chunk_kimi_delta_attention", rule)
        patch.setattr(row.modeling, "recurrent_kimi_delta_attention", rule)
        with torch.no_grad():
            return hf_model(input_ids=tokens, use_cache=False).logits


@pytest.mark.parametrize("execution", ["chunked", "recurrent"])
def test_logits_match_transformers(hybrid, execution):
    directory, hf_model, row = hybrid
    model = HookedSSM.from_pretrained(directory, execution=execution)
    assert [type(block.mixer if hasattr(block, "mixer") else block.attn).__name__ for block in model.blocks] == [
        "KimiDeltaAttentionMixer"] * 3 + ["LatentAttention"]
    for length in (37, 90):  # one chunk, and two (chunks of 64)
        tokens = _tokens(2, length, seed=length)
        with torch.no_grad():
            diff = (model(tokens) - hf_model(input_ids=tokens, use_cache=False).logits).abs().max().item()
        assert diff <= TOL, f"{execution}/T={length}: max |logit diff| {diff:.2e}"


def test_full_rank_query_and_biases(hybrid, tmp_path):
    """Latent attention without the low-rank query, with projection biases."""
    hf_model = hybrid[2].build(q_lora_rank=None, attention_bias=True)
    hf_model.save_pretrained(tmp_path)
    model = HookedSSM.from_pretrained(tmp_path)
    tokens = _tokens(2, 30)
    with torch.no_grad():
        diff = (model(tokens) - hf_model(input_ids=tokens, use_cache=False).logits).abs().max().item()
    assert diff <= TOL


def test_swiglu_limits(tmp_path):
    """BailingHybrid's clipped SwiGLU in the routed and shared experts (limits small enough to clip)."""
    hf_model = build_bailing_hybrid(swiglu_limits=[0, 0.05, 0.1, 0], swiglu_limits_shared=[0, 0.1, 0, 0.05])
    hf_model.save_pretrained(tmp_path)
    model = HookedSSM.from_pretrained(tmp_path)
    tokens = _tokens(2, 30)
    with torch.no_grad():
        expected = hf_model(input_ids=tokens, use_cache=False).logits
        unclipped = build_bailing_hybrid()(input_ids=tokens, use_cache=False).logits  # the same weights
        assert (model(tokens) - expected).abs().max() <= TOL
        assert (unclipped - expected).abs().max() > 1e-3  # the limits clip something


def test_brute_force_reference_matches_transformers(hybrid, monkeypatch):
    _, hf_model, row = hybrid
    tokens = _tokens(2, 37)
    with torch.no_grad():
        expected = hf_model(input_ids=tokens, use_cache=False).logits
    assert (brute_force_logits(hf_model, row, tokens, monkeypatch) - expected).abs().max() <= TOL


def test_decay_is_per_channel(hybrid):
    directory, hf_model, _ = hybrid
    model = HookedSSM.from_pretrained(directory)
    name = f"blocks.{LAYER}.mixer.hook_decay"
    _, cache = model.run_with_cache(_tokens(2, 20), names_filter=name)
    decay = cache[name]
    assert decay.shape == (2, 20, model.cfg.n_heads, model.cfg.d_k)
    assert 0 < decay.min() and decay.max() <= 1
    assert (decay.std(dim=-1) > 1e-3).all()  # the channels of a head decay differently
    if getattr(hf_model.config, "kda_safe_gate", False):  # BailingHybrid's bounded gate: log a in (lower_bound, 0)
        assert decay.min() > torch.tensor(hf_model.config.kda_lower_bound).exp()


@pytest.mark.parametrize("execution", ["chunked", "recurrent"])
def test_write_edit_is_exact_and_causal(hybrid, execution, monkeypatch):
    directory, hf_model, row = hybrid
    model = HookedSSM.from_pretrained(directory, execution=execution)
    tokens, edits_at = _tokens(2, 90, seed=3), (21, 70)
    gen = torch.Generator().manual_seed(7)
    replacement = {t: torch.randn(2, model.cfg.n_heads, model.cfg.d_k, model.cfg.d_v, generator=gen) for t in edits_at}

    def replace_write(write, hook):
        write = write.clone()
        for t, matrix in replacement.items():
            write[:, t] = as_flat(matrix)
        return write

    with torch.no_grad():
        clean = model(tokens)
        edited = model.run_with_hooks(tokens, fwd_hooks=[(f"blocks.{LAYER}.mixer.hook_write", replace_write)])
    diff = (edited - brute_force_logits(hf_model, row, tokens, monkeypatch, replacement)).abs().max().item()
    assert diff <= TOL, f"{execution}: edited logits vs brute force {diff:.2e}"
    first = min(edits_at)
    assert torch.equal(edited[:, :first], clean[:, :first])  # nothing before the edit moves, bit for bit
    assert (edited[:, first] - clean[:, first]).abs().max() > 1e-3


def test_delta_v_edit_is_exact_and_causal(hybrid, monkeypatch):
    """hook_delta_v (u_t, the value the delta rule writes after the per-channel decay) replaced at one
    position equals the brute-force rule with that u_t (later u are recomputed from the edited state)."""
    directory, hf_model, row = hybrid
    model = HookedSSM.from_pretrained(directory)
    tokens, edits_at = _tokens(2, 90, seed=4), (30,)
    gen = torch.Generator().manual_seed(9)
    replacement = {t: torch.randn(2, model.cfg.n_heads, model.cfg.d_v, generator=gen) for t in edits_at}

    def replace_delta_v(delta_v, hook):
        delta_v = delta_v.clone()
        for t, u in replacement.items():
            delta_v[:, t] = u
        return delta_v

    with torch.no_grad():
        clean = model(tokens)
        edited = model.run_with_hooks(tokens, fwd_hooks=[(f"blocks.{LAYER}.mixer.hook_delta_v", replace_delta_v)])
    expected = brute_force_logits(hf_model, row, tokens, monkeypatch, delta_v_override=replacement)
    assert (edited - expected).abs().max() <= TOL
    assert torch.equal(edited[:, :30], clean[:, :30]) and (edited[:, 30] - clean[:, 30]).abs().max() > 1e-3


@pytest.mark.parametrize("execution", ["chunked", "recurrent"])
def test_state_hook_equals_brute_force_states(hybrid, execution, monkeypatch):
    directory, hf_model, row = hybrid
    model = HookedSSM.from_pretrained(directory, execution=execution)
    tokens, states = _tokens(2, 75, seed=5), {}
    brute_force_logits(hf_model, row, tokens, monkeypatch, states=states)
    expected = torch.stack([states[t] for t in range(75)], dim=1).flatten(-2).float()
    name = f"blocks.{LAYER}.mixer.hook_state"
    _, cache = model.run_with_cache(tokens, names_filter=name)
    torch.testing.assert_close(cache[name], expected, atol=1e-5, rtol=1e-5)


def test_left_padded_row_equals_the_row_alone_and_transformers(hybrid):
    """Pads are identity steps of KDA and invisible to the latent attention: a left-padded row gives
    the logits of the row run alone, and those of transformers on the padded batch."""
    directory, hf_model, _ = hybrid
    model = HookedSSM.from_pretrained(directory)
    tokens, pads = _tokens(2, 40, seed=8), 9
    mask = torch.ones_like(tokens)
    mask[1, :pads] = 0
    with torch.no_grad():
        padded = model(tokens, attention_mask=mask)
        alone = model(tokens[1:, pads:])
        reference = hf_model(input_ids=tokens, attention_mask=mask, use_cache=False).logits
    torch.testing.assert_close(padded[1, pads:], alone[0], atol=TOL, rtol=0)
    assert (padded[:, pads:] - reference[:, pads:]).abs().max() <= TOL
    assert (padded[0] - reference[0]).abs().max() <= TOL


@pytest.mark.parametrize("execution", ["chunked", "recurrent"])
def test_generation_with_the_recurrent_cache(hybrid, execution):
    directory, hf_model, row = hybrid
    check_generation(HookedSSM.from_pretrained(directory, execution=execution), hf_model)
