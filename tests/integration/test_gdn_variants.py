"""Gated DeltaNet variants of transformers beyond Qwen3.5 / Qwen3-Next, loaded from tiny random
``save_pretrained`` checkpoints: parity (chunked and recurrent), write edits against the brute-force
per-token rule of test_gdn_hooks run inside the transformers model, exact causality of an edit, and
generation with the recurrent cache (test_mamba2_hybrids' check).

One row of ``VARIANTS`` per family: its tiny model, and the transformers module whose
``torch_chunk_gated_delta_rule`` the brute-force rule replaces.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import pytest
import torch
from random_weights import randomize_
from safetensors.torch import load_file, save_file
from test_gdn_hooks import brute_force_rule
from test_mamba2_hybrids import check_generation
from transformers import (
    LaraMiniConfig,
    LaraMiniForCausalLM,
    OlmoHybridConfig,
    OlmoHybridForCausalLM,
    PreTrainedModel,
    Qwen3_5MoeForCausalLM,
    Qwen3_5MoeTextConfig,
    Qwen4ExpForCausalLM,
    Qwen4ExpTextConfig,
)
from transformers.models.lara_mini import modeling_lara_mini
from transformers.models.olmo_hybrid import modeling_olmo_hybrid
from transformers.models.qwen3_5_moe import modeling_qwen3_5_moe
from transformers.models.qwen4_exp import modeling_qwen4_exp

from hooked_ssm import CheckpointError, HookedSSM, as_flat
from hooked_ssm.state import RecurrentState
from writesae_lens.interventions.engine import stack_states

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, TOL = 300, 1e-4
LAYER, LINEAR_INDEX = 2, 1  # model layer 2 is the second Gated DeltaNet layer of every row


@dataclass(frozen=True)
class Variant:
    build: Callable[[], PreTrainedModel]
    modeling: ModuleType  # where transformers looks up torch_chunk_gated_delta_rule


def _olmo_hybrid(**overrides) -> PreTrainedModel:
    # Grouped keys (2 key heads, 4 value heads), beta in (0, 2), attention between the GDN layers.
    kwargs = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"],
        linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=8,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(0)
    return randomize_(OlmoHybridForCausalLM(OlmoHybridConfig(**{**kwargs, **overrides})))


def _lara_mini() -> PreTrainedModel:
    # Sliding-window attention (window 8, RoPE) and global attention (no RoPE) between the GDN
    # layers; four experts, two per token, and an ungated shared expert everywhere.
    cfg = LaraMiniConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, layer_types=["linear_attention", "sliding_attention", "linear_attention", "full_attention"],
        linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=8,
        moe_intermediate_size=32, shared_expert_intermediate_size=48, num_experts=4, num_experts_per_tok=2,
        sliding_window=8, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(0)
    return randomize_(LaraMiniForCausalLM(cfg))


def _qwen3_5_moe() -> PreTrainedModel:
    # Qwen3.5's hybrid layers with experts in every layer (layer 2 is the second GDN layer, as in every row).
    cfg = Qwen3_5MoeTextConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, layer_types=["linear_attention", "full_attention", "linear_attention", "linear_attention",
                                  "full_attention"],
        linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=8,
        moe_intermediate_size=32, shared_expert_intermediate_size=48, num_experts=4, num_experts_per_tok=2,
        rope_parameters={"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25,
                         "mrope_section": [2, 1, 1], "mrope_interleaved": True},
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(0)
    return randomize_(Qwen3_5MoeForCausalLM(cfg))


def _qwen4_exp() -> PreTrainedModel:
    # Two hyper-connected streams; the GDN's output gate is a sigmoid; the attention layers' QSA
    # indexers keep 2 blocks of 4 tokens (plus the last incomplete block), so they narrow every query
    # past 12 tokens (one attention layer follows layer 2, so edits there reach ragged indexed caches
    # in the intervention engine); experts in every layer; Per-Layer Embeddings (hashed 2- and 3-grams)
    # on both GDN layers, so also on the edited one.
    cfg = Qwen4ExpTextConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, layer_types=["linear_attention", "indexed_attention", "linear_attention", "indexed_attention"],
        linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=8,
        moe_intermediate_size=32, shared_expert_intermediate_size=48, num_experts=4, num_experts_per_tok=2,
        hc_count=2, hc_lowrank=8, output_gate_type="sigmoid",
        ple_layer_ids=[1, 3], ple_embed_dim=32, ngram_size=3, heads_per_ngram=2, ngram_vocab_size_base=50,
        make_ngram_vocab_size_divisible_by=8,
        indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=16, indexer_budget=8, indexer_compress_ratio=4,
        rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5},
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(0)
    return randomize_(Qwen4ExpForCausalLM(cfg))


VARIANTS = {
    "olmo_hybrid": Variant(_olmo_hybrid, modeling_olmo_hybrid),
    "lara_mini": Variant(_lara_mini, modeling_lara_mini),
    "qwen3_5_moe": Variant(_qwen3_5_moe, modeling_qwen3_5_moe),
    "qwen4_exp": Variant(_qwen4_exp, modeling_qwen4_exp),
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request, tmp_path_factory):
    row = VARIANTS[request.param]
    hf_model = row.build()
    directory = tmp_path_factory.mktemp(request.param)
    hf_model.save_pretrained(directory)
    return request.param, directory, hf_model, row


def _tokens(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _hf_logits(hf_model, tokens):
    with torch.no_grad():
        return hf_model(input_ids=tokens, use_cache=False).logits


@pytest.mark.parametrize("execution", ["chunked", "recurrent"])
def test_logits_match_transformers(variant, execution):
    name, directory, hf_model, _ = variant
    model = HookedSSM.from_pretrained(directory, execution=execution)
    for length in (37, 90):  # one chunk, and two (chunks of 64)
        tokens = _tokens(2, length, seed=length)
        with torch.no_grad():
            diff = (model(tokens) - _hf_logits(hf_model, tokens)).abs().max().item()
        assert diff <= TOL, f"{name}/{execution}/T={length}: max |logit diff| {diff:.2e}"


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_matches_transformers(variant, side):
    """Pads (one row padded by 7) write nothing and are seen by no real token, as in transformers;
    Qwen4-Exp's indexer cuts each row's real tokens into blocks."""
    name, directory, hf_model, _ = variant
    model = HookedSSM.from_pretrained(directory)
    tokens = _tokens(2, 40, seed=6)
    mask = torch.ones_like(tokens)
    mask[0, :7] = 0 if side == "left" else 1
    mask[0, -7:] = 0 if side == "right" else 1
    with torch.no_grad():
        expected = hf_model(input_ids=tokens, attention_mask=mask, use_cache=False).logits
        diff = (model(tokens, attention_mask=mask) - expected)[mask.bool()].abs().max().item()
    assert diff <= TOL, f"{name}/{side} padding: max |logit diff| {diff:.2e}"


def test_beta_range(variant):
    """OLMo-Hybrid's allow_neg_eigval: beta = 2 sigmoid(b) in (0, 2), seen as such by hook_beta;
    (0, 1) elsewhere."""
    _, directory, hf_model, _ = variant
    model = HookedSSM.from_pretrained(directory)
    _, cache = model.run_with_cache(_tokens(2, 40), names_filter=f"blocks.{LAYER}.mixer.hook_beta")
    beta = cache[f"blocks.{LAYER}.mixer.hook_beta"]
    top = 2.0 if getattr(hf_model.config, "linear_allow_neg_eigval", False) else 1.0
    assert top / 2 < beta.max() < top and beta.min() > 0


@pytest.mark.parametrize("execution", ["chunked", "recurrent"])
def test_write_edit_is_exact_and_causal(variant, execution, monkeypatch):
    name, directory, hf_model, row = variant
    model = HookedSSM.from_pretrained(directory, execution=execution)
    tokens, t, head = _tokens(2, 90, seed=3), 70, 1
    replacement = torch.randn(model.cfg.d_k, model.cfg.d_v, generator=torch.Generator().manual_seed(0))

    def replace_write(write, hook):
        write = write.clone()
        write[:, t, head] = as_flat(replacement)
        return write

    with torch.no_grad():
        clean = model(tokens)
        edited = model.run_with_hooks(tokens, fwd_hooks=[(f"blocks.{LAYER}.mixer.hook_write", replace_write)])
    monkeypatch.setattr(row.modeling, "torch_chunk_gated_delta_rule",
                        brute_force_rule({LINEAR_INDEX: {"write": (t, head, replacement)}}))
    diff = (edited - _hf_logits(hf_model, tokens)).abs().max().item()
    assert diff <= TOL, f"{name}/{execution}: edited logits vs brute force {diff:.2e}"
    assert torch.equal(edited[:, :t], clean[:, :t])  # nothing before the edit moves, bit for bit
    assert (edited[:, t:] - clean[:, t:]).abs().max() > 1e-3


@pytest.mark.parametrize("execution", ["chunked", "recurrent"])
def test_generation_with_the_recurrent_cache(variant, execution):
    _, directory, hf_model, _ = variant
    check_generation(HookedSSM.from_pretrained(directory, execution=execution), hf_model)


@pytest.mark.parametrize("execution", ["chunked", "recurrent"])
def test_state_edit_reads_back_exactly_and_is_causal(variant, execution):
    """``hook_state`` at one selected position returning ``S_t + E`` (one head): that position's read
    moves by exactly ``E^T q_t``, nothing before it moves (bit for bit), later positions read the
    recurrence continued from the edited state."""
    name, directory, _, _ = variant
    model = HookedSSM.from_pretrained(directory, execution=execution)
    tokens, t, head = _tokens(2, 90, seed=4), 70, 1
    edit = torch.randn(model.cfg.d_k, model.cfg.d_v, generator=torch.Generator().manual_seed(1))
    mixer = f"blocks.{LAYER}.mixer"

    def add_edit(states, hook):
        states = states.clone()
        states[:, 0, head] += as_flat(edit)
        return states

    with torch.no_grad():
        clean, cache = model.run_with_cache(tokens, names_filter=[f"{mixer}.hook_q", f"{mixer}.hook_read"])
        reads = {}
        keep = lambda act, hook: reads.__setitem__("read", act.clone())  # noqa: E731
        edited = model.run_with_hooks(tokens, state_positions=[t],
                                      fwd_hooks=[(f"{mixer}.hook_state", add_edit), (f"{mixer}.hook_read", keep)])
    moved = reads["read"][:, t, head] - cache[f"{mixer}.hook_read"][:, t, head]
    expected = cache[f"{mixer}.hook_q"][:, t, head] @ edit
    assert (moved - expected).abs().max() <= TOL, f"{name}/{execution}: read-back {(moved - expected).abs().max():.2e}"
    assert torch.equal(edited[:, :t], clean[:, :t])
    assert (edited[:, t + 1 :] - clean[:, t + 1 :]).abs().max() > 1e-4  # the edit persists in the recurrence


def test_rows_of_different_lengths_continue_in_one_batch(variant):
    """States of prefixes of different lengths, stacked (ragged attention caches, as the intervention
    engine builds them) and continued in two calls, give each row's logits of one full forward."""
    name, directory, _, _ = variant
    model = HookedSSM.from_pretrained(directory)
    if name == "lara_mini":  # its sliding-window attention refuses ragged caches, with a clear error
        with pytest.raises(ValueError, match="Sliding-window attention does not support ragged caches"):
            check_rows_of_different_lengths(model, _tokens(2, 40, seed=7))
        return
    check_rows_of_different_lengths(model, _tokens(2, 40, seed=7))


def check_rows_of_different_lengths(model: HookedSSM, tokens: torch.Tensor, prefixes: tuple[int, int] = (3, 21)) -> None:
    """Each row's prefix run alone, the states stacked (ragged), continued in two calls of 9 and 6
    tokens: each row's logits of one full forward."""
    states = [RecurrentState.empty(model.cfg.layer_types) for _ in prefixes]
    with torch.no_grad():
        full = model(tokens)
        for row, (state, n) in enumerate(zip(states, prefixes)):
            model(tokens[row : row + 1, :n], past_state=state)
        stacked = stack_states(states)
        steps = [model(torch.stack([tokens[row, n + start : n + start + size] for row, n in enumerate(prefixes)]),
                       past_state=stacked) for start, size in ((0, 9), (9, 6))]
    continued = torch.cat(steps, dim=1)
    for row, n in enumerate(prefixes):
        diff = (continued[row] - full[row, n : n + 15]).abs().max().item()
        assert diff <= TOL, f"row {row} continued from {n} tokens differs by {diff:.2e}"


def test_ngrams_restart_after_eos(tmp_path):
    """Qwen4-Exp's Per-Layer Embeddings hash no n-gram across an EOS: with EOS tokens inside the rows,
    logits match transformers, in one forward and in single-token steps across the EOS."""
    hf_model, directory = VARIANTS["qwen4_exp"].build(), tmp_path
    hf_model.save_pretrained(directory)
    model = HookedSSM.from_pretrained(directory)
    tokens = _tokens(2, 30, seed=8)
    tokens[0, [5, 17]] = tokens[1, 20] = hf_model.config.eos_token_id
    state = RecurrentState.empty(model.cfg.layer_types)
    with torch.no_grad():
        full = model(tokens)
        steps = torch.cat([model(tokens[:, :16], past_state=state)]
                          + [model(tokens[:, t : t + 1], past_state=state) for t in range(16, 30)], dim=1)
    assert (full - _hf_logits(hf_model, tokens)).abs().max() <= TOL
    assert (steps - full).abs().max() <= TOL


def test_qwen4_exp_errors_name_the_problem(tmp_path):
    """A missing n-gram table shard fails the load (naming the shards, or the table's size when the
    last one is missing); starting past the embedding
    without the token ids a Per-Layer Embedding reads asks for ``tokens=``."""
    VARIANTS["qwen4_exp"].build().save_pretrained(tmp_path)
    model = HookedSSM.from_pretrained(tmp_path)
    tokens = _tokens(1, 12)
    with torch.no_grad():
        resid = model(tokens, stop_at_layer=2)
        with pytest.raises(ValueError, match="pass tokens="):
            model(resid, start_at_layer=2)
        torch.testing.assert_close(model(resid, start_at_layer=2, tokens=tokens), model(tokens), atol=0, rtol=0)

    state = load_file(tmp_path / "model.safetensors")
    table = "model.layers.2.ple.ple_embedding.ngram_embedding"
    last = max(int(key.removeprefix(f"{table}.shard_").removesuffix(".weight")) for key in state if key.startswith(table))
    for shard, error in ((last, "do not fit its config"), (3, "missing shards")):  # the last one: no gap
        del state[f"{table}.shard_{shard}.weight"]
        save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
        with pytest.raises(CheckpointError, match=error):
            HookedSSM.from_pretrained(tmp_path)
