"""What Zamba2 adds to the Mamba-2 hybrids (whose parity, write edits, state hook and generation
``test_mamba2_hybrids`` checks on its Zamba2 rows): shared transformer blocks stored once, with
hook points per invocation that equal what each of transformers' layers computes, edits of one
invocation that reach nothing before it, state edits (exact, causal), the token embeddings carried past
``start_at_layer``, and padded batches.

The tiny models have hybrid layers 1, 2, 4, 5 (``_zamba2`` of test_mamba2_hybrids).
"""

from __future__ import annotations

import pytest
import torch
from test_mamba2_hybrids import HYBRIDS, TOL, _tokens

from hooked_ssm import HookedSSM
from hooked_ssm.pretrained.zamba2 import convert_state_dict

pytestmark = pytest.mark.usefixtures("one_thread")

HYBRID_LAYERS = (1, 2, 4, 5)


@pytest.fixture(scope="module", params=["zamba2", "zamba2_two_blocks"])
def zamba2(request, tmp_path_factory):
    hf_model = HYBRIDS[request.param].build()
    directory = tmp_path_factory.mktemp(request.param)
    hf_model.save_pretrained(directory)
    return HookedSSM.from_pretrained(directory), hf_model


def _shared_parameters(model: HookedSSM, layer: int) -> dict[str, torch.nn.Parameter]:
    invocation = model.blocks[layer].shared_transformer
    return {name: invocation.get_parameter(name) for name in invocation.shared_parameter_names()}


def test_shared_blocks_are_stored_once(zamba2):
    model, hf_model = zamba2
    n_blocks = model.cfg.n_shared_blocks
    for i, layer in enumerate(HYBRID_LAYERS):
        first = HYBRID_LAYERS[i % n_blocks]  # the first layer that runs this invocation's block
        for name, param in _shared_parameters(model, layer).items():
            assert param is _shared_parameters(model, first)[name], (layer, name)
            if n_blocks > 1:
                assert param is not _shared_parameters(model, HYBRID_LAYERS[(i + 1) % n_blocks])[name]
        own = model.blocks[layer].shared_transformer.mlp.gate_up_proj.adapter[0].weight
        assert all(own is not model.blocks[other].shared_transformer.mlp.gate_up_proj.adapter[0].weight
                   for other in HYBRID_LAYERS if other != layer)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in hf_model.parameters())
    model.to(torch.float64)  # moving the model keeps the ties
    assert _shared_parameters(model, 4)["attn.q_proj.weight"] is _shared_parameters(model, HYBRID_LAYERS[2 % n_blocks])[
        "attn.q_proj.weight"]
    model.to(torch.float32)


def _hf_invocation_outputs(hf_model, tokens) -> dict[tuple[int, str], torch.Tensor]:
    """Per hybrid layer of transformers' model: its attention's output and its ``linear``'s output."""
    captured, handles = {}, []
    for layer in HYBRID_LAYERS:
        decoder = hf_model.model.layers[layer]
        # the attention returns (output, weights); the linear its output
        for name, module in (("attn", decoder.shared_transformer.self_attn), ("out", decoder.linear)):
            def hook(mod, args, out, key=(layer, name)):
                captured[key] = out[0] if isinstance(out, tuple) else out
            handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            hf_model(input_ids=tokens, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return captured


def test_each_invocation_hooks_what_its_layer_computes(zamba2):
    model, hf_model = zamba2
    tokens = _tokens(2, 29, seed=4)
    expected = _hf_invocation_outputs(hf_model, tokens)
    names = [f"blocks.{layer}.shared_transformer.hook_{kind}" for layer in HYBRID_LAYERS for kind in ("attn_out", "out")]
    _, cache = model.run_with_cache(tokens, names_filter=names)
    for layer in HYBRID_LAYERS:
        for kind, key in (("attn_out", "attn"), ("out", "out")):
            torch.testing.assert_close(cache[f"blocks.{layer}.shared_transformer.hook_{kind}"], expected[(layer, key)],
                                       atol=TOL, rtol=TOL)
    # Two invocations of one block see different inputs: their hook points are not one.
    assert (cache["blocks.1.shared_transformer.hook_out"] - cache["blocks.4.shared_transformer.hook_out"]).abs().max() > 1e-3


def test_an_edit_of_one_invocation_matches_transformers_and_moves_nothing_before_it(zamba2):
    model, hf_model = zamba2
    tokens, layer, t = _tokens(2, 33, seed=6), 4, 17
    delta = torch.randn(2, model.cfg.d_model, generator=torch.Generator().manual_seed(1))

    def add_at_t(out: torch.Tensor) -> torch.Tensor:
        out = out.clone()
        out[:, t] += delta
        return out

    names = [f"blocks.{other}.hook_resid_post" for other in range(layer)] + ["blocks.1.shared_transformer.hook_out"]
    with torch.no_grad():
        clean_logits, clean = model.run_with_cache(tokens, names_filter=names)
        with model.hooks(fwd_hooks=[(f"blocks.{layer}.shared_transformer.hook_out", lambda out, hook: add_at_t(out))]):
            edited_logits, edited = model.run_with_cache(tokens, names_filter=names)
        handle = hf_model.model.layers[layer].linear.register_forward_hook(lambda mod, args, out: add_at_t(out))
        try:
            expected = hf_model(input_ids=tokens, use_cache=False).logits
        finally:
            handle.remove()
    assert (edited_logits - expected).abs().max().item() <= TOL
    for name in names:  # the same weights run at layer 1 (and earlier layers) are untouched, bit for bit
        assert torch.equal(edited[name], clean[name]), name
    assert torch.equal(edited_logits[:, :t], clean_logits[:, :t])
    assert (edited_logits[:, t] - clean_logits[:, t]).abs().max() > 1e-3


@pytest.mark.parametrize("execution", ["chunked", "recurrent"])
def test_a_state_edit_moves_its_read_exactly_and_nothing_before_it(zamba2, execution):
    """``hook_state`` replaces: returning ``S_t + E`` at ``t`` moves the read at ``t`` by ``E^T q_t``
    and no other read of the layer; nothing before ``t`` moves anywhere."""
    model, _ = zamba2
    for block in model.blocks:
        block.mixer.execution = execution
    tokens, layer, t = _tokens(2, 40, seed=8), 2, 21
    heads, d_k, d_v = model.cfg.n_heads, model.cfg.d_k, model.cfg.d_v
    edit = torch.randn(2, heads, d_k, d_v, generator=torch.Generator().manual_seed(2)) * 0.5

    def add_at_t(state, hook):
        state = state.clone()
        state[:, t] += edit.flatten(-2)
        return state

    mixer = f"blocks.{layer}.mixer"
    names = [f"{mixer}.hook_q", f"{mixer}.hook_read"]
    try:
        with torch.no_grad():
            clean, before = model.run_with_cache(tokens, names_filter=names)
            with model.hooks(fwd_hooks=[(f"{mixer}.hook_state", add_at_t)]):
                edited, after = model.run_with_cache(tokens, names_filter=names)
    finally:
        for block in model.blocks:
            block.mixer.execution = model.cfg.execution
    expected = before[f"{mixer}.hook_read"].clone()
    expected[:, t] += torch.einsum("bhkv,bhk->bhv", edit, before[f"{mixer}.hook_q"][:, t])
    torch.testing.assert_close(after[f"{mixer}.hook_read"], expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(edited[:, :t], clean[:, :t])
    assert (edited[:, t] - clean[:, t]).abs().max() > 1e-3


def test_start_at_layer_carries_the_token_embeddings(zamba2):
    model, _ = zamba2
    tokens = _tokens(2, 15, seed=9)
    with torch.no_grad():
        full, cache = model.run_with_cache(tokens, names_filter="hook_embed")
        resid = model(tokens, stop_at_layer=3)
        with pytest.raises(ValueError, match="embeddings="):
            model(resid, start_at_layer=3)
        with pytest.raises(ValueError, match="same positions"):
            model(resid, start_at_layer=3, embeddings=cache["hook_embed"][:, 1:])
        split = model(resid, start_at_layer=3, embeddings=cache["hook_embed"])
    torch.testing.assert_close(split, full, atol=1e-5, rtol=1e-5)


def test_a_left_padded_row_equals_the_row_run_alone(zamba2):
    model, _ = zamba2
    tokens = _tokens(2, 16, seed=10)
    mask = torch.ones_like(tokens)
    mask[1, :6] = 0  # row 1: six pads, then ten real tokens
    with torch.no_grad():
        batch = model(tokens, attention_mask=mask)
        alone = model(tokens[1:, 6:])
    torch.testing.assert_close(batch[1, 6:], alone[0], atol=2e-5, rtol=2e-5)


def test_a_state_dict_that_keeps_the_tied_copies_converts_the_same(zamba2):
    """transformers' in-memory state dict lists every layer's copy of the shared blocks (and the tied
    lm_head); the converter takes the first layer's, as transformers ties them, and consumes the rest."""
    model, hf_model = zamba2
    converted = convert_state_dict(hf_model.state_dict(), model.cfg)
    loaded = model.state_dict()
    assert set(converted) == set(loaded) - {"unembed.weight"}  # tied: the loader points it at embed.W_E
    for name, tensor in converted.items():
        assert torch.equal(tensor, loaded[name]), name
