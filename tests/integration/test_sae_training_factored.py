"""Factored write-site training through SAELens's runner: the store caches ``hook_write_factors``, a
training step equals the materialised step on ``hook_write`` (same scale and centring), and the
trained SAE comes back, saved and reloadable, as an ordinary ``hook_write`` SAE that splices."""

import copy
import json

import pytest
import torch
from sae_lens import SAE
from sae_lens.training.activation_scaler import ActivationScaler
from sae_lens.training.sae_trainer import SAETrainer

import writesae_lens.saes  # noqa: F401  (registers the architectures)
from hooked_ssm import HookedSSM
from writesae_lens.splicing import HookedSAESSM
from writesae_lens.training import build_runner

LAYER, HEAD = 1, 2
WRITE = f"blocks.{LAYER}.mixer.hook_write"


@pytest.fixture(scope="module")
def model(qwen35):
    return HookedSSM.from_pretrained(qwen35[0])


def one_trainer_step(runner, batch, scaling_factor=None, dead_every=2):
    """One step of SAELens's own trainer (scaler, forward, firing statistics, backward, Adam)."""
    trainer = SAETrainer(cfg=runner.cfg.to_sae_trainer_config(), sae=runner.sae, data_provider=iter(()))
    trainer.activation_scaler.scaling_factor = scaling_factor
    trainer.n_forward_passes_since_fired[::dead_every] = trainer.cfg.dead_feature_window + 1  # exercise the aux loss
    return trainer, trainer.step(batch)


def test_one_training_step_equals_the_materialised_step(model, dataset):
    common = dict(d_sae=64, k=8, training_tokens=64 * 10, context_size=32, train_batch_size_tokens=64)
    factored = build_runner(model, dataset, LAYER, HEAD, "write", **common)
    materialised = build_runner(model, dataset, LAYER, HEAD, "write", factored=False, **common)
    assert factored.cfg.hook_name == WRITE + "_factors" and materialised.cfg.hook_name == WRITE
    assert factored.sae.cfg.d_in == model.cfg.d_k + model.cfg.d_v

    # The same tokens through both activation stores: [k | v] and the materialised write of head HEAD.
    tokens = factored.activations_store.get_batch_tokens()
    factors = factored.activations_store.get_activations(tokens).flatten(0, -2)[:64]
    writes = materialised.activations_store.get_activations(tokens).flatten(0, -2)[:64]
    d_k = model.cfg.d_k
    torch.testing.assert_close(
        (factors[:, :d_k, None] * factors[:, None, d_k:]).flatten(1), writes, rtol=1e-6, atol=1e-9
    )

    # Same weights and centring; SAELens's own scale estimate on hook_write, given to both.
    scaler = ActivationScaler()
    scaler.estimate_scaling_factor(materialised.sae.cfg.d_in, materialised.activations_store, 4)
    factored.sae.load_state_dict(materialised.sae.state_dict())
    factored.sae.cfg.write_scale = scaler.scaling_factor

    t_mat, out_mat = one_trainer_step(materialised, writes, scaler.scaling_factor)
    t_fac, out_fac = one_trainer_step(factored, factors)
    assert out_mat.losses["auxiliary_reconstruction_loss"] > 0
    for name, value in out_mat.losses.items():
        torch.testing.assert_close(out_fac.losses[name], value, rtol=1e-5, atol=0)
    torch.testing.assert_close(out_fac.loss, out_mat.loss, rtol=1e-5, atol=0)
    assert torch.equal(out_fac.feature_acts != 0, out_mat.feature_acts != 0)
    assert torch.equal(t_fac.n_forward_passes_since_fired, t_mat.n_forward_passes_since_fired)


def test_factored_training_saves_a_write_sae_that_reloads_and_splices(model, dataset, tmp_path):
    runner = build_runner(
        model, dataset, LAYER, HEAD, "write", d_sae=64, k=8, training_tokens=64 * 300, context_size=32,
        train_batch_size_tokens=64, lr=3e-3, output_path=str(tmp_path / "out"),
    )
    assert runner.cfg.hook_name == WRITE + "_factors" and runner.sae.reads_write_factors
    write_scale = runner.sae.cfg.write_scale
    assert isinstance(write_scale, float) and write_scale > 0  # resolved from data before training
    initial = copy.deepcopy(runner.sae).to_write_site()
    trained = runner.run()
    assert not trained.reads_write_factors and trained.cfg.metadata.hook_name == WRITE

    tokens = torch.randint(3, 300, (8, 32), generator=torch.Generator().manual_seed(99))
    _, cache = model.run_with_cache(tokens, names_filter=WRITE)
    acts = cache[WRITE][:, :, HEAD].flatten(0, 1)
    with torch.no_grad():
        before = (initial(acts) - acts).pow(2).sum(-1).mean()
        after = (trained(acts) - acts).pow(2).sum(-1).mean()
    # Raw units on both sides; the initial SAE already predicts about the mean write (measured: -4.8%).
    assert after < 0.97 * before, f"held-out MSE {before:.3e} -> {after:.3e}"

    out = tmp_path / "out"
    assert {p.name for p in out.iterdir()} == {"cfg.json", "sae_weights.safetensors", "sparsity.safetensors", "runner_cfg.json"}
    assert json.loads((out / "runner_cfg.json").read_text())["hook_name"] == WRITE + "_factors"
    loaded = SAE.load_from_disk(out)
    assert type(loaded).__name__ == "WriteSAE" and loaded.cfg.d_in == model.cfg.d_k * model.cfg.d_v
    assert loaded.cfg.metadata.hook_name == WRITE and loaded.cfg.metadata.hook_head_index == HEAD
    assert loaded.cfg.metadata.write_factors_training["write_scale"] == pytest.approx(write_scale)
    assert (torch.linalg.matrix_rank(loaded.W_dec.view(-1, model.cfg.d_k, model.cfg.d_v)) == 1).all()
    with torch.no_grad():
        same = (loaded(acts) - trained(acts)).abs().amax(-1) <= 1e-4 * acts.abs().max()
    assert same.float().mean() >= 0.99, f"{int((~same).sum())} of {len(same)} tokens differ"

    sae_model = HookedSAESSM.from_hooked_ssm(model)
    with torch.no_grad():
        clean = sae_model(tokens)
        spliced = sae_model.run_with_saes(tokens, saes=[loaded])
        with_error = sae_model.run_with_saes(tokens, saes=[loaded], use_error_term=True)
    assert torch.isfinite(spliced).all() and not torch.allclose(spliced, clean)
    torch.testing.assert_close(with_error, clean, rtol=1e-5, atol=1e-5)
