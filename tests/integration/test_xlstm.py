"""xLSTM (mLSTM layers) from a tiny random ``save_pretrained`` checkpoint: parity with every path
transformers runs on CPU (chunkwise + recurrent tail, pure chunkwise, token-by-token decoding, fused
weights), write and state edits against a hand-written float64 per-token recurrence run inside the
transformers model, exact causality, the closed form the hooks promise, and generation with the
recurrent cache."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from random_weights import randomize_
from test_mamba2_hybrids import check_generation
from transformers import xLSTMConfig, xLSTMForCausalLM
from transformers.initialization import no_init_weights

from hooked_ssm import HookedSSM

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, TOL, LAYER = 300, 1e-4, 2


def _config(**kwargs) -> xLSTMConfig:
    # hidden 128: q/k width 64 and v width 128 are multiples of 64, as transformers' cache assumes.
    return xLSTMConfig(
        vocab_size=VOCAB, hidden_size=128, num_hidden_layers=3, num_heads=4, ffn_proj_factor=1.0, chunk_size=16,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, **kwargs,
    )


def build() -> xLSTMForCausalLM:
    torch.manual_seed(0)
    model = randomize_(xLSTMForCausalLM(_config()))
    # Gate biases spread so that both the input gate (i~ > m) and the decayed stabiliser (m_{t-1} + log f)
    # win the max, and the normaliser's floor exp(-m) and |n.q| both matter.
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in model.backbone.blocks:
            layer.mlstm_layer.igate_preact.bias.copy_(4 * torch.randn(4, generator=gen))
            layer.mlstm_layer.fgate_preact.bias.copy_(2 + 2 * torch.randn(4, generator=gen))
    return model


def build_fused(single: xLSTMForCausalLM) -> xLSTMForCausalLM:
    """``single``'s weights in ``weight_mode="fused"`` (transformers 5.25 cannot initialise a fused
    model itself: its ``_init_weights`` mis-sizes the fused gate bias)."""
    fused = {}
    for name, tensor in single.state_dict().items():
        prefix, _, leaf = name.rpartition("mlstm_layer.")
        if leaf in ("q.weight", "igate_preact.weight", "igate_preact.bias") or name.endswith("ffn.proj_up_gate.weight"):
            continue
        if leaf in ("k.weight", "v.weight", "ogate_preact.weight", "fgate_preact.weight", "fgate_preact.bias"):
            continue
        fused[name] = tensor
    for block in range(single.config.num_hidden_layers):
        src = f"backbone.blocks.{block}."
        w = lambda leaf: single.state_dict()[src + leaf]  # noqa: E731
        fused[src + "mlstm_layer.qkv_opreact.weight"] = torch.cat(
            [w(f"mlstm_layer.{n}.weight") for n in ("q", "k", "v", "ogate_preact")])
        for kind in ("weight", "bias"):
            fused[src + f"mlstm_layer.ifgate_preact.{kind}"] = torch.cat(
                [w(f"mlstm_layer.igate_preact.{kind}"), w(f"mlstm_layer.fgate_preact.{kind}")])
        fused[src + "ffn.proj_up_gate_z.weight"] = torch.cat([w("ffn.proj_up_gate.weight"), w("ffn.proj_up.weight")])
        del fused[src + "ffn.proj_up.weight"]
    with no_init_weights():
        model = xLSTMForCausalLM(_config(weight_mode="fused"))
    model.load_state_dict(fused, strict=True)
    return model.eval()


@pytest.fixture(scope="module")
def xlstm(tmp_path_factory):
    hf_model = build()
    directory = tmp_path_factory.mktemp("xlstm")
    hf_model.save_pretrained(directory)
    return directory, hf_model


def _tokens(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _set_mode(hf_model: xLSTMForCausalLM, mode: str) -> None:
    """transformers' backends read ``mode`` from the shared config at each call."""
    hf_model.config.mode = mode


def _decode_token_by_token(hf_model: xLSTMForCausalLM, tokens: torch.Tensor) -> torch.Tensor:
    cache, logits = None, []
    for t in range(tokens.shape[1]):
        out = hf_model(input_ids=tokens[:, t : t + 1], cache=cache, use_cache=True)
        cache = out.cache
        logits.append(out.logits)
    return torch.cat(logits, dim=1)


def explicit_mlstm(layer, hidden, write_override=None, state_override=None, states=None):
    """transformers' xLSTMLayer recomputed token by token in float64 from its weights.

    ``write_override`` ``{t: [batch, head, d_k, d_v]}`` replaces the stabilised write
    ``exp(i~_t - m_t) k_t v_t^T`` of the memory; ``state_override`` ``{t: ...}`` replaces the memory
    ``C_t`` after the update at t. Neither touches the normaliser or the stabiliser. ``states``:
    filled with ``C_t``.
    """
    cfg = layer.config
    batch, length, _ = hidden.shape
    heads = cfg.num_heads
    cap = lambda x: cfg.gate_soft_cap * torch.tanh(x / cfg.gate_soft_cap)  # noqa: E731
    x = hidden.double()
    linear = lambda module: F.linear(x, module.weight.double(), None if module.bias is None else module.bias.double())  # noqa: E731
    q, k, v = (linear(module).view(batch, length, heads, -1) for module in (layer.q, layer.k, layer.v))
    i_pre, f_pre = cap(linear(layer.igate_preact)), cap(linear(layer.fgate_preact))
    d_k, d_v = q.shape[-1], v.shape[-1]
    memory = x.new_zeros(batch, heads, d_k, d_v)
    normalizer = x.new_zeros(batch, heads, d_k)
    max_state = x.new_zeros(batch, heads)
    outputs = []
    for t in range(length):
        log_f = F.logsigmoid(f_pre[:, t])
        new_max = torch.maximum(log_f + max_state, i_pre[:, t])
        decay, strength = torch.exp(log_f + max_state - new_max), torch.exp(i_pre[:, t] - new_max)
        write = strength[..., None, None] * k[:, t, :, :, None] * v[:, t, :, None, :]
        if write_override is not None and t in write_override:
            write = write_override[t].double()
        memory = decay[..., None, None] * memory + write
        if state_override is not None and t in state_override:
            memory = state_override[t].double()
        normalizer = decay[..., None] * normalizer + strength[..., None] * k[:, t]
        max_state = new_max
        if states is not None:
            states[t] = memory.float()
        query = q[:, t] * d_k**-0.5
        denominator = torch.maximum((query * normalizer).sum(-1).abs(), torch.exp(-max_state)) + cfg.eps
        outputs.append(torch.einsum("bhkv,bhk->bhv", memory, query) / denominator[..., None])
    h = torch.stack(outputs, dim=1).float()
    h_norm = layer.multihead_norm(h)
    return layer.out_proj(torch.sigmoid(layer.ogate_preact(hidden)) * h_norm), None


def brute_force_logits(hf_model, tokens, **overrides):
    layer = hf_model.backbone.blocks[LAYER].mlstm_layer
    layer.forward = lambda x, state=None: explicit_mlstm(layer, x, **overrides)
    try:
        with torch.no_grad():
            return hf_model(input_ids=tokens, use_cache=False).logits
    finally:
        del layer.forward


@pytest.mark.parametrize("execution", ["chunked", "recurrent"])
def test_logits_match_transformers(xlstm, execution):
    """37 tokens: transformers runs two chunks of 16 chunkwise, then 5 tokens with its sequence kernel;
    64 tokens in ``mode="train"``: chunkwise only; 20 tokens one at a time through its cache: the step kernel."""
    directory, hf_model = xlstm
    model = HookedSSM.from_pretrained(directory, execution=execution)
    tokens = {length: _tokens(2, length, seed=length) for length in (37, 64, 20)}
    with torch.no_grad():
        references = {"inference/37": (37, hf_model(input_ids=tokens[37], use_cache=False).logits),
                      "decoding/20": (20, _decode_token_by_token(hf_model, tokens[20]))}
        _set_mode(hf_model, "train")
        try:
            references["train/64"] = (64, hf_model(input_ids=tokens[64], use_cache=False).logits)
        finally:
            _set_mode(hf_model, "inference")
        for path, (length, expected) in references.items():
            diff = (model(tokens[length]) - expected).abs().max().item()
            assert diff <= TOL, f"{execution} vs transformers {path}: max |logit diff| {diff:.2e}"


def test_fused_weights_match_transformers(xlstm, tmp_path):
    hf_model = build_fused(xlstm[1])
    hf_model.save_pretrained(tmp_path)
    model = HookedSSM.from_pretrained(tmp_path)
    tokens = _tokens(2, 37)
    with torch.no_grad():
        assert (model(tokens) - hf_model(input_ids=tokens, use_cache=False).logits).abs().max() <= TOL


def test_config_naming_triton_kernels_loads(xlstm, tmp_path):
    """A config.json that names GPU kernels (as the xLSTM-7b release does), which transformers' own
    ``xLSTMConfig`` refuses without the ``xlstm`` package, loads: the kernels do not change the math."""
    directory, hf_model = xlstm
    for file in directory.iterdir():
        (tmp_path / file.name).write_bytes(file.read_bytes())
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(chunkwise_kernel="chunkwise--triton_xl_chunk", sequence_kernel="native_sequence__triton", step_kernel="triton")
    (tmp_path / "config.json").write_text(json.dumps(config))
    tokens = _tokens(1, 20)
    with torch.no_grad():
        assert (HookedSSM.from_pretrained(tmp_path)(tokens) - hf_model(input_ids=tokens).logits).abs().max() <= TOL


def test_brute_force_reference_matches_transformers(xlstm):
    _, hf_model = xlstm
    tokens = _tokens(2, 37)
    with torch.no_grad():
        expected = hf_model(input_ids=tokens, use_cache=False).logits
    assert (brute_force_logits(hf_model, tokens) - expected).abs().max() <= TOL


def _assert_exact_and_causal(edited, clean, reference, first, what):
    diff = (edited - reference).abs().max().item()
    assert diff <= TOL, f"{what}: edited logits vs float64 per-token loop {diff:.2e}"
    assert torch.equal(edited[:, :first], clean[:, :first]), f"{what}: an edit at {first} moved an earlier logit"
    assert (edited[:, first] - clean[:, first]).abs().max() > 1e-3


@pytest.mark.parametrize("execution", ["chunked", "recurrent"])
def test_write_edit_is_exact_and_causal(xlstm, execution):
    directory, hf_model = xlstm
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
    reference = brute_force_logits(hf_model, tokens, write_override=replacement)
    _assert_exact_and_causal(edited, clean, reference, min(edits_at), f"{execution} write edit")


@pytest.mark.parametrize("execution", ["chunked", "recurrent"])
def test_state_edit_replaces_exactly(xlstm, execution):
    directory, hf_model = xlstm
    model = HookedSSM.from_pretrained(directory, execution=execution)
    tokens, at = _tokens(2, 50, seed=4), 30
    states = {}
    brute_force_logits(hf_model, tokens, states=states)
    replaced = states[at] + 0.5 * torch.randn(states[at].shape, generator=torch.Generator().manual_seed(8))

    def replace_state(state, hook):
        state = state.clone()
        state[:, 0] = replaced.flatten(-2)
        return state

    name = f"blocks.{LAYER}.mixer.hook_state"
    with torch.no_grad():
        clean = model(tokens)
        edited = model.run_with_hooks(tokens, fwd_hooks=[(name, replace_state)], state_positions=[at])
    reference = brute_force_logits(hf_model, tokens, state_override={at: replaced})
    _assert_exact_and_causal(edited, clean, reference, at, f"{execution} state edit")


def test_state_hook_equals_brute_force_states(xlstm):
    directory, hf_model = xlstm
    model = HookedSSM.from_pretrained(directory)
    tokens, states = _tokens(2, 40, seed=5), {}
    brute_force_logits(hf_model, tokens, states=states)
    expected = torch.stack([states[t] for t in range(40)], dim=1).flatten(-2)
    name = f"blocks.{LAYER}.mixer.hook_state"
    _, cache = model.run_with_cache(tokens, names_filter=name)
    # float32 (inputs from layers 0-1 that differ from transformers' by rounding) vs float64
    torch.testing.assert_close(cache[name], expected, atol=TOL, rtol=TOL)


def test_write_edit_reaches_reads_through_hook_decay_and_hook_q(xlstm):
    """What writesae_lens's closed forms assume: a write edit D at t0 moves the read at t >= t0 by
    ``prod_{t0 < r <= t} hook_decay_r * D^T hook_q_t``."""
    directory, _ = xlstm
    model = HookedSSM.from_pretrained(directory)
    tokens, t0 = _tokens(1, 40, seed=6), 12
    prefix = f"blocks.{LAYER}.mixer."
    delta = torch.randn(model.cfg.n_heads, model.cfg.d_k, model.cfg.d_v, generator=torch.Generator().manual_seed(9))

    def add_to_write(write, hook):
        write[:, t0] += delta.flatten(-2)

    names = [prefix + name for name in ("hook_read", "hook_decay", "hook_q")]
    _, clean = model.run_with_cache(tokens, names_filter=names)
    with model.hooks(fwd_hooks=[(prefix + "hook_write", add_to_write)]):
        _, edited = model.run_with_cache(tokens, names_filter=names)
    persistence = torch.cat([torch.ones(1, model.cfg.n_heads), clean[prefix + "hook_decay"][0, t0 + 1 :].cumprod(dim=0)])
    predicted = persistence[..., None] * torch.einsum("hkv,thk->thv", delta, clean[prefix + "hook_q"][0, t0:])
    torch.testing.assert_close(edited[prefix + "hook_read"][0, t0:] - clean[prefix + "hook_read"][0, t0:], predicted,
                               atol=1e-5, rtol=1e-4)


def test_gate_hooks_are_inputs_and_causal(xlstm):
    """hook_igate / hook_fgate hold transformers' soft-capped gate logits; an edit at t moves nothing before t."""
    directory, hf_model = xlstm
    model = HookedSSM.from_pretrained(directory)
    tokens, at = _tokens(2, 40, seed=10), 17
    prefix = f"blocks.{LAYER}.mixer."
    _, cache = model.run_with_cache(tokens, names_filter=[prefix + "hook_igate", f"blocks.{LAYER}.hook_resid_pre"])
    layer = hf_model.backbone.blocks[LAYER]
    with torch.no_grad():
        x = layer.norm_mlstm(cache[f"blocks.{LAYER}.hook_resid_pre"])
        cap = layer.config.gate_soft_cap
        expected = cap * torch.tanh(layer.mlstm_layer.igate_preact(x) / cap)
    torch.testing.assert_close(cache[prefix + "hook_igate"], expected, atol=1e-5, rtol=1e-5)

    def bump(gate, hook):
        gate[:, at] += 3.0

    with torch.no_grad():
        clean = model(tokens)
        for name in ("hook_igate", "hook_fgate"):
            edited = model.run_with_hooks(tokens, fwd_hooks=[(prefix + name, bump)])
            assert torch.equal(edited[:, :at], clean[:, :at]) and (edited[:, at:] - clean[:, at:]).abs().max() > 1e-4


def test_left_padded_row_equals_the_row_alone(xlstm):
    directory, _ = xlstm
    model = HookedSSM.from_pretrained(directory)
    tokens = _tokens(1, 30, seed=12)
    padded = torch.cat([torch.zeros(1, 7, dtype=torch.long), tokens], dim=1)
    mask = torch.cat([torch.zeros(1, 7, dtype=torch.long), torch.ones(1, 30, dtype=torch.long)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(model(padded, attention_mask=mask)[:, 7:], model(tokens), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("execution", ["chunked", "recurrent"])
def test_generation_with_the_recurrent_cache(xlstm, execution):
    directory, hf_model = xlstm
    check_generation(HookedSSM.from_pretrained(directory, execution=execution), hf_model)


@pytest.mark.parametrize("execution", ["chunked", "recurrent"])
@pytest.mark.parametrize("hook", ["hook_k", "hook_igate", "hook_fgate"])
def test_non_finite_value_never_reaches_earlier_positions(xlstm, execution, hook):
    """A NaN in a key or a gate at t (through the stabiliser's cumulative max, the normaliser and the
    memory) never reaches positions before t (as tests/integration/test_non_finite_causality.py)."""
    directory, _ = xlstm
    model = HookedSSM.from_pretrained(directory, execution=execution)
    tokens, at = _tokens(2, 40, seed=13), 25

    def poison(value, hook):
        value[:, at] = float("nan")

    with torch.no_grad():
        clean = model(tokens)
        poisoned = model.run_with_hooks(tokens, fwd_hooks=[(f"blocks.{LAYER}.mixer.{hook}", poison)])
    # A chunked scan hands a non-finite input to the per-token form: earlier positions agree to rounding.
    torch.testing.assert_close(poisoned[:, :at], clean[:, :at], atol=TOL, rtol=TOL)
    assert not torch.isfinite(poisoned[:, at:]).all()
