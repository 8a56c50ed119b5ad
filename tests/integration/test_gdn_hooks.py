"""Hook semantics of the Gated DeltaNet mixer, checked against the transformers model.

Edits are checked against a brute-force reference: the transformers model with its gated delta
rule replaced by an explicit per-token matrix loop (written here, independent of hooked_ssm) that
applies the same edit.
"""

import pytest
import torch
from transformers.models.qwen3_5 import modeling_qwen3_5

import hooked_ssm.ops.gated_delta_rule as gdr_ops
from hooked_ssm import HookedSSM, as_flat, as_matrix

LAYER, LINEAR_INDEX = 3, 2  # model layer 3 is the third linear-attention layer of the fixture
HEAD, POS, LENGTH = 1, 70, 110  # the edit lands in the second chunk; the sequence spans two chunks


def brute_force_rule(edits_by_call):
    """A drop-in for transformers' torch_chunk_gated_delta_rule that edits the recurrence.

    ``edits_by_call[i]`` applies to the i-th linear-attention layer call: a dict
    ``{"write"|"state"|"delta_v"|"decay": (pos, head, value)}``.
    """
    calls = iter(range(1000))

    def rule(query, key, value, g, beta, initial_state=None, output_final_state=False,
             use_qk_l2norm_in_kernel=False, **_):
        edit = edits_by_call.get(next(calls), {})
        group = value.shape[2] // key.shape[2]
        q = query.float().repeat_interleave(group, 2)
        k = key.float().repeat_interleave(group, 2)
        q = q * torch.rsqrt((q * q).sum(-1, keepdim=True) + 1e-6) * q.shape[-1] ** -0.5
        k = k * torch.rsqrt((k * k).sum(-1, keepdim=True) + 1e-6)
        v, beta, g = value.float(), beta.float(), g.float().clone()
        if "decay" in edit:
            t, h, alpha = edit["decay"]
            g[:, t, h] = torch.log(torch.tensor(alpha))
        batch, length, heads, d_k = k.shape
        state = torch.zeros(batch, heads, d_k, v.shape[-1]) if initial_state is None else initial_state.float()
        outputs = []
        for t in range(length):
            for h in range(heads):
                a, b, kt, vt = g[:, t, h].exp(), beta[:, t, h], k[:, t, h], v[:, t, h]
                erase = torch.eye(d_k) - b[:, None, None] * kt[:, :, None] * kt[:, None, :]
                write = b[:, None, None] * kt[:, :, None] * vt[:, None, :]
                delta_v = b[:, None] * (vt - a[:, None] * torch.einsum("bkv,bk->bv", state[:, h], kt))
                if edit.get("write", (None, None))[:2] == (t, h):
                    write = edit["write"][2].expand_as(write)
                if edit.get("delta_v", (None, None))[:2] == (t, h):
                    delta_v = edit["delta_v"][2].expand_as(delta_v)
                    write = kt[:, :, None] * delta_v[:, None, :] + a[:, None, None] * b[:, None, None] * (
                        kt[:, :, None] * torch.einsum("bkv,bk->bv", state[:, h], kt)[:, None, :]
                    )
                new_state = a[:, None, None] * erase @ state[:, h] + write
                if edit.get("state", (None, None))[:2] == (t, h):
                    new_state = edit["state"][2].expand_as(new_state)
                state = torch.cat([state[:, :h], new_state[:, None], state[:, h + 1 :]], dim=1)
            outputs.append(torch.einsum("bhkv,bhk->bhv", state, q[:, t]))
        return torch.stack(outputs, 1).to(query.dtype), state if output_final_state else None

    return rule


@pytest.fixture(scope="module")
def model(qwen35):
    return HookedSSM.from_pretrained(qwen35[0])


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(3, 300, (2, LENGTH), generator=torch.Generator().manual_seed(7))


def reference_with(hf_model, tokens, edit, monkeypatch):
    monkeypatch.setattr(modeling_qwen3_5, "torch_chunk_gated_delta_rule", brute_force_rule({LINEAR_INDEX: edit}))
    with torch.no_grad():
        return hf_model(input_ids=tokens, use_cache=False).logits


def random_matrix(model, seed=0):
    return torch.randn(model.cfg.d_k, model.cfg.d_v, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("execution", ["chunked", "recurrent"])
def test_write_edit_equals_brute_force_and_leaves_the_past_alone(qwen35, model, tokens, monkeypatch, execution):
    replacement = random_matrix(model)

    def replace_write(write, hook):
        write[:, POS, HEAD] = as_flat(replacement)
        return write

    model.cfg.execution = execution
    for block in model.blocks:
        if hasattr(block, "mixer"):
            block.mixer.execution = execution
    try:
        with torch.no_grad():
            clean = model(tokens)
            edited = model.run_with_hooks(tokens, fwd_hooks=[(f"blocks.{LAYER}.mixer.hook_write", replace_write)])
    finally:
        for block in model.blocks:
            if hasattr(block, "mixer"):
                block.mixer.execution = "chunked"
    expected = reference_with(qwen35[1], tokens, {"write": (POS, HEAD, replacement)}, monkeypatch)
    assert (edited - expected).abs().max() <= 1e-4
    torch.testing.assert_close(edited[:, :POS], clean[:, :POS], atol=1e-5, rtol=0)
    assert (edited[:, POS:] - clean[:, POS:]).abs().max() > 1e-3  # the edit reaches later positions


def test_write_hook_sees_beta_k_v_outer_product(model, tokens):
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.startswith(f"blocks.{LAYER}.mixer."))
    prefix = f"blocks.{LAYER}.mixer."
    k, v, beta = cache[prefix + "hook_k"], cache[prefix + "hook_v"], cache[prefix + "hook_beta"]
    write = as_matrix(cache[prefix + "hook_write"], model.cfg.d_k, model.cfg.d_v)
    torch.testing.assert_close(write, beta[..., None, None] * k[..., :, None] * v[..., None, :])
    assert cache[prefix + "hook_write"].shape == (2, LENGTH, model.cfg.n_heads, model.cfg.d_k * model.cfg.d_v)


def test_state_hook_equals_the_reference_cache_state(qwen35, model, tokens):
    _, cache = model.run_with_cache(tokens, names_filter=f"blocks.{LAYER}.mixer.hook_state")
    states = as_matrix(cache[f"blocks.{LAYER}.mixer.hook_state"], model.cfg.d_k, model.cfg.d_v)
    for t in (0, 63, 64, LENGTH - 1):
        with torch.no_grad():
            out = qwen35[1](input_ids=tokens[:, : t + 1], use_cache=True)
        reference = out.past_key_values.get_recurrent_state(LAYER)
        torch.testing.assert_close(states[:, t], reference, atol=1e-5, rtol=1e-4)


def test_state_positions_materialise_only_the_selected_states(model, tokens):
    name = f"blocks.{LAYER}.mixer.hook_state"
    _, full = model.run_with_cache(tokens, names_filter=[name, f"blocks.{LAYER}.mixer.hook_write"])
    _, selected = model.run_with_cache(tokens, names_filter=[name, f"blocks.{LAYER}.mixer.hook_write"], pos_slice=[5, 90])
    assert selected[name].shape[1] == 2
    torch.testing.assert_close(selected[name], full[name][:, [5, 90]], atol=1e-5, rtol=1e-5)
    # Other flattened matrix hooks are sliced on the position dim, not the head dim.
    torch.testing.assert_close(selected[f"blocks.{LAYER}.mixer.hook_write"], full[f"blocks.{LAYER}.mixer.hook_write"][:, [5, 90]])


@pytest.mark.parametrize("kind", ["state", "delta_v"])
def test_state_and_delta_v_edits_equal_brute_force(qwen35, model, tokens, monkeypatch, kind):
    """A state returned for the one selected position replaces the state there and the recurrence
    continues from it; a delta_v edit is a persistent write-like edit."""
    value = random_matrix(model, 1) if kind == "state" else torch.randn(model.cfg.d_v)
    # hook_state sees only the selected position POS (index 0); hook_delta_v sees every position.
    at, selection = (0, {"state_positions": [POS]}) if kind == "state" else (POS, {})

    def edit(act, hook):
        act = act.clone()
        act[:, at, HEAD] = as_flat(value) if kind == "state" else value
        return act

    with torch.no_grad():
        edited = model.run_with_hooks(tokens, fwd_hooks=[(f"blocks.{LAYER}.mixer.hook_{kind}", edit)], **selection)
    expected = reference_with(qwen35[1], tokens, {kind: (POS, HEAD, value)}, monkeypatch)
    assert (edited - expected).abs().max() <= 1e-4


def test_decay_edit_flows_into_the_scan(qwen35, model, tokens, monkeypatch):
    def halve(decay, hook):
        decay[:, POS, HEAD] = 0.5

    with torch.no_grad():
        edited = model.run_with_hooks(tokens, fwd_hooks=[(f"blocks.{LAYER}.mixer.hook_decay", halve)])
    expected = reference_with(qwen35[1], tokens, {"decay": (POS, HEAD, 0.5)}, monkeypatch)
    assert (edited - expected).abs().max() <= 1e-4


def test_few_write_edits_never_fall_back_to_a_per_token_loop(model, tokens, monkeypatch):
    monkeypatch.setattr(gdr_ops, "recurrent_gated_delta_rule", lambda *a, **k: pytest.fail("per-token loop used"))
    import hooked_ssm.components.gated_deltanet as gdn

    monkeypatch.setattr(gdn, "recurrent_gated_delta_rule", lambda *a, **k: pytest.fail("per-token loop used"))

    def bump(write, hook):
        write[:, POS, HEAD] += 1.0

    with torch.no_grad():
        model.run_with_hooks(tokens, fwd_hooks=[(f"blocks.{LAYER}.mixer.hook_write", bump)])


def test_matrix_hooks_are_not_materialised_without_hooks(model, tokens, monkeypatch):
    import hooked_ssm.components.gated_deltanet as gdn

    real_write_edits = gdn.write_edits
    monkeypatch.setattr(gdn, "write_edits", lambda hook, native_write, *dims: real_write_edits(
        hook, lambda: pytest.fail("write materialised"), *dims))
    monkeypatch.setattr(gdn, "gated_delta_rule_with_edits", lambda *a, **k: pytest.fail("split scan used"))
    with torch.no_grad():
        model(tokens)
        model.run_with_cache(tokens, names_filter=f"blocks.{LAYER}.mixer.hook_q")


def test_unknown_hook_names_suggest_close_matches(model, tokens):
    with pytest.raises(KeyError, match="blocks.0.mixer.hook_write"):
        model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.mixer.hook_wirte", lambda x, hook: x)])
    with pytest.raises(KeyError, match="hook_state"):
        model.run_with_cache(tokens, names_filter=["blocks.0.mixer.hook_stat"])
    with pytest.raises(KeyError, match="Unknown hook name"):
        model.add_hook("blocks.0.attn.hook_write", lambda x, hook: x)


def test_transformer_lens_4_aliases_resolve(model, tokens):
    # TransformerLens 4's hook_ssm_write on a Gated DeltaNet mixer is the write strength beta.
    _, cache = model.run_with_cache(tokens[:, :10], names_filter=["blocks.0.mixer.hook_ssm_write"])
    assert list(cache.keys()) == ["blocks.0.mixer.hook_beta"]


def test_hooks_are_removed_after_an_exception(model, tokens):
    def broken(act, hook):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        model.run_with_hooks(tokens, fwd_hooks=[(f"blocks.{LAYER}.mixer.hook_write", broken)])
    assert not any(hp.has_hooks() for hp in model.hook_dict.values())


def test_activation_cache_works_with_transformer_lens_helpers(model, tokens):
    _, cache = model.run_with_cache(tokens[:, :12])
    assert cache["write", LAYER, "mixer"].shape[-1] == model.cfg.d_k * model.cfg.d_v
    resid = cache.accumulated_resid(layer=2)
    assert resid.shape == (3, 2, 12, model.cfg.d_model)
    head_out = torch.einsum("bphv,hvd->bpd", cache[f"blocks.{LAYER}.mixer.hook_z"], model.W_O[LAYER])
    torch.testing.assert_close(head_out, cache[f"blocks.{LAYER}.hook_mixer_out"], atol=1e-5, rtol=1e-5)
