"""HookedSSM on RWKV-7 ("x070"): parity with BlinkDL's ``rwkv`` package (a tiny random ``.pth``),
the fla-hub layout of the same weights, exact write / state edits against an independent explicit
recurrence, v_first semantics, generation with the recurrent cache, and clear errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from hooked_ssm import CheckpointError, HookedSSM, RecurrentState

VOCAB, C, N, LAYERS, FFN = 300, 192, 64, 3, 384  # head size 64 (3 heads): BlinkDL's and fla's GroupNorm eps agree
LORA = {"w": 16, "a": 16, "v": 8, "g": 24}
TOL = 1e-4


def make_blink_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """A random RWKV-7 state dict with BlinkDL's names and shapes (as in a released .pth)."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape, std=0.3: torch.randn(*shape, generator=gen) * std  # noqa: E731
    sd = {"emb.weight": rand(VOCAB, C, std=1.0), "blocks.0.ln0.weight": 1 + rand(C, std=0.1),
          "blocks.0.ln0.bias": rand(C, std=0.1), "ln_out.weight": 1 + rand(C, std=0.1),
          "ln_out.bias": rand(C, std=0.1), "head.weight": rand(VOCAB, C, std=0.2)}
    for i in range(LAYERS):
        p, a, f = f"blocks.{i}.", f"blocks.{i}.att.", f"blocks.{i}.ffn."
        for norm in ("ln1", "ln2"):
            sd[f"{p}{norm}.weight"], sd[f"{p}{norm}.bias"] = 1 + rand(C, std=0.1), rand(C, std=0.1)
        for name in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g"):
            sd[a + name] = torch.rand(1, 1, C, generator=gen)
        for name, rank in LORA.items():  # layer 0 carries v0/v1/v2 too in real files (unused)
            sd[f"{a}{name}1"], sd[f"{a}{name}2"] = rand(C, rank), rand(rank, C)
            if name != "g":
                sd[f"{a}{name}0"] = rand(1, 1, C, std=1.0)
        sd[a + "k_k"], sd[a + "k_a"] = 0.7 + rand(1, 1, C, std=0.1), 1 + rand(1, 1, C, std=0.1)
        sd[a + "r_k"] = rand(C // N, N, std=0.2)
        for name in ("receptance", "key", "value", "output"):
            sd[f"{a}{name}.weight"] = rand(C, C, std=C**-0.5)
        sd[a + "ln_x.weight"], sd[a + "ln_x.bias"] = 1 + rand(C, std=0.1), rand(C, std=0.1)
        sd[f + "x_k"] = torch.rand(1, 1, C, generator=gen)
        sd[f + "key.weight"], sd[f + "value.weight"] = rand(FFN, C, std=C**-0.5), rand(C, FFN, std=FFN**-0.5)
    return sd


def blink_to_fla(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The fla-hub ``RWKV7ForCausalLM`` layout of the same weights (MODELS.md section 3 key mapping)."""
    top = {"emb.weight": "model.embeddings.weight", "ln_out.weight": "model.norm.weight",
           "ln_out.bias": "model.norm.bias", "head.weight": "lm_head.weight"}
    parts = {"att": "attn", "ffn": "ffn", "ln0": "pre_norm", "ln1": "attn_norm", "ln2": "ffn_norm"}
    proj = {"receptance": "r_proj", "key": "k_proj", "value": "v_proj", "output": "o_proj", "ln_x": "g_norm"}
    out = {}
    for name, tensor in sd.items():
        if name in top:
            out[top[name]] = tensor.clone()
            continue
        _, layer, part, *rest = name.split(".")
        if name in ("blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2"):
            continue  # never used; fla's converter drops them
        leaf = rest[0]
        if part == "att" and len(leaf) == 2 and leaf[0] in "wavg" and leaf[1] in "012":
            slot = {"0": "2.bias", "1": "0.weight", "2": "2.weight"}[leaf[1]]
            leaf, tensor = f"{leaf[0]}_lora.lora.{slot}", tensor.t() if leaf[1] in "12" else tensor.reshape(-1)
            rest = [leaf]
        elif part == "att" and leaf in proj:
            rest = [proj[leaf], *rest[1:]]
        elif leaf in ("k_k", "k_a") or (part == "ffn" and leaf == "x_k"):
            tensor = tensor.reshape(-1)
        out[".".join(["model.layers", layer, parts[part], *rest])] = tensor.contiguous().clone()
    return out


def write_fla_checkpoint(sd, directory) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    config = {"architectures": ["RWKV7ForCausalLM"], "model_type": "rwkv7", "attn_mode": "chunk",
              "hidden_size": C, "num_hidden_layers": LAYERS, "head_dim": N, "num_heads": None,
              "decay_low_rank_dim": LORA["w"], "a_low_rank_dim": LORA["a"], "v_low_rank_dim": LORA["v"],
              "gate_low_rank_dim": LORA["g"], "intermediate_size": FFN, "hidden_ratio": FFN / C,
              "hidden_act": "sqrelu", "norm_first": True, "norm_bias": True, "norm_eps": 1e-5, "fuse_norm": False,
              "attn": None, "tie_word_embeddings": False, "vocab_size": VOCAB, "value_dim": [C] * LAYERS,
              "bos_token_id": 0, "eos_token_id": 0, "max_position_embeddings": 4096}
    (directory / "config.json").write_text(json.dumps(config))
    save_file(blink_to_fla(sd), directory / "model.safetensors")


@pytest.fixture(scope="module")
def blink_sd():
    return make_blink_state_dict()


@pytest.fixture(scope="module")
def pth_path(blink_sd, tmp_path_factory):
    path = tmp_path_factory.mktemp("rwkv7") / "rwkv7-tiny.pth"
    torch.save(blink_sd, path)
    return path


@pytest.fixture(scope="module")
def model(pth_path):
    return HookedSSM.from_pretrained(pth_path)


@pytest.fixture(scope="module")
def rwkv_reference(pth_path, blinkdl_rwkv):
    """BlinkDL's ``rwkv`` package (0.8.32), RWKV-7 CPU fp32 path."""
    return blinkdl_rwkv(pth_path)


def _tokens(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ explicit reference
def explicit_rwkv7(sd, tokens, write_override=None, states=None, layer_of_interest=None):
    """RWKV-7 recomputed token by token from a BlinkDL state dict (no library code), one sequence.

    State in BlinkDL's orientation ``[head, N_v, N_k]``. ``write_override = {t: [head, N_v, N_k]}``
    replaces the write ``v k~^T`` at ``t`` in ``layer_of_interest``; ``states`` collects that layer's
    state after each token.
    """
    H = C // N
    ln = lambda x, name: F.layer_norm(x, (C,), sd[f"{name}.weight"], sd[f"{name}.bias"], 1e-5)  # noqa: E731
    x = ln(sd["emb.weight"][tokens], "blocks.0.ln0")
    T = len(tokens)
    v_first = None
    for i in range(LAYERS):
        a_, f_ = f"blocks.{i}.att.", f"blocks.{i}.ffn."
        p = lambda name: sd[a_ + name].reshape(-1) if sd[a_ + name].dim() == 3 else sd[a_ + name]  # noqa: E731
        xx = ln(x, f"blocks.{i}.ln1")
        delta = torch.cat([torch.zeros(1, C), xx[:-1]]) - xx
        xr, xw, xk, xv, xa, xg = (xx + delta * p(n) for n in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g"))
        r, k, v = xr @ p("receptance.weight").T, xk @ p("key.weight").T, xv @ p("value.weight").T
        w = torch.exp(-math.exp(-0.5) * torch.sigmoid(p("w0") + torch.tanh(xw @ p("w1")) @ p("w2")))
        a = torch.sigmoid(p("a0") + (xa @ p("a1")) @ p("a2"))
        g = torch.sigmoid(xg @ p("g1")) @ p("g2")
        kk = F.normalize((k * p("k_k")).view(T, H, N), dim=-1).view(T, C)
        k = k * (1 + (a - 1) * p("k_a"))
        if i == 0:
            v_first = v
        else:
            v = v + (v_first - v) * torch.sigmoid(p("v0") + (xv @ p("v1")) @ p("v2"))
        S = torch.zeros(H, N, N)
        out = torch.zeros(T, C)
        for t in range(T):
            vk = v[t].view(H, N, 1) @ k[t].view(H, 1, N)
            if i == layer_of_interest and write_override is not None and t in write_override:
                vk = write_override[t]
            ab = (-kk[t]).view(H, N, 1) @ (kk[t] * a[t]).view(H, 1, N)
            S = S * w[t].view(H, 1, N) + S @ ab + vk
            if i == layer_of_interest and states is not None:
                states[t] = S
            out[t] = (S @ r[t].view(H, N, 1)).view(C)
        out = F.group_norm(out, H, p("ln_x.weight"), p("ln_x.bias"), eps=64e-5)
        out = out + ((r * k * p("r_k").reshape(-1)).view(T, H, N).sum(-1, keepdim=True) * v.view(T, H, N)).view(T, C)
        x = x + (out * g) @ p("output.weight").T
        xx = ln(x, f"blocks.{i}.ln2")
        delta = torch.cat([torch.zeros(1, C), xx[:-1]]) - xx
        hidden = torch.relu((xx + delta * sd[f_ + "x_k"].reshape(-1)) @ sd[f_ + "key.weight"].T) ** 2
        x = x + hidden @ sd[f_ + "value.weight"].T
    return ln(x, "ln_out") @ sd["head.weight"].T


# ------------------------------------------------------------------ parity
def test_logits_match_the_rwkv_package(model, rwkv_reference):
    assert model.cfg.layer_types == ["rwkv7"] * LAYERS
    assert (model.cfg.n_heads, model.cfg.d_k, model.cfg.rwkv_v_lora, model.cfg.rwkv_gate_lora) == (C // N, N, 8, 24)
    tokens = _tokens(2, 45, seed=1)
    with torch.no_grad():
        logits = model(tokens)
    for row in range(2):
        expected, _ = rwkv_reference.forward(tokens[row].tolist(), None, full_output=True)
        diff = (logits[row] - expected).abs().max().item()
        assert diff <= TOL, f"sequence {row}: max |logit diff| vs rwkv package {diff:.2e}"


def test_explicit_reference_matches_the_rwkv_package(blink_sd, rwkv_reference):
    tokens = _tokens(1, 30, seed=2)[0]
    expected, _ = rwkv_reference.forward(tokens.tolist(), None, full_output=True)
    assert (explicit_rwkv7(blink_sd, tokens) - expected).abs().max().item() <= TOL


def test_fla_hub_layout_loads_to_identical_logits(blink_sd, model, tmp_path):
    write_fla_checkpoint(blink_sd, tmp_path / "fla")
    fla_model = HookedSSM.from_pretrained(tmp_path / "fla")
    assert fla_model.cfg.original_architecture == "RWKV7ForCausalLM"
    assert fla_model.cfg.group_norm_eps == pytest.approx(model.cfg.group_norm_eps)
    tokens = _tokens(2, 33, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(fla_model(tokens), model(tokens), atol=0, rtol=0)


def test_chunked_and_recurrent_execution_agree(pth_path, rwkv_reference):
    """Plain forwards run the chunked form by default; the per-token loop gives the same logits,
    and both match the rwkv package."""
    chunked = HookedSSM.from_pretrained(pth_path)
    recurrent = HookedSSM.from_pretrained(pth_path, execution="recurrent")
    assert all(block.mixer.execution == "chunked" for block in chunked.blocks)
    tokens = _tokens(1, 70)
    with torch.no_grad():
        fast, slow = chunked(tokens), recurrent(tokens)
    torch.testing.assert_close(fast, slow, atol=1e-4, rtol=1e-4)
    expected, _ = rwkv_reference.forward(tokens[0].tolist(), None, full_output=True)
    assert (fast[0] - expected).abs().max() <= TOL


def test_write_edits_split_the_chunked_scan(pth_path, monkeypatch):
    """A few write edits keep the chunked form (split at the edits, no per-token loop) and equal the
    recurrent form's edited logits."""
    import hooked_ssm.components.rwkv7 as component

    chunked = HookedSSM.from_pretrained(pth_path)
    recurrent = HookedSSM.from_pretrained(pth_path, execution="recurrent")
    tokens = _tokens(1, 64, seed=6)
    new_write = torch.randn(C // N, N * N, generator=torch.Generator().manual_seed(7)) * 0.3

    def replace(write, hook):
        write[0, 40] = new_write
        return write

    hooks = [("blocks.1.mixer.hook_write", replace)]
    with torch.no_grad():
        expected = recurrent.run_with_hooks(tokens, fwd_hooks=hooks)
        monkeypatch.setattr(component, "recurrent_rwkv7", lambda *a, **kw: pytest.fail("per-token loop"))
        edited = chunked.run_with_hooks(tokens, fwd_hooks=hooks)
        clean = chunked(tokens)
    torch.testing.assert_close(edited, expected, atol=1e-4, rtol=1e-4)
    assert torch.equal(edited[:, :40], clean[:, :40])


# ------------------------------------------------------------------ hooks and exact edits
def test_write_edit_matches_the_explicit_recurrence(blink_sd, model):
    layer, edits_at = 1, (7, 19)
    tokens = _tokens(1, 32, seed=4)
    gen = torch.Generator().manual_seed(5)
    H = C // N
    replacement = {t: torch.randn(H, N, N, generator=gen) * 0.3 for t in edits_at}  # ours: key-major [N_k, N_v]

    def replace_write(write, hook):
        write = write.clone()
        for t, matrix in replacement.items():
            write[0, t] = matrix.flatten(-2)
        return write

    with torch.no_grad():
        clean = model(tokens)
        edited = model.run_with_hooks(tokens, fwd_hooks=[(f"blocks.{layer}.mixer.hook_write", replace_write)])
    blink_orientation = {t: m.transpose(-1, -2) for t, m in replacement.items()}  # BlinkDL: [N_v, N_k]
    expected = explicit_rwkv7(blink_sd, tokens[0], blink_orientation, layer_of_interest=layer)
    diff = (edited[0] - expected).abs().max().item()
    assert diff <= TOL, f"edited logits vs explicit recurrence {diff:.2e}"
    first = min(edits_at)
    assert torch.equal(edited[:, :first], clean[:, :first])
    assert (edited[:, first:] - clean[:, first:]).abs().amax(dim=(0, 2)).min() > 1e-3


def test_write_edit_changes_the_state_only(model):
    """The bonus term keeps the unedited k~ and v: at the edited token the read moves by exactly
    delta^T r, while the write key, value and everything before stay put."""
    tokens, t = _tokens(1, 20, seed=6), 9
    delta = torch.randn(1, C // N, N * N, generator=torch.Generator().manual_seed(8)) * 0.2
    names = ["blocks.2.mixer.hook_read", "blocks.2.mixer.hook_k", "blocks.2.mixer.hook_v", "blocks.2.mixer.hook_q"]
    _, clean = model.run_with_cache(tokens, names_filter=names)

    def add(write, hook):
        write = write.clone()
        write[:, t] += delta
        return write

    model.add_hook("blocks.2.mixer.hook_write", add)
    try:
        _, edited = model.run_with_cache(tokens, names_filter=names, reset_hooks_end=False)
    finally:
        model.reset_hooks()
    for name in names[1:]:
        assert torch.equal(edited[name], clean[name])
    r = clean["blocks.2.mixer.hook_q"][0, t]
    expected = clean["blocks.2.mixer.hook_read"][0, t] + torch.einsum("hkv,hk->hv", delta[0].view(-1, N, N), r)
    torch.testing.assert_close(edited["blocks.2.mixer.hook_read"][0, t], expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(edited["blocks.2.mixer.hook_read"][:, :t], clean["blocks.2.mixer.hook_read"][:, :t])


def test_state_hook_equals_the_recurrent_state(blink_sd, model):
    layer, tokens = 2, _tokens(1, 25, seed=9)
    states: dict[int, torch.Tensor] = {}
    explicit_rwkv7(blink_sd, tokens[0], states=states, layer_of_interest=layer)
    expected = torch.stack([states[t] for t in range(25)]).transpose(-1, -2).flatten(-2)[None]  # key-major
    _, cache = model.run_with_cache(tokens, names_filter=f"blocks.{layer}.mixer.hook_state")
    torch.testing.assert_close(cache[f"blocks.{layer}.mixer.hook_state"], expected, atol=1e-5, rtol=1e-5)
    positions = [3, 24]
    _, selected = model.run_with_cache(tokens, names_filter=f"blocks.{layer}.mixer.hook_state", pos_slice=positions)
    assert selected[f"blocks.{layer}.mixer.hook_state"].shape == (1, 2, C // N, N * N)
    torch.testing.assert_close(selected[f"blocks.{layer}.mixer.hook_state"], expected[:, positions], atol=1e-5, rtol=1e-5)


def test_state_edit_equals_the_same_write_edit(model):
    tokens, t = _tokens(2, 18, seed=10), 11
    delta = torch.randn(2, C // N, N * N, generator=torch.Generator().manual_seed(2)) * 0.2

    def add(x, hook):
        x = x.clone()
        x[:, t] += delta
        return x

    def add_at_selected(x, hook):
        return x + delta[:, None]

    with torch.no_grad():
        via_write = model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.mixer.hook_write", add)])
        # hook_state at the one selected position t: the returned S_t + delta replaces S_t and the
        # recurrence continues from it, which is what a write edit of delta at t does.
        via_state = model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.mixer.hook_state", add_at_selected)],
                                         state_positions=[t])
    # RWKV-7's states come from its per-token form, the write edit runs the chunked one: float32 rounding apart.
    torch.testing.assert_close(via_write, via_state, atol=5e-5, rtol=1e-5)


def test_v_first_semantics(model):
    """Editing layer 0's hook_v_first reaches later layers' value mix; editing layer 0's hook_v does not."""
    tokens = _tokens(1, 12, seed=12)
    watch = ["blocks.1.mixer.hook_v_first", "blocks.0.mixer.hook_v", "blocks.2.mixer.hook_v_first"]
    _, clean = model.run_with_cache(tokens, names_filter=watch)
    torch.testing.assert_close(clean["blocks.1.mixer.hook_v_first"], clean["blocks.0.mixer.hook_v"])

    def run(hook_name):
        seen = {}
        model.run_with_hooks(tokens, fwd_hooks=[
            (hook_name, lambda x, hook: x + 1.0),
            *[(name, lambda x, hook: seen.setdefault(hook.name, x.clone())) for name in watch],
        ])
        return seen

    after_v = run("blocks.0.mixer.hook_v")
    assert torch.equal(after_v["blocks.1.mixer.hook_v_first"], clean["blocks.1.mixer.hook_v_first"])
    after_v_first = run("blocks.0.mixer.hook_v_first")
    torch.testing.assert_close(after_v_first["blocks.2.mixer.hook_v_first"], clean["blocks.2.mixer.hook_v_first"] + 1.0)
    torch.testing.assert_close(after_v_first["blocks.0.mixer.hook_v"], clean["blocks.0.mixer.hook_v"] + 1.0)


def test_hook_shapes(model):
    tokens = _tokens(2, 7)
    _, cache = model.run_with_cache(tokens)
    shapes = {name.split(".")[-1]: tuple(act.shape) for name, act in cache.items() if name.startswith("blocks.1.mixer.")}
    per_channel = (2, 7, C // N, N)
    for name in ("hook_q", "hook_k", "hook_v", "hook_decay", "hook_erase_key", "hook_a", "hook_read", "hook_z",
                 "hook_v_first", "hook_gate"):
        assert shapes[name] == per_channel, name
    assert shapes["hook_write"] == shapes["hook_state"] == (2, 7, C // N, N * N)
    assert cache["blocks.0.ln0.hook_normalized"].shape == (2, 7, C)
    torch.testing.assert_close(cache["blocks.0.hook_resid_pre"], cache["blocks.0.ln0.hook_normalized"])
    decay = cache["blocks.1.mixer.hook_decay"]
    assert decay.min() > math.exp(-math.exp(-0.5)) - 1e-6 and decay.max() < 1
    torch.testing.assert_close(cache["blocks.1.mixer.hook_erase_key"].norm(dim=-1), torch.ones(per_channel[:3]))


def test_unknown_hook_name_is_a_clear_error(model):
    with pytest.raises(KeyError, match="Unknown hook name.*hook_erase_key"):
        model.run_with_hooks(_tokens(1, 4), fwd_hooks=[("blocks.0.mixer.hook_erase_keys", lambda x, hook: x)])
    with pytest.raises(KeyError, match="Unknown hook name"):
        model.run_with_cache(_tokens(1, 4), names_filter=["blocks.0.mixer.hook_beta"])


# ------------------------------------------------------------------ generation and cache
def test_generate_with_recurrent_cache_equals_full_forwards(model):
    tokens = _tokens(2, 9, seed=13)
    kwargs = dict(max_new_tokens=7, do_sample=False, stop_at_eos=False, verbose=False)
    cached = model.generate(tokens, use_past_kv_cache=True, **kwargs)
    uncached = model.generate(tokens, use_past_kv_cache=False, **kwargs)
    assert cached.shape == (2, 16)
    assert torch.equal(cached, uncached)


def test_recurrent_state_continues_a_sequence(model, rwkv_reference):
    tokens = _tokens(1, 24, seed=14)
    state = RecurrentState.empty(model.cfg.layer_types)
    with torch.no_grad():
        full = model(tokens)
        pieces = [model(tokens[:, :10], past_state=state)] + [model(tokens[:, t : t + 1], past_state=state) for t in range(10, 24)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-4, rtol=1e-4)
    # the carried state is BlinkDL's, transposed
    _, blink_state = rwkv_reference.forward(tokens[0].tolist(), None)
    for layer in range(LAYERS):
        cache = state.layers[layer]
        torch.testing.assert_close(cache.ssm_state[0], blink_state[3 * layer + 1].transpose(-1, -2), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(cache.mixer_shift[0], blink_state[3 * layer], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cache.mlp_shift[0], blink_state[3 * layer + 2], atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ malformed checkpoints
def test_malformed_checkpoints_give_clear_errors(blink_sd, tmp_path):
    truncated = tmp_path / "truncated.pth"
    torch.save(blink_sd, truncated)
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="truncated|corrupt"):
        HookedSSM.from_pretrained(truncated)

    with pytest.raises(CheckpointError, match="does not exist"):
        HookedSSM.from_pretrained(tmp_path / "absent.pth")

    rwkv6 = tmp_path / "rwkv6.pth"
    torch.save({"emb.weight": torch.zeros(4, 8), "blocks.0.att.time_decay": torch.zeros(8)}, rwkv6)
    with pytest.raises(CheckpointError, match="Not an RWKV-7"):
        HookedSSM.from_pretrained(rwkv6)

    not_a_state_dict = tmp_path / "list.pth"
    torch.save([torch.zeros(3)], not_a_state_dict)
    with pytest.raises(CheckpointError, match="state dict"):
        HookedSSM.from_pretrained(not_a_state_dict)

    missing = tmp_path / "missing.pth"
    torch.save({k: v for k, v in blink_sd.items() if k != "blocks.2.att.k_a"}, missing)
    with pytest.raises(CheckpointError, match="blocks.2.att.k_a"):
        HookedSSM.from_pretrained(missing)

    bad_shape = tmp_path / "bad_shape.pth"
    torch.save({**blink_sd, "blocks.1.att.r_k": torch.zeros(C // N, N + 1)}, bad_shape)
    with pytest.raises(CheckpointError, match="do not fit"):
        HookedSSM.from_pretrained(bad_shape)

    hybrid = tmp_path / "fla_hybrid"
    write_fla_checkpoint(blink_sd, hybrid)
    config = json.loads((hybrid / "config.json").read_text())
    (hybrid / "config.json").write_text(json.dumps({**config, "attn": {"layers": [1], "num_heads": 3}}))
    with pytest.raises(CheckpointError, match="attn"):
        HookedSSM.from_pretrained(hybrid)


def test_release_table_names_the_real_checkpoints():
    from hooked_ssm.pretrained.model_names import find_release

    for family, repo in (("g1", "BlinkDL/rwkv7-g1"), ("world", "BlinkDL/rwkv-7-world")):
        for size, (d_model, layers) in {"0.1b": (768, 12), "0.4b": (1024, 24), "1.5b": (2048, 24), "2.9b": (2560, 32)}.items():
            _, release = find_release(f"rwkv7-{family}-{size}")
            assert release.repo_id == repo and release.filename.endswith(".pth")
            assert release.expect["d_model"] == d_model and release.expect["n_layers"] == layers
    assert find_release("RWKV7-G1-0.4B")[0] == "rwkv7-g1-0.4b"


def test_left_padding_matches_unpadded_run(model):
    tokens = _tokens(1, 15, seed=16)
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), tokens], dim=1)
    mask = torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 15, dtype=torch.long)], dim=1)
    with torch.no_grad():  # 19 tokens run chunked, 15 recurrent: the two forms agree to float32 rounding
        torch.testing.assert_close(model(padded, attention_mask=mask)[:, 4:], model(tokens), atol=TOL, rtol=TOL)


def test_release_names_resolve_through_the_table(pth_path, monkeypatch):
    """Offline: the Hub download is faked; the expected dims of a real release are checked."""
    import huggingface_hub

    from hooked_ssm.pretrained import model_names

    requested = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download",
                        lambda repo_id, filename, **kwargs: requested.append((repo_id, filename)) or str(pth_path))
    tiny = model_names.Release("rwkv7", "test-org/rwkv7", "tiny.pth", {"eos_token_id": 0},
                               {"d_model": C, "n_layers": LAYERS, "d_vocab": VOCAB, "d_k": N})
    monkeypatch.setitem(model_names.RELEASES, "rwkv7-tiny", tiny)
    model = HookedSSM.from_pretrained("rwkv7-tiny")
    assert requested == [("test-org/rwkv7", "tiny.pth")]
    assert model.cfg.d_model == C and model.cfg.eos_token_id == 0
    with pytest.raises(CheckpointError, match="dims of its release"):
        HookedSSM.from_pretrained("rwkv7-world-0.1b")
    assert requested[-1] == ("BlinkDL/rwkv-7-world", "RWKV-x070-World-0.1B-v2.8-20241210-ctx4096.pth")


# ------------------------------------------------------------------ BlinkDL names in safetensors (no pickle)
def test_blinkdl_safetensors_file_loads_like_the_pth(blink_sd, model, tmp_path):
    path = tmp_path / "rwkv7-tiny.safetensors"
    save_file({k: v.contiguous() for k, v in blink_sd.items()}, path)
    from_safetensors = HookedSSM.from_pretrained(path)
    assert from_safetensors.cfg.original_architecture == "rwkv7_blinkdl"
    tokens = _tokens(2, 21, seed=17)
    with torch.no_grad():
        torch.testing.assert_close(from_safetensors(tokens), model(tokens), atol=0, rtol=0)
    with pytest.raises(CheckpointError, match="does not exist"):
        HookedSSM.from_pretrained(tmp_path / "absent.safetensors")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        HookedSSM.from_pretrained(truncated)


def test_blinkdl_directory_with_config_json(blink_sd, model, tmp_path):
    """The bundled toy-rwkv7's layout: config.json declaring rwkv7_blinkdl + BlinkDL-named safetensors."""
    directory = tmp_path / "blink_dir"
    directory.mkdir()
    save_file({k: v.contiguous() for k, v in blink_sd.items()}, directory / "model.safetensors")
    config = {"architectures": ["rwkv7_blinkdl"], "vocab_size": VOCAB, "hidden_size": C, "num_hidden_layers": LAYERS,
              "head_size": N, "v_low_rank_dim": LORA["v"], "bos_token_id": 5, "eos_token_id": 6, "pad_token_id": 7,
              "max_position_embeddings": 1024}
    (directory / "config.json").write_text(json.dumps(config))
    loaded = HookedSSM.from_pretrained(directory)
    assert (loaded.cfg.bos_token_id, loaded.cfg.eos_token_id, loaded.cfg.pad_token_id, loaded.cfg.n_ctx) == (5, 6, 7, 1024)
    assert loaded.cfg.default_prepend_bos and not model.cfg.default_prepend_bos
    tokens = _tokens(1, 19, seed=18)
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens), model(tokens), atol=0, rtol=0)
    (directory / "config.json").write_text(json.dumps({**config, "head_size": 32}))
    with pytest.raises(CheckpointError, match="does not match the weights"):
        HookedSSM.from_pretrained(directory)


def test_to_blink_state_dict_gives_back_the_original_tensors(blink_sd, model):
    from hooked_ssm.pretrained.rwkv7 import to_blink_state_dict

    exported = to_blink_state_dict(model.state_dict(), model.cfg)
    unused = {"blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2"}  # in BlinkDL's files, never read
    assert set(exported) == set(blink_sd) - unused
    for name, tensor in exported.items():
        assert tensor.shape == blink_sd[name].shape, name
        assert torch.equal(tensor, blink_sd[name]), name
