"""Cache writes chosen by the closed form: sustained installs during greedy decoding, single-position
sign prediction, and cache-slot erasure."""

import pytest
import torch
from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

import writesae_lens.saes  # noqa: F401
from hooked_ssm import HookedSSM
from writesae_lens.analysis.report import format_steering_table
from writesae_lens.interventions.erasure import run_erasure
from writesae_lens.interventions.sites import Site
from writesae_lens.interventions.steering import (
    install_hook,
    readout_matrix,
    run_install_experiment,
    run_sign_prediction,
    sustained_install,
    target_directions,
)
from writesae_lens.saes import WriteSAE, WriteSAEConfig

HEAD = 1


# Many tiny forwards: on a shared CPU one thread is far faster (fixture in tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """1-layer Gated DeltaNet (Qwen3.5 layout), slow forget gates (a ~ 0.97), untied embeddings."""
    config = Qwen3_5TextConfig(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=1, layer_types=["linear_attention"],
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
        linear_key_head_dim=16, linear_value_head_dim=8, linear_conv_kernel_dim=4, hidden_act="silu",
        rms_norm_eps=1e-6, max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    hf = Qwen3_5ForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in hf.named_parameters():
            param.add_((0.3 if "norm" in name or "dt_bias" in name else 0.05) * torch.randn(param.shape, generator=gen))
        hf.model.layers[0].linear_attn.A_log.fill_(-3.0)
    directory = tmp_path_factory.mktemp("install_gdn")
    hf.save_pretrained(directory)
    return HookedSSM.from_pretrained(directory)


@pytest.fixture(scope="module")
def contexts():
    return torch.randint(3, 300, (6, 12), generator=torch.Generator().manual_seed(1))


def linearising_hooks():
    """Read -> logits made linear (gated norm, MLP and final norm bypassed): the closed form is
    then the exact logit change, so a written direction does what the formula says."""
    seen = {}

    def keep(key):
        def hook(act, hook):
            seen[key] = act
        return hook

    return [
        ("blocks.0.mixer.hook_read", keep("read")),
        ("blocks.0.mixer.hook_z", lambda act, hook: seen["read"]),
        ("blocks.0.hook_mlp_out", lambda act, hook: torch.zeros_like(act)),
        ("blocks.0.hook_resid_post", keep("resid")),
        ("ln_final.hook_normalized", lambda act, hook: seen["resid"]),
    ]


def extreme_targets(model, base_logits, lo=20, hi=150):
    """Per row, the mid-rank token (rank lo..hi) whose readout W_O[h] W_U[:, T] has the largest norm
    and beats every other token along its own direction (so a large install makes it the argmax)."""
    readout = readout_matrix(model, 0, HEAD)  # [d_v, vocab]
    unit = readout / readout.norm(dim=0, keepdim=True)
    along = unit.T @ readout  # [T, T']: logit of T' along T's direction
    wins = along.diagonal() >= along.max(dim=1).values - 1e-6
    order = base_logits.argsort(dim=-1, descending=True)
    out = []
    for row in range(len(base_logits)):
        candidates = [int(t) for t in order[row, lo:hi] if wins[t]]
        out.append(max(candidates, key=lambda t: float(readout[:, t].norm())))
    return torch.tensor(out)


def test_sustained_install_puts_the_target_in_the_greedy_continuation(model, contexts):
    with model.hooks(fwd_hooks=linearising_hooks()):
        base_last = model(contexts)[:, -1]
        targets = extreme_targets(model, base_last)
        small = sustained_install(model, 0, HEAD, contexts, targets, multiplier=0.01, key="query", max_new_tokens=8)
        out = sustained_install(model, 0, HEAD, contexts, targets, multiplier=5000.0, key="query", max_new_tokens=8)
    assert not out["included_base"].any()
    assert out["included"].all(), out["continuation"]
    assert (out["logp"] > out["logp_base"] + 1.0).all()
    assert (out["rank"] == 1).all() and (out["rank_base"] > 20).all()
    assert not small["included"].any()  # a tiny install does not do it


def test_install_hook_targets_absolute_positions_during_generation(model, contexts):
    """Installs at positions inside the decoded span (written while generating, one token per call)
    equal a teacher-forced re-run of the generated sequence with the same edits."""
    prompt = contexts[:2]
    length = prompt.shape[1]
    site = Site(0, HEAD)
    targets = torch.tensor([17, 42])
    w_star = target_directions(model, 0, HEAD, targets)
    positions = [length - 1, length, length + 2]
    kwargs = dict(max_new_tokens=6, do_sample=False, stop_at_eos=False, verbose=False, return_type="tokens")
    with model.hooks(fwd_hooks=install_hook(model, site, positions, w_star, 40.0, key="native")):
        generated = model.generate(prompt, **kwargs)
    with model.hooks(fwd_hooks=install_hook(model, site, positions, w_star, 40.0, key="native")):
        logits = model(generated)
    assert torch.equal(logits[:, length - 1 : -1].argmax(-1), generated[:, length:])
    plain = model.generate(prompt, **kwargs)
    assert not torch.equal(plain, generated)  # the installs did change the continuation


def test_install_experiment_reports_strata(model, contexts):
    rows, summary = run_install_experiment(model, 0, HEAD, contexts[:4], multipliers=(1.5, 3.0), max_new_tokens=5,
                                           strata={"mid": (20, 100), "rare": (100, None)}, progress=False)
    assert len(rows) == 4 * 2 * 2
    assert set(summary["strata"]) == {"mid", "rare", "pooled"}
    assert all(1 <= r["rank"] for r in rows) and all(20 <= r["rank_base"] for r in rows)
    assert "install incl." in format_steering_table(summary)


def test_sign_prediction_is_exact_when_the_closed_form_is(model, contexts):
    with model.hooks(fwd_hooks=linearising_hooks()):
        rows, summary = run_sign_prediction(model, 0, HEAD, contexts, n_trials_per_prompt=5, lag=0, magnitude=2.0,
                                            progress=False)
    assert summary["n"] == 30 and summary["sign_accuracy"] == 1.0
    assert summary["pooled_r2"] > 1 - 1e-6


def test_erasure_lowers_the_promoted_token_at_firings(model, contexts):
    d_k, d_v = model.cfg.d_k, model.cfg.d_v
    cfg = WriteSAEConfig(d_in=d_k * d_v, d_sae=8, d_k=d_k, d_v=d_v, k=2)
    cfg.metadata.hook_name, cfg.metadata.hook_head_index = "blocks.0.mixer.hook_write", HEAD
    torch.manual_seed(0)
    sae = WriteSAE(cfg)
    with model.hooks(fwd_hooks=linearising_hooks()):
        rows, summary = run_erasure(model, sae, tokens=contexts, atom=3, n=10, control_scale=1.0, progress=False)
    firing = [r for r in rows if r["condition"] == "firing"]
    assert 0 < len(firing) <= 10 and len(rows) - len(firing) == 10
    # Removing a positive contribution lowers the token it promoted (exact under linearisation).
    assert all(r["delta_logp"] < 0 for r in firing)
    assert summary["firing"]["median_delta_logp"] < 0
