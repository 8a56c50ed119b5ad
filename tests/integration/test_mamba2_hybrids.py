"""The Mamba-2 hybrids of transformers (Mamba-2 layers beside attention and MLPs), loaded from tiny
random ``save_pretrained`` checkpoints: parity with transformers (chunked and recurrent), write
edits against a brute-force recurrence run inside the transformers model, exact causality of an
edit, the state hook, and generation with the recurrent cache.

One row of ``HYBRIDS`` per family: how to build its tiny model, and where its Mamba-2 mixers live.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from random_weights import randomize_
from test_mamba2_parity import explicit_mixer
from transformers import (
    BambaConfig,
    BambaForCausalLM,
    FalconH1Config,
    FalconH1ForCausalLM,
    GraniteMoeHybridConfig,
    GraniteMoeHybridForCausalLM,
    NemotronHConfig,
    NemotronHForCausalLM,
    PreTrainedModel,
    Zamba2Config,
    Zamba2ForCausalLM,
)

from hooked_ssm import HookedSSM, RecurrentState
from hooked_ssm.components.attention import GatedAttention
from hooked_ssm.components.mamba2 import Mamba2Mixer

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, TOL = 300, 1e-4
MAMBA_LAYER = 2  # a Mamba-2 layer after an attention layer (Zamba2: a hybrid layer) in every row


@dataclass(frozen=True)
class Hybrid:
    build: Callable[[], PreTrainedModel]  # a tiny random transformers model
    mixer: Callable[[PreTrainedModel, int], torch.nn.Module]  # its Mamba-2 mixer at a layer
    # What the brute-force recurrence reads of that mixer (in_proj, norm, ...): the mixer itself,
    # or a view that applies the family's extra multipliers the way its transformers mixer does.
    as_mamba2: Callable[[torch.nn.Module], object] = lambda mixer: mixer


def _falcon_as_mamba2(mixer: torch.nn.Module) -> object:
    """Falcon-H1's mixer seen as a plain Mamba-2 mixer: input times ssm_in_multiplier, in_proj rows
    times the muP vector, and its gated norm (or none), exactly as FalconH1Mixer.forward applies them."""
    view = SimpleNamespace(**{name: getattr(mixer, name) for name in (
        "num_heads", "head_dim", "ssm_state_size", "n_groups", "intermediate_size", "conv_dim", "conv1d",
        "dt_bias", "time_step_limit", "A_log", "D", "out_proj")})
    view.in_proj = lambda hidden: mixer.in_proj(hidden * mixer.ssm_in_multiplier) * mixer.mup_vector
    view.norm = mixer.norm if mixer.mamba_rms_norm else (lambda y, gate: y * F.silu(gate))
    return view


def _bamba() -> PreTrainedModel:
    # Two groups, a dt clamp, an attention layer at index 1, chunks of 16 (lengths below cross them).
    cfg = BambaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, attn_layer_indices=[1], mamba_n_heads=8, mamba_d_head=16, mamba_n_groups=2,
        mamba_d_state=16, mamba_chunk_size=16, time_step_limit=(0.0, 0.5), pad_token_id=0, bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    return randomize_(BambaForCausalLM(cfg))


def _granite(**overrides) -> PreTrainedModel:
    # muP multipliers far from 1; four experts, two per token, and an ungated shared expert.
    kwargs = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=32, shared_intermediate_size=48, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, layer_types=["mamba", "attention", "mamba", "mamba"],
        mamba_n_heads=8, mamba_d_head=16, mamba_n_groups=2, mamba_d_state=16, mamba_chunk_size=16,
        num_local_experts=4, num_experts_per_tok=2, embedding_multiplier=3.0, residual_multiplier=0.5,
        attention_multiplier=0.1, logits_scaling=2.0, position_embedding_type="rope", pad_token_id=0,
        bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(0)
    return randomize_(GraniteMoeHybridForCausalLM(GraniteMoeHybridConfig(**{**kwargs, **overrides})))


def _nemotron_h() -> PreTrainedModel:
    # Every layer kind: Mamba-2, attention (no RoPE), relu2 MLP, group-routed MoE (2 groups, 1 eligible).
    cfg = NemotronHConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, layers_block_type=["mamba", "attention", "mamba", "mlp", "moe", "mamba"],
        mamba_num_heads=8, mamba_head_dim=16, n_groups=2, ssm_state_size=16, chunk_size=16, n_routed_experts=4,
        num_experts_per_tok=2, moe_intermediate_size=32, moe_shared_expert_intermediate_size=48, n_group=2,
        topk_group=1, routed_scaling_factor=1.5, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(0)
    model = randomize_(NemotronHForCausalLM(cfg))
    with torch.no_grad():  # a buffer, so randomize_ leaves it at zero
        model.model.layers[4].mixer.gate.e_score_correction_bias.normal_(0, 0.3)
    return model


def _falcon_h1(**overrides) -> PreTrainedModel:
    # Every muP multiplier away from 1 (each folded into a weight by the converter, or kept).
    kwargs = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, mamba_d_ssm=128, mamba_n_heads=8, mamba_d_head=16, mamba_n_groups=2,
        mamba_d_state=16, mamba_chunk_size=16, embedding_multiplier=2.0, lm_head_multiplier=0.5,
        mlp_multipliers=[1.5, 0.7], key_multiplier=0.8, attention_in_multiplier=1.3, attention_out_multiplier=0.6,
        ssm_multipliers=[0.9, 1.1, 0.8, 1.2, 0.7], ssm_in_multiplier=1.4, ssm_out_multiplier=0.5,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(0)
    return randomize_(FalconH1ForCausalLM(FalconH1Config(**{**kwargs, **overrides})))


def _zamba2(**overrides) -> PreTrainedModel:
    # Hybrid layers 1, 2, 4, 5 (a shared transformer feeding the mixer) between plain Mamba-2 layers;
    # one shared block for all four, or two alternating (num_mem_blocks=2); an rms_norm_eps other
    # than the mixer's fixed 1e-5.
    kwargs = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=6,
        layers_block_type=["mamba", "hybrid", "hybrid", "mamba", "hybrid", "hybrid"], num_attention_heads=4,
        num_key_value_heads=2, n_mamba_heads=8, mamba_ngroups=2, mamba_d_state=16, chunk_size=16, adapter_rank=8,
        rms_norm_eps=1e-6, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(0)
    return randomize_(Zamba2ForCausalLM(Zamba2Config(**{**kwargs, **overrides})))


def _zamba2_mixer(hf: PreTrainedModel, layer: int) -> torch.nn.Module:
    decoder = hf.model.layers[layer]
    return getattr(decoder, "mamba_decoder", decoder).mamba


HYBRIDS = {
    "bamba": Hybrid(_bamba, lambda hf, layer: hf.model.layers[layer].mamba),
    "granitemoehybrid": Hybrid(_granite, lambda hf, layer: hf.model.layers[layer].mamba),
    # the dense variant (no experts: the shared MLP alone) without RoPE
    "granitemoehybrid_dense_nope": Hybrid(
        lambda: _granite(num_local_experts=0, position_embedding_type="nope"),
        lambda hf, layer: hf.model.layers[layer].mamba,
    ),
    "nemotron_h": Hybrid(_nemotron_h, lambda hf, layer: hf.model.layers[layer].mixer),
    "falcon_h1": Hybrid(_falcon_h1, lambda hf, layer: hf.model.layers[layer].mamba, _falcon_as_mamba2),
    # the gated RMSNorm variant (norm, then gate)
    "falcon_h1_rmsnorm": Hybrid(
        lambda: _falcon_h1(mamba_rms_norm=True), lambda hf, layer: hf.model.layers[layer].mamba, _falcon_as_mamba2
    ),
    "zamba2": Hybrid(_zamba2, _zamba2_mixer),
    # two shared blocks, LoRA adapters on q/k/v too (they need as many key/value heads as heads), RoPE
    "zamba2_two_blocks": Hybrid(
        lambda: _zamba2(num_mem_blocks=2, use_shared_attention_adapter=True, num_key_value_heads=4, use_mem_rope=True),
        _zamba2_mixer,
    ),
}


@pytest.fixture(scope="module", params=list(HYBRIDS))
def hybrid(request, tmp_path_factory):
    row = HYBRIDS[request.param]
    hf_model = row.build()
    directory = tmp_path_factory.mktemp(request.param)
    hf_model.save_pretrained(directory)
    return request.param, directory, hf_model, row


def _tokens(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _hf_logits(hf_model, tokens):
    with torch.no_grad():
        return hf_model(input_ids=tokens, use_cache=False).logits


def brute_force_logits(hf_model, row, tokens, layer, write_override=None, states=None):
    """transformers' model with its Mamba-2 mixer at ``layer`` recomputed token by token."""
    mixer = row.mixer(hf_model, layer)
    view = row.as_mamba2(mixer)
    mixer.forward = lambda hidden_states, *args, **kwargs: explicit_mixer(view, hidden_states, write_override, states)
    try:
        return _hf_logits(hf_model, tokens)
    finally:
        del mixer.forward


@pytest.mark.parametrize("execution", ["chunked", "recurrent"])
def test_logits_match_transformers(hybrid, execution):
    name, directory, hf_model, _ = hybrid
    model = HookedSSM.from_pretrained(directory, execution=execution)
    assert any(isinstance(module, GatedAttention) for module in model.modules())
    assert isinstance(model.blocks[MAMBA_LAYER].mixer, Mamba2Mixer)
    assert len(model.W_O) == model.cfg.n_layers  # None only for MLP-only layers
    for length in (37, 70):
        tokens = _tokens(2, length, seed=length)
        with torch.no_grad():
            diff = (model(tokens) - _hf_logits(hf_model, tokens)).abs().max().item()
        assert diff <= TOL, f"{name}/{execution}/T={length}: max |logit diff| {diff:.2e}"


def test_brute_force_reference_matches_transformers(hybrid):
    _, _, hf_model, row = hybrid
    tokens = _tokens(2, 37)
    diff = (brute_force_logits(hf_model, row, tokens, MAMBA_LAYER) - _hf_logits(hf_model, tokens)).abs().max().item()
    assert diff <= TOL


@pytest.mark.parametrize("execution", ["chunked", "recurrent"])
def test_write_edit_is_exact_and_causal(hybrid, execution):
    name, directory, hf_model, row = hybrid
    model = HookedSSM.from_pretrained(directory, execution=execution)
    tokens, edits_at = _tokens(2, 70, seed=3), (21, 45)
    gen = torch.Generator().manual_seed(7)
    heads, d_k, d_v = model.cfg.n_heads, model.cfg.d_k, model.cfg.d_v
    replacement = {t: torch.randn(2, heads, d_k, d_v, generator=gen) * 0.5 for t in edits_at}

    def replace_write(write, hook):
        write = write.clone()
        for t, matrix in replacement.items():
            write[:, t] = matrix.flatten(-2)
        return write

    with torch.no_grad():
        clean = model(tokens)
        edited = model.run_with_hooks(tokens, fwd_hooks=[(f"blocks.{MAMBA_LAYER}.mixer.hook_write", replace_write)])
    # transformers' state is [headdim, d_state]: the transpose of ours.
    expected = brute_force_logits(
        hf_model, row, tokens, MAMBA_LAYER, {t: m.transpose(-1, -2) for t, m in replacement.items()}
    )
    diff = (edited - expected).abs().max().item()
    assert diff <= TOL, f"{name}/{execution}: edited logits vs brute force {diff:.2e}"
    first = min(edits_at)
    assert torch.equal(edited[:, :first], clean[:, :first])  # nothing before the edit moves, bit for bit
    assert (edited[:, first] - clean[:, first]).abs().max() > 1e-3  # the edited position does


def test_state_hook_equals_brute_force_states(hybrid):
    _, directory, hf_model, row = hybrid
    model = HookedSSM.from_pretrained(directory)
    tokens, states = _tokens(2, 40, seed=5), {}
    brute_force_logits(hf_model, row, tokens, MAMBA_LAYER, states=states)
    expected = torch.stack([states[t] for t in range(40)], dim=1).transpose(-1, -2).flatten(-2)  # key-major
    name = f"blocks.{MAMBA_LAYER}.mixer.hook_state"
    _, cache = model.run_with_cache(tokens, names_filter=name)
    torch.testing.assert_close(cache[name], expected, atol=1e-5, rtol=1e-5)


def check_generation(model: HookedSSM, hf_model: PreTrainedModel) -> None:
    """Greedy generation with the recurrent cache equals generation without it and transformers'
    own cached ``generate``; a prefill plus single-token steps equals one full forward."""
    tokens = _tokens(2, 20, seed=11)
    kwargs = dict(max_new_tokens=6, do_sample=False, stop_at_eos=False, verbose=False)
    cached = model.generate(tokens, use_past_kv_cache=True, **kwargs)
    assert torch.equal(cached, model.generate(tokens, use_past_kv_cache=False, **kwargs))
    with torch.no_grad():
        reference = hf_model.generate(tokens, max_new_tokens=6, do_sample=False, use_cache=True)
    assert torch.equal(cached, reference)
    state = RecurrentState.empty(model.cfg.layer_types)
    with torch.no_grad():
        full = model(tokens)
        steps = [model(tokens[:, :14], past_state=state)] + [model(tokens[:, t : t + 1], past_state=state)
                                                             for t in range(14, 20)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=TOL, rtol=TOL)


@pytest.mark.parametrize("execution", ["chunked", "recurrent"])
def test_generation_with_the_recurrent_cache(hybrid, execution):
    _, directory, hf_model, _ = hybrid
    check_generation(HookedSSM.from_pretrained(directory, execution=execution), hf_model)
