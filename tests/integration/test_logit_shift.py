"""The closed-form logit shift: exact where the approximation is exact, and the jvp form equals
finite differences of the real model."""

from contextlib import contextmanager

import pytest
import torch
from random_weights import randomize_
from transformers import KimiLinearConfig, KimiLinearForCausalLM, Qwen3_5ForCausalLM, Qwen3_5TextConfig

from hooked_ssm import HookedSSM
from writesae_lens.analysis.report import format_logit_shift_table
from writesae_lens.interventions.logit_shift import closed_form_gate, gate_products, readout_matrix, run_logit_shift_audit

T0, HEAD = 6, 1


# Many tiny forwards: on a shared CPU one thread is far faster (fixture in tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def one_layer(tmp_path_factory):
    """A 1-layer Gated DeltaNet model (Qwen3.5 layout) with slow forget gates (a_s ~ 0.97), so the
    perturbation visibly survives several steps."""
    torch.manual_seed(0)
    config = Qwen3_5TextConfig(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=1, layer_types=["linear_attention"],
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
        linear_key_head_dim=16, linear_value_head_dim=8, linear_conv_kernel_dim=4, hidden_act="silu",
        rms_norm_eps=1e-6, max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=True,
    )
    hf = Qwen3_5ForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # perturb every parameter (HF initialises norms and gates to constants)
        for name, param in hf.named_parameters():
            param.add_((0.3 if "norm" in name or "dt_bias" in name else 0.05) * torch.randn(param.shape, generator=gen))
        hf.model.layers[0].linear_attn.A_log.fill_(-3.0)
    directory = tmp_path_factory.mktemp("one_layer_gdn")
    hf.save_pretrained(directory)
    return HookedSSM.from_pretrained(directory)


@pytest.fixture(scope="module")
def one_layer_kda(tmp_path_factory):
    """A 1-layer Kimi Delta Attention model whose key channels decay at very different rates
    (a_s from ~0.98 to ~0.4 within each head), so a gate averaged over d_k would be far off."""
    config = KimiLinearConfig(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=1, layer_types=["linear_attention"],
        mlp_layer_types=["dense"], num_attention_heads=4, num_key_value_heads=4, linear_head_dim=16,
        linear_num_heads=4, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(0)
    hf = randomize_(KimiLinearForCausalLM(config))
    gate = hf.model.layers[0].self_attn.forget_gate
    with torch.no_grad():
        gate.A_log.zero_()
        gate.dt_bias.copy_(torch.linspace(-4.0, 0.5, 16).repeat(4))
    directory = tmp_path_factory.mktemp("one_layer_kda")
    hf.save_pretrained(directory)
    return HookedSSM.from_pretrained(directory)


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(3, 300, (3, 16), generator=torch.Generator().manual_seed(0))


def directions(model, n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, model.cfg.d_k, generator=g), torch.randn(n, model.cfg.d_v, generator=g)


def no_erase_after_t0(model):
    """hook_beta: b_s = 0 for s > t0 (absolute positions), so nothing erases the perturbation."""

    def hook(act, hook):
        positions = torch.arange(act.shape[1]) + model.current_position_offset
        act[:, positions > T0] = 0
        return act

    return ("blocks.0.mixer.hook_beta", hook)


@contextmanager
def identity_final_norm(model):
    """The final norm passes its input (swapped for an identity module while the block runs)."""
    norm, model.ln_final = model.ln_final, torch.nn.Identity()
    try:
        yield
    finally:
        model.ln_final = norm


def linearising_hooks(model):
    """With :func:`identity_final_norm`, make the path from the head's read to the logits linear:
    the gated norm passes the read through (hook_z := hook_read) and the MLP is silenced."""
    seen = {}

    def keep(key):
        def hook(act, hook):
            seen[key] = act
        return hook

    return [
        ("blocks.0.mixer.hook_read", keep("read")),
        ("blocks.0.mixer.hook_z", lambda act, hook: seen["read"]),
        ("blocks.0.hook_mlp_out", lambda act, hook: torch.zeros_like(act)),
    ]


def column(records, key):
    return torch.tensor([r[key] for r in records], dtype=torch.float64)


def test_closed_form_is_exact_when_the_approximation_is(one_layer, tokens):
    model = one_layer
    hooks = [no_erase_after_t0(model), *linearising_hooks(model)]
    with identity_final_norm(model):
        records, summary = run_logit_shift_audit(
            model, layer=0, head=HEAD, tokens=tokens, factors=directions(model), t0=T0, horizon=6,
            eps=(0.1, 0.3, 1.0, 3.0), eps_unit="absolute", token_ranks=(0, 3, 50), extra_hooks=hooks, progress=False,
        )
    measured, gate, jvp = column(records, "measured"), column(records, "gate"), column(records, "jvp")
    scale = measured.abs().max()
    assert scale > 1e-3
    assert (column(records, "gate_product")[column(records, "lag") == 6] > 0.5).all()  # slow gates: G ~ 0.97^6
    # The gate form (no fitted parameter) equals the measured logit shift to ~1e-5 relative.
    torch.testing.assert_close(gate, measured, atol=1e-5 * scale, rtol=0)
    torch.testing.assert_close(jvp, measured, atol=1e-5 * scale, rtol=0)
    for form in ("gate", "fitted", "jvp"):
        assert summary["forms"][form]["pooled_r2"] > 1 - 1e-8
    assert "gate" in format_logit_shift_table(summary)


def test_state_perturbation_reads_back_exactly_without_erase(one_layer, tokens):
    """With b_s = 0 after t0 the state perturbation is eps G(t0->t) u w^T exactly, so the read of
    the head moves by eps G (u . q_t) w (before the gated norm, on the real model)."""
    model = one_layer
    u, w = (x[0] / x[0].norm() for x in directions(model))
    eps = 0.7
    beta_hook = no_erase_after_t0(model)

    def add(act, hook):
        act[:, T0, HEAD] += eps * torch.outer(u, w).flatten()
        return act

    names = ["blocks.0.mixer.hook_read", "blocks.0.mixer.hook_q", "blocks.0.mixer.hook_decay"]
    with model.hooks(fwd_hooks=[beta_hook]):
        _, base = model.run_with_cache(tokens, names_filter=names)
        with model.hooks(fwd_hooks=[("blocks.0.mixer.hook_write", add)]):
            _, moved = model.run_with_cache(tokens, names_filter=names[:1])
    positions = list(range(T0, tokens.shape[1]))
    delta = (moved[names[0]] - base[names[0]])[:, T0:, HEAD]  # [batch, pos, d_v]
    log_decay = base[names[2]][:, :, HEAD].log()
    gate = torch.stack([gate_products(log_decay[b], T0, positions) for b in range(len(tokens))]).float()
    uq = base[names[1]][:, T0:, HEAD] @ u
    predicted = eps * (gate * uq)[..., None] * w
    torch.testing.assert_close(delta, predicted, atol=1e-5 * delta.abs().max(), rtol=0)
    assert (moved[names[0]] - base[names[0]])[:, :T0].abs().max() == 0  # nothing before t0 moves


def test_closed_form_is_exact_with_a_per_channel_decay(one_layer_kda, tokens):
    """Kimi Delta Attention: the gate form uses each key channel's own product (u . (G_t * q_t))."""
    model = one_layer_kda
    hooks = [no_erase_after_t0(model), *linearising_hooks(model)]
    with identity_final_norm(model):
        records, _ = run_logit_shift_audit(
            model, layer=0, head=HEAD, tokens=tokens, factors=directions(model), t0=T0, horizon=6,
            eps=(0.3, 3.0), eps_unit="absolute", token_ranks=(0, 3, 50), extra_hooks=hooks, progress=False,
        )
    measured, gate, jvp = column(records, "measured"), column(records, "gate"), column(records, "jvp")
    scale = measured.abs().max()
    assert scale > 1e-3
    torch.testing.assert_close(gate, measured, atol=1e-5 * scale, rtol=0)
    torch.testing.assert_close(jvp, measured, atol=1e-5 * scale, rtol=0)
    G, lag = column(records, "gate_product"), column(records, "lag")  # the atom's gate u^T diag(G) u
    torch.testing.assert_close(G[lag == 0], torch.ones_like(G[lag == 0]))
    assert (G <= 1 + 1e-6).all() and (G[lag == 6] < 0.6).all()


def test_per_channel_perturbation_reads_back_exactly_without_erase(one_layer_kda, tokens):
    """Against a brute-force re-run (the model run again with the state perturbed through hook_write):
    with b_s = 0 after t0 the read moves by eps (u . (G_t * q_t)) w, G per key channel; the same
    formula with the decay averaged over d_k (one gate per head) is far off."""
    model = one_layer_kda
    u, w = (x[0] / x[0].norm() for x in directions(model))
    eps = 0.7

    def add(act, hook):
        act[:, T0, HEAD] += eps * torch.outer(u, w).flatten()
        return act

    names = ["blocks.0.mixer.hook_read", "blocks.0.mixer.hook_q", "blocks.0.mixer.hook_decay"]
    with model.hooks(fwd_hooks=[no_erase_after_t0(model)]):
        _, base = model.run_with_cache(tokens, names_filter=names)
        with model.hooks(fwd_hooks=[("blocks.0.mixer.hook_write", add)]):
            _, moved = model.run_with_cache(tokens, names_filter=names[:1])
    delta = (moved[names[0]] - base[names[0]])[:, T0:, HEAD]  # [batch, pos, d_v]
    log_decay = base[names[2]][:, :, HEAD].log()  # [batch, pos, d_k]
    q = base[names[1]][:, T0:, HEAD]
    positions = list(range(T0, tokens.shape[1]))

    def predicted(log_decay):
        gate = torch.stack([gate_products(log_decay[b], T0, positions) for b in range(len(tokens))]).float()
        uq = (gate * q) @ u if gate.dim() == 3 else gate * (q @ u)
        return eps * uq[..., None] * w

    torch.testing.assert_close(delta, predicted(log_decay), atol=1e-5 * delta.abs().max(), rtol=0)
    averaged = predicted(log_decay.mean(dim=-1))
    assert (averaged - delta).abs().max() > 0.1 * delta.abs().max()


def test_jvp_form_matches_finite_differences(one_layer, tokens):
    model = one_layer
    kwargs = dict(layer=0, head=HEAD, tokens=tokens, factors=directions(model), t0=T0, horizon=4,
                  eps_unit="absolute", token_ranks=(0, 7), progress=False, forms=("jvp",))
    e = 1e-3
    records, _ = run_logit_shift_audit(model, eps=(e, -e), **kwargs)
    plus = [r for r in records if r["eps"] > 0]
    minus = [r for r in records if r["eps"] < 0]
    central = (column(plus, "measured") - column(minus, "measured")) / (2 * e)
    jvp = column(plus, "jvp") / e
    assert jvp.abs().max() > 1e-2
    torch.testing.assert_close(jvp, central, atol=2e-2 * jvp.abs().max(), rtol=0)


def test_jvp_form_matches_finite_differences_through_a_hybrid(qwen35):
    """Through later Gated DeltaNet and attention layers too (the 5-layer hybrid fixture)."""
    model = HookedSSM.from_pretrained(qwen35[0])
    tokens = torch.randint(3, 300, (2, 14), generator=torch.Generator().manual_seed(3))
    u, w = directions(model, n=3)
    e = 1e-3
    records, _ = run_logit_shift_audit(model, layer=1, head=2, tokens=tokens, factors=(u, w), t0=5, horizon=6,
                                       eps=(e, -e), eps_unit="absolute", token_ranks=(0,), forms=("jvp",),
                                       progress=False)
    plus = [r for r in records if r["eps"] > 0]
    minus = [r for r in records if r["eps"] < 0]
    central = (column(plus, "measured") - column(minus, "measured")) / (2 * e)
    jvp = column(plus, "jvp") / e
    assert (column(plus, "lag") > 0).any() and jvp[column(plus, "lag") > 2].abs().max() > 0
    torch.testing.assert_close(jvp, central, atol=2e-2 * jvp.abs().max(), rtol=0)


def test_closed_form_gate_broadcasts_over_atoms_positions_tokens(one_layer, tokens):
    model = one_layer
    _, cache = model.run_with_cache(tokens[:1], names_filter=["blocks.0.mixer.hook_q", "blocks.0.mixer.hook_decay"])
    q = cache["blocks.0.mixer.hook_q"][0, :, HEAD]
    log_decay = cache["blocks.0.mixer.hook_decay"][0, :, HEAD].log()
    u, w = directions(model, n=5)
    readout = readout_matrix(model, 0, HEAD)
    positions = [T0, T0 + 1, T0 + 3]
    toks = torch.tensor([4, 9, 11])
    out = closed_form_gate(q, log_decay, readout, u, w, T0, positions, toks)
    assert out.shape == (5, 3, 3)
    i, p, k = 3, 2, 1
    G = torch.exp(log_decay[T0 + 1 : positions[p] + 1].double().sum()).float()
    expected = G * (u[i] @ q[positions[p]]) * (w[i] @ model.W_O[0][HEAD] @ model.W_U[:, toks[k]])
    torch.testing.assert_close(out[i, p, k], expected, rtol=1e-5, atol=1e-9)


def test_audit_of_an_sae_at_its_firings(qwen35):
    """The default protocol: the most frequent atoms, perturbed at their strongest firing per prompt."""
    import writesae_lens.saes  # noqa: F401
    from writesae_lens.saes import WriteSAE, WriteSAEConfig

    model = HookedSSM.from_pretrained(qwen35[0])
    d_k, d_v = model.cfg.d_k, model.cfg.d_v
    cfg = WriteSAEConfig(d_in=d_k * d_v, d_sae=16, d_k=d_k, d_v=d_v, k=3)
    cfg.metadata.hook_name, cfg.metadata.hook_head_index = "blocks.3.mixer.hook_state", 0
    torch.manual_seed(0)
    sae = WriteSAE(cfg)
    tokens = torch.randint(3, 300, (3, 12), generator=torch.Generator().manual_seed(2))
    records, summary = run_logit_shift_audit(model, sae, tokens=tokens, n_atoms=3, eps=(0.1, 1.0), horizon=2,
                                             progress=False)
    atoms = {r["atom"] for r in records}
    assert len(atoms) == 3 and summary["config"]["n_atoms"] == 3
    codes = {}
    for r in records:
        assert r["t0"] <= r["t"] <= r["t0"] + 2 and r["eps_abs"] > 0
        codes.setdefault((r["prompt"], r["atom"]), set()).add(r["t0"])
    assert all(len(t0s) == 1 for t0s in codes.values())  # one t0 (the strongest firing) per prompt and atom
    for form in ("gate", "fitted", "jvp"):
        assert form in summary["forms"] and summary["forms"][form]["n_atoms"] == 3
