"""HookedSSM on Mamba-2: parity with transformers' ``Mamba2ForCausalLM`` (HF and original mamba_ssm
layouts), exact write / state edits against an independent brute-force recurrence, generation with
the recurrent cache, and clear errors."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
import torch.nn.functional as F
from transformers import Mamba2Config, Mamba2ForCausalLM

from hooked_ssm import CheckpointError, HookedSSM, RecurrentState

VOCAB, PADDED_VOCAB = 1000, 1008  # the original layout pads 1000 up to a multiple of 16
LENGTHS = [37, 150]  # not multiples of the 64-token chunk (nor of the HF chunk of 16)
TOL = 1e-4

FIXTURES = {
    # one group, default dt limit, no projection bias
    "mamba2_g1": dict(num_hidden_layers=3, n_groups=1, use_bias=False, time_step_limit=(0.0, float("inf"))),
    # two groups (B/C shared by 4 heads each), projection bias, an active dt clamp
    "mamba2_g2": dict(num_hidden_layers=2, n_groups=2, use_bias=True, time_step_limit=(0.0, 0.3)),
}


def _hf_model(seed: int, **overrides) -> Mamba2ForCausalLM:
    torch.manual_seed(seed)
    cfg = Mamba2Config(
        vocab_size=PADDED_VOCAB, hidden_size=64, expand=2, head_dim=16, num_heads=8, state_size=16,
        conv_kernel=4, use_conv_bias=True, chunk_size=16, layer_norm_epsilon=1e-5, residual_in_fp32=True,
        tie_word_embeddings=True, pad_token_id=0, bos_token_id=0, eos_token_id=0, **overrides,
    )
    model = Mamba2ForCausalLM(cfg).eval()
    with torch.no_grad():  # move the parameters that init leaves at constants
        for name, param in model.named_parameters():
            if name.endswith(("D", "norm.weight", "norm_f.weight", "conv1d.bias", "in_proj.bias", "out_proj.bias")):
                param.add_(torch.randn_like(param) * 0.3)
            if name.endswith("dt_bias"):
                param.add_(torch.randn_like(param))
    return model


@pytest.fixture(scope="module", params=list(FIXTURES))
def mamba2(request, tmp_path_factory):
    hf_model = _hf_model(0, **FIXTURES[request.param])
    directory = tmp_path_factory.mktemp(request.param)
    hf_model.save_pretrained(directory)
    return request.param, directory, hf_model


@pytest.fixture(scope="module")
def mamba2_g1(tmp_path_factory):
    hf_model = _hf_model(1, **FIXTURES["mamba2_g1"])
    directory = tmp_path_factory.mktemp("mamba2_g1_single")
    hf_model.save_pretrained(directory)
    return directory, hf_model


def _tokens(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _hf_logits(hf_model, tokens):
    with torch.no_grad():
        return hf_model(input_ids=tokens, use_cache=False).logits


def write_original_layout(hf_model: Mamba2ForCausalLM, directory, ssm_cfg: dict | None = None) -> None:
    """The same weights as a ``state-spaces/mamba2-*`` checkpoint: mamba_ssm config.json,
    ``backbone.embedding.`` key prefix, ``pytorch_model.bin`` (with the tied lm_head, as mamba_ssm saves it)."""
    cfg = hf_model.config
    if ssm_cfg is None:
        ssm_cfg = {"layer": "Mamba2", "d_state": cfg.state_size, "d_conv": cfg.conv_kernel, "expand": cfg.expand,
                   "headdim": cfg.head_dim, "ngroups": cfg.n_groups, "chunk_size": cfg.chunk_size,
                   "bias": cfg.use_bias, "conv_bias": cfg.use_conv_bias, "dt_limit": list(cfg.time_step_limit)}
    config = {"d_model": cfg.hidden_size, "d_intermediate": 0, "n_layer": cfg.num_hidden_layers, "vocab_size": VOCAB,
              "ssm_cfg": ssm_cfg, "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": True, "residual_in_fp32": True,
              "fused_add_norm": True, "pad_vocab_size_multiple": 16, "tie_embeddings": True}
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    state = {k.replace("backbone.embeddings.", "backbone.embedding."): v.clone() for k, v in hf_model.state_dict().items()}
    state["lm_head.weight"] = state["backbone.embedding.weight"]
    torch.save(state, directory / "pytorch_model.bin")


# ------------------------------------------------------------------ brute-force reference
def explicit_mixer(mixer, hidden, write_override=None, states=None):
    """Mamba-2 mixer of transformers, recomputed token by token from its weights (no library ops).

    ``write_override``: ``{t: [batch, head, headdim, d_state]}`` replaces the write ``dt x B^T`` at
    ``t`` (transformers' orientation). ``states``: a dict filled with ``h_t`` ``[batch, head, headdim, d_state]``.
    """
    batch, length, _ = hidden.shape
    heads, headdim, d_state, groups = mixer.num_heads, mixer.head_dim, mixer.ssm_state_size, mixer.n_groups
    d_inner = mixer.intermediate_size
    z, xBC, dt = mixer.in_proj(hidden).split([d_inner, mixer.conv_dim, heads], dim=-1)
    xBC = F.silu(mixer.conv1d(xBC.transpose(1, 2))[..., :length].transpose(1, 2))
    x, B, C = xBC.split([d_inner, groups * d_state, groups * d_state], dim=-1)
    x = x.view(batch, length, heads, headdim)
    group_of = torch.arange(heads) // (heads // groups)
    B = B.view(batch, length, groups, d_state)[:, :, group_of]
    C = C.view(batch, length, groups, d_state)[:, :, group_of]
    dt = F.softplus(dt + mixer.dt_bias).clamp(*mixer.time_step_limit)
    A = -torch.exp(mixer.A_log.float())
    h = hidden.new_zeros(batch, heads, headdim, d_state)
    ys = []
    for t in range(length):
        write = dt[:, t, :, None, None] * x[:, t, :, :, None] * B[:, t, :, None, :]
        if write_override is not None and t in write_override:
            write = write_override[t]
        h = torch.exp(dt[:, t] * A)[:, :, None, None] * h + write
        if states is not None:
            states[t] = h
        ys.append(torch.einsum("bhpn,bhn->bhp", h, C[:, t]) + mixer.D[:, None] * x[:, t])
    y = torch.stack(ys, dim=1).reshape(batch, length, d_inner)
    return mixer.out_proj(mixer.norm(y, z))


def brute_force_logits(hf_model, tokens, layer, write_override=None, states=None):
    mixer = hf_model.backbone.layers[layer].mixer
    mixer.forward = lambda hidden_states, *args, **kwargs: explicit_mixer(mixer, hidden_states, write_override, states)
    try:
        return _hf_logits(hf_model, tokens)
    finally:
        del mixer.forward


# ------------------------------------------------------------------ parity
def test_reference_environment_uses_the_torch_fallbacks():
    """transformers silently swaps in fla / mamba_ssm / causal_conv1d kernels when they import
    (MODELS.md section 0.2): the parity reference must be the plain torch path."""
    for package in ("fla", "mamba_ssm", "causal_conv1d"):
        assert importlib.util.find_spec(package) is None, f"uninstall {package}: it replaces the reference's torch path"


@pytest.mark.parametrize("execution", ["chunked", "recurrent"])
def test_logits_match_transformers(mamba2, execution):
    name, directory, hf_model = mamba2
    model = HookedSSM.from_pretrained(directory, execution=execution)
    assert model.cfg.layer_types == ["mamba2"] * hf_model.config.num_hidden_layers
    assert model.cfg.n_key_heads == hf_model.config.n_groups
    for length in LENGTHS:
        tokens = _tokens(2, length, seed=length)
        with torch.no_grad():
            logits = model(tokens)
        diff = (logits - _hf_logits(hf_model, tokens)).abs().max().item()
        assert diff <= TOL, f"{name}/{execution}/T={length}: max |logit diff| {diff:.2e}"


def test_brute_force_reference_matches_transformers(mamba2):
    """The test's own explicit recurrence is a faithful reference (so the edit tests below mean something)."""
    _, _, hf_model = mamba2
    tokens = _tokens(2, 37)
    diff = (brute_force_logits(hf_model, tokens, layer=1) - _hf_logits(hf_model, tokens)).abs().max().item()
    assert diff <= TOL


def test_original_mamba_ssm_layout_loads_to_the_same_logits(mamba2, tmp_path):
    name, directory, hf_model = mamba2
    write_original_layout(hf_model, tmp_path / "original")
    original = HookedSSM.from_pretrained(tmp_path / "original")
    converted = HookedSSM.from_pretrained(directory)
    assert original.cfg.d_vocab == PADDED_VOCAB  # 1000 padded to a multiple of 16
    assert original.cfg.original_architecture == "mamba_ssm"
    assert original.cfg.time_step_limit == tuple(hf_model.config.time_step_limit)
    tokens = _tokens(2, 150)
    with torch.no_grad():
        torch.testing.assert_close(original(tokens), converted(tokens), atol=0, rtol=0)


def test_silent_ssm_cfg_reads_dims_from_tensor_shapes(mamba2_g1, tmp_path):
    """``ssm_cfg = {"layer": "Mamba2"}`` (as in state-spaces/mamba2-*): headdim, d_state and the conv
    kernel come from the tensor shapes, ngroups from the default (1)."""
    directory, hf_model = mamba2_g1
    write_original_layout(hf_model, tmp_path / "silent", ssm_cfg={"layer": "Mamba2"})
    model = HookedSSM.from_pretrained(tmp_path / "silent")
    assert (model.cfg.d_k, model.cfg.d_v, model.cfg.n_heads, model.cfg.n_key_heads) == (16, 16, 8, 1)
    tokens = _tokens(1, 40)
    with torch.no_grad():
        assert (model(tokens) - _hf_logits(hf_model, tokens)).abs().max().item() <= TOL


# ------------------------------------------------------------------ hooks and exact edits
@pytest.mark.parametrize("execution", ["chunked", "recurrent"])
def test_write_edit_matches_brute_force_recurrence(mamba2, execution):
    name, directory, hf_model = mamba2
    model = HookedSSM.from_pretrained(directory, execution=execution)
    layer, edits_at = 1, (20, 70)
    tokens = _tokens(2, 150, seed=3)
    gen = torch.Generator().manual_seed(7)
    heads, d_state, headdim = model.cfg.n_heads, model.cfg.d_k, model.cfg.d_v
    replacement = {t: torch.randn(2, heads, d_state, headdim, generator=gen) * 0.5 for t in edits_at}

    def replace_write(write, hook):
        write = write.clone()
        for t, matrix in replacement.items():
            write[:, t] = matrix.flatten(-2)
        return write

    with torch.no_grad():
        clean = model(tokens)
        edited = model.run_with_hooks(tokens, fwd_hooks=[(f"blocks.{layer}.mixer.hook_write", replace_write)])
    # transformers' orientation is [headdim, d_state]: the transpose of ours.
    expected = brute_force_logits(hf_model, tokens, layer, {t: m.transpose(-1, -2) for t, m in replacement.items()})
    diff = (edited - expected).abs().max().item()
    assert diff <= TOL, f"{name}/{execution}: edited logits vs brute force {diff:.2e}"
    first = min(edits_at)
    if execution == "recurrent":
        assert torch.equal(edited[:, :first], clean[:, :first])
    else:
        torch.testing.assert_close(edited[:, :first], clean[:, :first], atol=1e-5, rtol=0)
    assert (edited[:, first:] - clean[:, first:]).abs().amax(dim=(0, 2)).min() > 1e-3  # it propagates


def test_state_hook_equals_recurrent_state(mamba2):
    name, directory, hf_model = mamba2
    model = HookedSSM.from_pretrained(directory)
    layer, tokens = 0, _tokens(2, 90, seed=5)
    states: dict[int, torch.Tensor] = {}
    brute_force_logits(hf_model, tokens, layer, states=states)
    expected = torch.stack([states[t] for t in range(90)], dim=1).transpose(-1, -2).flatten(-2)  # key-major
    _, cache = model.run_with_cache(tokens, names_filter=f"blocks.{layer}.mixer.hook_state")
    torch.testing.assert_close(cache[f"blocks.{layer}.mixer.hook_state"], expected, atol=1e-5, rtol=1e-5)
    # chosen positions only: materialised at those positions, not the whole trajectory
    positions = [0, 41, 89]
    _, selected = model.run_with_cache(tokens, names_filter=f"blocks.{layer}.mixer.hook_state", pos_slice=positions)
    assert selected[f"blocks.{layer}.mixer.hook_state"].shape[1] == 3
    torch.testing.assert_close(selected[f"blocks.{layer}.mixer.hook_state"], expected[:, positions], atol=1e-5, rtol=1e-5)
    seen = []
    model.run_with_hooks(tokens, state_positions=[10, 60],
                         fwd_hooks=[(f"blocks.{layer}.mixer.hook_state", lambda s, hook: seen.append(s.clone()))])
    torch.testing.assert_close(seen[0], expected[:, [10, 60]], atol=1e-5, rtol=1e-5)


def test_state_edit_equals_the_same_write_edit(mamba2_g1):
    model = HookedSSM.from_pretrained(mamba2_g1[0])
    tokens, t = _tokens(1, 100, seed=9), 57
    delta = torch.randn(1, model.cfg.n_heads, model.cfg.d_k * model.cfg.d_v, generator=torch.Generator().manual_seed(1))

    def add(x, hook):
        x = x.clone()
        x[:, t] += delta
        return x

    def add_at_selected(x, hook):
        return x + delta[:, None]

    with torch.no_grad():
        via_write = model.run_with_hooks(tokens, fwd_hooks=[("blocks.2.mixer.hook_write", add)])
        # hook_state at the one selected position t: the returned S_t + delta replaces S_t and the
        # recurrence continues from it, which is what a write edit of delta at t does.
        via_state = model.run_with_hooks(tokens, fwd_hooks=[("blocks.2.mixer.hook_state", add_at_selected)],
                                         state_positions=[t])
    torch.testing.assert_close(via_write, via_state, atol=1e-5, rtol=1e-5)


def test_x_edit_moves_the_write_value(mamba2_g1):
    """hook_v = dt * x is computed from hook_x's value, so an x edit reaches the write (and the D skip)."""
    model = HookedSSM.from_pretrained(mamba2_g1[0])
    tokens = _tokens(1, 30)

    captured = {}
    _, clean = model.run_with_cache(tokens, names_filter=lambda n: n.startswith("blocks.0.mixer.hook_"))
    model.run_with_hooks(tokens, fwd_hooks=[
        ("blocks.0.mixer.hook_x", lambda x, hook: x * 2),
        ("blocks.0.mixer.hook_v", lambda v, hook: captured.setdefault("v", v.clone())),
    ])
    torch.testing.assert_close(captured["v"], 2 * clean["blocks.0.mixer.hook_v"])
    dt, x = clean["blocks.0.mixer.hook_dt"], clean["blocks.0.mixer.hook_x"]
    torch.testing.assert_close(clean["blocks.0.mixer.hook_v"], dt[..., None] * x)
    decay = clean["blocks.0.mixer.hook_decay"]
    A = -model.blocks[0].mixer.A_log.exp()
    torch.testing.assert_close(decay, torch.exp(dt * A))


def test_hook_shapes_and_tl4_aliases(mamba2_g1):
    model = HookedSSM.from_pretrained(mamba2_g1[0])
    cfg = model.cfg
    tokens = _tokens(2, 11)
    _, cache = model.run_with_cache(tokens, names_filter=["blocks.1.mixer.hook_ssm_B", "blocks.1.mixer.hook_ssm_state"])
    assert cache["blocks.1.mixer.hook_k"].shape == (2, 11, cfg.n_heads, cfg.d_k)
    assert cache["blocks.1.mixer.hook_state"].shape == (2, 11, cfg.n_heads, cfg.d_k * cfg.d_v)
    _, cache = model.run_with_cache(tokens)
    shapes = {name.split(".")[-1]: tuple(act.shape) for name, act in cache.items() if name.startswith("blocks.0.mixer.")}
    assert shapes["hook_q"] == shapes["hook_k"] == (2, 11, cfg.n_heads, cfg.d_k)
    assert shapes["hook_v"] == shapes["hook_x"] == shapes["hook_read"] == shapes["hook_z"] == (2, 11, cfg.n_heads, cfg.d_v)
    assert shapes["hook_dt"] == shapes["hook_decay"] == (2, 11, cfg.n_heads)
    assert shapes["hook_write"] == (2, 11, cfg.n_heads, cfg.d_k * cfg.d_v)
    assert model.W_O[0].shape == (cfg.n_heads, cfg.d_v, cfg.d_model)


def test_unknown_hook_name_is_a_clear_error(mamba2_g1):
    model = HookedSSM.from_pretrained(mamba2_g1[0])
    with pytest.raises(KeyError, match="Unknown hook name.*hook_write"):
        model.run_with_hooks(_tokens(1, 5), fwd_hooks=[("blocks.0.mixer.hook_writes", lambda x, hook: x)])
    with pytest.raises(KeyError, match="Unknown hook name"):
        model.run_with_cache(_tokens(1, 5), names_filter=["blocks.0.mixer.hook_beta"])  # Mamba-2 has no beta


# ------------------------------------------------------------------ generation and cache
@pytest.mark.parametrize("execution", ["chunked", "recurrent"])
def test_generate_with_recurrent_cache_equals_full_forwards(mamba2, execution):
    _, directory, _ = mamba2
    model = HookedSSM.from_pretrained(directory, execution=execution)
    tokens = _tokens(2, 12, seed=11)
    kwargs = dict(max_new_tokens=8, do_sample=False, stop_at_eos=False, verbose=False)
    cached = model.generate(tokens, use_past_kv_cache=True, **kwargs)
    uncached = model.generate(tokens, use_past_kv_cache=False, **kwargs)
    assert cached.shape == (2, 20)
    assert torch.equal(cached, uncached)


def test_recurrent_state_continues_a_sequence(mamba2_g1):
    model = HookedSSM.from_pretrained(mamba2_g1[0])
    tokens = _tokens(2, 80, seed=4)
    state = RecurrentState.empty(model.cfg.layer_types)
    with torch.no_grad():
        full = model(tokens)
        first = model(tokens[:, :70], past_state=state)
        rest = [model(tokens[:, t : t + 1], past_state=state) for t in range(70, 80)]
    assert state.n_tokens == 80
    torch.testing.assert_close(torch.cat([first, *rest], dim=1), full, atol=1e-4, rtol=1e-4)
    layer_cache = state.layers[0]
    assert layer_cache.ssm_state.shape == (2, model.cfg.n_heads, model.cfg.d_k, model.cfg.d_v)
    assert layer_cache.conv_state.shape[-1] == model.cfg.conv_kernel - 1


# ------------------------------------------------------------------ malformed checkpoints
def test_malformed_checkpoints_give_clear_errors(mamba2_g1, tmp_path):
    _, hf_model = mamba2_g1

    truncated = tmp_path / "truncated"
    write_original_layout(hf_model, truncated)
    data = (truncated / "pytorch_model.bin").read_bytes()
    (truncated / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated|corrupt"):
        HookedSSM.from_pretrained(truncated)

    conflicting = tmp_path / "conflicting"
    write_original_layout(hf_model, conflicting, ssm_cfg={"layer": "Mamba2", "headdim": 32})
    with pytest.raises(CheckpointError, match="do not fit"):
        HookedSSM.from_pretrained(conflicting)

    mamba1 = tmp_path / "mamba1"
    write_original_layout(hf_model, mamba1, ssm_cfg={"layer": "Mamba1"})
    with pytest.raises(CheckpointError, match="Mamba-1"):
        HookedSSM.from_pretrained(mamba1)

    missing = tmp_path / "missing"
    write_original_layout(hf_model, missing)
    state = torch.load(missing / "pytorch_model.bin", weights_only=True)
    del state["backbone.layers.1.mixer.D"]
    torch.save(state, missing / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="backbone.layers.1.mixer.D"):
        HookedSSM.from_pretrained(missing)

    extra = tmp_path / "extra"
    write_original_layout(hf_model, extra)
    state = torch.load(extra / "pytorch_model.bin", weights_only=True)
    state["backbone.layers.0.mixer.surprise"] = torch.zeros(3)
    torch.save(state, extra / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="does not account for"):
        HookedSSM.from_pretrained(extra)

    not_weights = tmp_path / "not_weights"
    write_original_layout(hf_model, not_weights)
    torch.save({"step": 3, "note": "not a state dict"}, not_weights / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="state dict"):
        HookedSSM.from_pretrained(not_weights)

    no_weights = tmp_path / "no_weights"
    write_original_layout(hf_model, no_weights)
    (no_weights / "pytorch_model.bin").unlink()
    with pytest.raises(CheckpointError, match="holds no weights"):
        HookedSSM.from_pretrained(no_weights)


def test_release_table_names_the_real_checkpoints():
    from hooked_ssm.pretrained.model_names import find_release

    name, release = find_release("state-spaces/mamba2-370m")
    assert release.family == "mamba2" and release.repo_id == "state-spaces/mamba2-370m"
    assert release.expect == {"d_model": 1024, "n_layers": 48, "d_vocab": 50288}
    assert release.defaults["d_state"] == 128 and release.defaults["headdim"] == 64
    for size in ("130m", "370m", "780m", "1.3b", "2.7b"):
        assert find_release(f"state-spaces/mamba2-{size}") is not None
    assert find_release("state-spaces/mamba2-9b") is None


def test_left_padding_matches_unpadded_run(mamba2):
    """Padded tokens write nothing and leave zeros in the conv window (exact even with an in_proj bias)."""
    model = HookedSSM.from_pretrained(mamba2[1])
    tokens = _tokens(1, 20, seed=15)
    padded = torch.cat([torch.zeros(1, 5, dtype=torch.long), tokens], dim=1)
    mask = torch.cat([torch.zeros(1, 5, dtype=torch.long), torch.ones(1, 20, dtype=torch.long)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(model(padded, attention_mask=mask)[:, 5:], model(tokens), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_matches_transformers(mamba2, side):
    """Real positions of a padded batch against transformers given the same attention mask."""
    name, directory, hf_model = mamba2
    if side == "left" and FIXTURES[name]["use_bias"]:
        pytest.skip("transformers masks the conv input only after the convolution, so with an in_proj bias its "
                    "first real tokens read the pads' bias; HookedSSM matches the row alone instead "
                    "(test_left_padding_matches_unpadded_run)")
    model = HookedSSM.from_pretrained(directory)
    tokens = _tokens(2, 30, seed=21)
    mask = torch.ones_like(tokens)
    mask[1, slice(0, 11) if side == "left" else slice(19, 30)] = 0
    with torch.no_grad():
        ours = model(tokens, attention_mask=mask)
        theirs = hf_model(input_ids=tokens, attention_mask=mask, use_cache=False).logits
    real = mask.bool()
    torch.testing.assert_close(ours[real], theirs[real].to(ours.dtype), atol=1e-4, rtol=1e-4)


def test_release_names_resolve_through_the_table(mamba2_g1, tmp_path, monkeypatch):
    """Offline: the Hub download is faked; the table's defaults fill the silent ssm_cfg and its
    expected dims are checked against what was downloaded."""
    import huggingface_hub

    from hooked_ssm.pretrained import model_names

    _, hf_model = mamba2_g1
    write_original_layout(hf_model, tmp_path / "snapshot", ssm_cfg={"layer": "Mamba2"})
    requested = {}

    def fake_snapshot_download(repo_id, allow_patterns=None, **kwargs):
        requested[repo_id] = allow_patterns
        return str(tmp_path / "snapshot")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    tiny = model_names.Release("mamba2", "test-org/mamba2-tiny", defaults={"ngroups": 1},
                               expect={"d_model": 64, "n_layers": 3, "d_vocab": PADDED_VOCAB})
    monkeypatch.setitem(model_names.RELEASES, "test-org/mamba2-tiny", tiny)
    model = HookedSSM.from_pretrained("test-org/mamba2-tiny")
    assert "pytorch_model.bin" in requested["test-org/mamba2-tiny"]
    tokens = _tokens(1, 30)
    with torch.no_grad():
        assert (model(tokens) - _hf_logits(hf_model, tokens)).abs().max().item() <= TOL
    with pytest.raises(CheckpointError, match="dims of its release"):  # the real 370m expects d_model 1024
        HookedSSM.from_pretrained("state-spaces/mamba2-370m")
