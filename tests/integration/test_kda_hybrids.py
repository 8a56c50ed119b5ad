"""The Kimi Delta Attention hybrids of transformers (Kimi Linear; BailingHybrid, Ling 3: full-rank
gates, bounded forget gate, latent attention with RoPE and a head gate; Glm5Next, GLM-5.3-Flash:
bounded forget gate, manifold hyper-connections, latent attention narrowed by a k-pool indexer,
clipped SwiGLUs; the text model of ``Glm5NextForConditionalGeneration``), from tiny random
``save_pretrained`` checkpoints: parity with transformers (chunked and recurrent), write edits and
states against a brute-force per-token KDA run inside the transformers model, exact causality,
and generation with the recurrent cache. One row of ``HYBRIDS`` per family."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import pytest
import torch
from safetensors.torch import load_file, save_file
from random_weights import randomize_
from test_gdn_variants import check_rows_of_different_lengths
from test_mamba2_hybrids import check_generation
from transformers import (
    BailingHybridConfig,
    BailingHybridForCausalLM,
    Glm5NextConfig,
    Glm5NextForConditionalGeneration,
    KimiLinearConfig,
    KimiLinearForCausalLM,
    PreTrainedModel,
)
from transformers.models.bailing_hybrid import modeling_bailing_hybrid
from transformers.models.glm5_next import modeling_glm5_next
from transformers.models.kimi_linear import modeling_kimi_linear

from hooked_ssm import CheckpointError, HookedSSM, as_flat
from hooked_ssm.state import RecurrentState

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


def glm5_next_config(**overrides) -> Glm5NextConfig:
    """Three KDA layers (low-rank gates, the bounded gate), then latent attention without RoPE whose
    indexer keeps 2 pools of 4 tokens plus the tail; three hyper-connection streams. A one-layer vision
    tower, as the model class needs one (no image is passed)."""
    text = {key: value for key, value in COMMON.items() if key not in ("num_experts", "qk_rope_head_dim")}
    text.update(n_routed_experts=4, qk_rope_head_dim=0, linear_head_dim=16, linear_num_heads=4,
                index_topk=8, index_head_dim=8, index_n_heads=2, index_kpool=4, hc_mult=3, hc_sinkhorn_iters=5,
                layer_types=["linear_attention"] * 3 + ["indexed_attention"],
                mlp_layer_types=["dense", "sparse", "sparse", "dense"])
    vision = dict(depth=1, hidden_size=16, num_heads=2, intermediate_size=16, out_hidden_size=64,
                  projection_intermediate_size=16, patch_size=2, image_size=8)
    return Glm5NextConfig(text_config={**text, **overrides}, vision_config=vision)


def build_glm5_next(**overrides) -> Glm5NextForConditionalGeneration:
    torch.manual_seed(0)
    model = randomize_(Glm5NextForConditionalGeneration(glm5_next_config(**overrides)))
    with torch.no_grad():  # the bounded gate log a = -5 sigmoid(exp(A_log) f), channels at different rates
        for layer in model.model.language_model.layers:
            if hasattr(layer.self_attn, "forget_gate"):
                layer.self_attn.forget_gate.A_log.fill_(0.0)
                layer.self_attn.forget_gate.dt_bias.copy_(torch.linspace(-6.0, -1.0, 64))
    return model


@dataclass(frozen=True)
class Hybrid:
    build: Callable[..., PreTrainedModel]
    modeling: ModuleType  # where transformers looks up its chunk / recurrent KDA functions
    attention: str = "LatentAttention"  # the class of the last layer
    full_rank_query: bool = True  # whether transformers allows q_lora_rank=None (GLM-5.3's indexer reads the latent)
    # Whether the logits are independent of the batch's layout: a left-padded row equals the row alone,
    # a prefill plus single-token steps the full forward. Not with GLM-5.3's indexer: pools whose
    # scores tie (all heads' relu at 0) are picked by topk in an order that depends on the row of pools
    # (those of the longest row, those of the tokens so far), in transformers as here.
    layout_invariant: bool = True


HYBRIDS = {
    "kimi_linear": Hybrid(build_kimi_linear, modeling_kimi_linear),
    "bailing_hybrid": Hybrid(build_bailing_hybrid, modeling_bailing_hybrid),
    "glm5_next": Hybrid(build_glm5_next, modeling_glm5_next, "IndexedLatentAttention", full_rank_query=False,
                        layout_invariant=False),
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
        "KimiDeltaAttentionMixer"] * 3 + [row.attention]
    for length in (37, 90):  # one chunk, and two (chunks of 64)
        tokens = _tokens(2, length, seed=length)
        with torch.no_grad():
            diff = (model(tokens) - hf_model(input_ids=tokens, use_cache=False).logits).abs().max().item()
        assert diff <= TOL, f"{execution}/T={length}: max |logit diff| {diff:.2e}"


def test_full_rank_query_and_biases(hybrid, tmp_path):
    """Latent attention without the low-rank query (where transformers allows it), with projection biases."""
    row = hybrid[2]
    hf_model = row.build(q_lora_rank=None, attention_bias=True) if row.full_rank_query else row.build(attention_bias=True)
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


def test_glm5_next_swiglu_limit(tmp_path):
    """GLM-5.3's SwiGLU clipping (the gate before its activation; dense MLPs, routed and shared experts)."""
    hf_model = build_glm5_next(swiglu_limit=0.05)
    hf_model.save_pretrained(tmp_path)
    model = HookedSSM.from_pretrained(tmp_path)
    tokens = _tokens(2, 30)
    with torch.no_grad():
        expected = hf_model(input_ids=tokens, use_cache=False).logits
        unclipped = build_glm5_next()(input_ids=tokens, use_cache=False).logits
        assert (model(tokens) - expected).abs().max() <= TOL
        assert (unclipped - expected).abs().max() > 1e-3


def test_glm5_next_indexer_narrows_the_attention(tmp_path):
    """At 90 tokens each late query sees 2 pools of 4 plus its incomplete pool (so the parity tests
    check the selection), and a budget covering every token changes the logits."""
    hf_model = build_glm5_next()
    hf_model.save_pretrained(tmp_path)
    model = HookedSSM.from_pretrained(tmp_path)
    tokens = _tokens(2, 90, seed=2)
    name = "blocks.3.attn.indexer.hook_selected"
    _, cache = model.run_with_cache(tokens, names_filter=name)
    seen = cache[name].sum(-1)
    assert seen[:, 40:].max() <= 8 + 3 and seen[:, 40:].min() >= 8
    wide = build_glm5_next(index_topk=96)
    with torch.no_grad():
        assert (wide(input_ids=tokens, use_cache=False).logits - hf_model(input_ids=tokens, use_cache=False).logits
                ).abs().max() > 1e-3


def test_glm5_next_rows_of_different_lengths_continue_in_one_batch(tmp_path):
    """States of prefixes of different lengths, stacked (ragged caches with empty slots between a row's
    prefix and its next tokens, as the intervention engine builds them) and continued in two calls, give
    each row's logits of one full forward: the indexer pools a row's real slots in order. (16 indexer
    heads, so no two pools' scores tie at 0 and the selection does not depend on the layout.)"""
    build_glm5_next(index_n_heads=16).save_pretrained(tmp_path)
    check_rows_of_different_lengths(HookedSSM.from_pretrained(tmp_path), _tokens(2, 40, seed=7))


def test_glm5_next_multi_token_prediction_layer_is_dropped(tmp_path):
    """Checkpoints store a multi-token-prediction layer after the decoder (``layers.{n_layers}``, with a
    ``shared_head``); transformers drops it, and so does the converter (other stray tensors still fail)."""
    hf_model = build_glm5_next()
    hf_model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    weights["model.language_model.layers.4.self_attn.q_proj.weight"] = torch.zeros(4, 4)
    weights["model.language_model.layers.4.shared_head.head.weight"] = torch.zeros(4, 4)
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    tokens = _tokens(1, 12)
    with torch.no_grad():
        assert (HookedSSM.from_pretrained(tmp_path)(tokens) - hf_model(input_ids=tokens).logits).abs().max() <= TOL
    weights["model.language_model.layers.0.stray.weight"] = torch.zeros(4)
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="stray"):
        HookedSSM.from_pretrained(tmp_path)


def test_glm5_next_shared_indexer_layers_are_refused(tmp_path):
    config = glm5_next_config(num_hidden_layers=5, layer_types=["linear_attention"] * 3 + ["indexed_attention"] * 2,
                              mlp_layer_types=["dense"] * 5, indexer_types=["full"] * 4 + ["shared"])
    Glm5NextForConditionalGeneration(config).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="indexer selection"):
        HookedSSM.from_pretrained(tmp_path)


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
    if hf_model.config.model_type == "glm5_next":  # the same bound (linear_lower_bound)
        assert decay.min() > torch.tensor(hf_model.config.get_text_config().linear_lower_bound).exp()


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
    directory, hf_model, row = hybrid
    model = HookedSSM.from_pretrained(directory)
    tokens, pads = _tokens(2, 40, seed=8), 9
    mask = torch.ones_like(tokens)
    mask[1, :pads] = 0
    with torch.no_grad():
        padded = model(tokens, attention_mask=mask)
        alone = model(tokens[1:, pads:])
        reference = hf_model(input_ids=tokens, attention_mask=mask, use_cache=False).logits
    if row.layout_invariant:
        torch.testing.assert_close(padded[1, pads:], alone[0], atol=TOL, rtol=0)
    assert (padded[:, pads:] - reference[:, pads:]).abs().max() <= TOL
    assert (padded[0] - reference[0]).abs().max() <= TOL


@pytest.mark.parametrize("execution", ["chunked", "recurrent"])
def test_generation_with_the_recurrent_cache(hybrid, execution):
    directory, hf_model, row = hybrid
    model = HookedSSM.from_pretrained(directory, execution=execution)
    if row.layout_invariant:
        check_generation(model, hf_model)
        return
    # Greedy generation with the recurrent cache equals transformers' cached generate, and a prefill plus
    # single-token steps gives the logits of transformers' prefill plus steps with its cache.
    tokens = _tokens(2, 20, seed=11)
    generated = model.generate(tokens, max_new_tokens=6, do_sample=False, stop_at_eos=False, verbose=False,
                               use_past_kv_cache=True)
    with torch.no_grad():
        assert torch.equal(generated, hf_model.generate(tokens, max_new_tokens=6, do_sample=False, use_cache=True))
        state = RecurrentState.empty(model.cfg.layer_types)
        ours = [model(tokens[:, :14], past_state=state)] + [model(tokens[:, t : t + 1], past_state=state)
                                                           for t in range(14, 20)]
        out = hf_model(input_ids=tokens[:, :14], use_cache=True)
        theirs = [out.logits]
        for t in range(14, 20):
            out = hf_model(input_ids=tokens[:, t : t + 1], cache=out.cache, use_cache=True)
            theirs.append(out.logits)
    assert (torch.cat(ours, dim=1) - torch.cat(theirs, dim=1)).abs().max() <= TOL
