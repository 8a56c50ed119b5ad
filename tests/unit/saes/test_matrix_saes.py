"""The matrix SAE architectures: shapes, rank-1 atoms, SAELens save/load, folds, and the factored path."""

import pytest
import torch
from sae_lens import SAE
from sae_lens.registry import SAE_CLASS_REGISTRY, SAE_TRAINING_CLASS_REGISTRY
from sae_lens.saes.sae import TrainStepInput

from writesae_lens.saes import ARCHITECTURES, RankBreakingFoldError, WriteTrainingSAE, WriteTrainingSAEConfig, register_architectures

D_K, D_V, D_SAE = 6, 5, 24
CASES = [(arch, sparsity) for arch in ARCHITECTURES for sparsity in ("topk", "batchtopk")]


def training_sae(arch, sparsity="topk", **overrides):
    torch.manual_seed(0)
    cfg = ARCHITECTURES[arch][3](d_in=D_K * D_V, d_sae=D_SAE, d_k=D_K, d_v=D_V, k=4, sparsity=sparsity, **overrides)
    return ARCHITECTURES[arch][2](cfg)


def step(sae, x, dead=None):
    return sae.training_forward_pass(
        TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=dead, n_training_steps=0, is_logging_step=False)
    )


def test_registration_is_idempotent():
    register_architectures()
    register_architectures()
    for arch in ARCHITECTURES:
        assert SAE_CLASS_REGISTRY[arch][0] is ARCHITECTURES[arch][0]
        assert SAE_TRAINING_CLASS_REGISTRY[arch][0] is ARCHITECTURES[arch][2]


@pytest.mark.parametrize("arch,sparsity", CASES)
def test_training_step_and_save_load_round_trip(arch, sparsity, tmp_path):
    sae = training_sae(arch, sparsity)
    x = torch.randn(32, D_K * D_V)
    out = step(sae, x, dead=torch.ones(D_SAE, dtype=torch.bool))
    assert set(out.losses) == {"mse_loss", "auxiliary_reconstruction_loss"}
    assert out.losses["auxiliary_reconstruction_loss"] > 0
    out.loss.backward()
    sae.save_inference_model(tmp_path)
    loaded = SAE.load_from_disk(tmp_path)
    assert type(loaded) is ARCHITECTURES[arch][0]
    with torch.no_grad():
        if sparsity == "topk":  # BatchTopK's inference form thresholds instead, by design
            torch.testing.assert_close(loaded(x), sae(x), atol=1e-5, rtol=1e-5)
        reloaded_twice = SAE.load_from_disk(tmp_path)
        torch.testing.assert_close(reloaded_twice(x), loaded(x))


@pytest.mark.parametrize("arch", [a for a in ARCHITECTURES if getattr(training_sae(a), "U_dec", torch.empty(0, 0, 0)).dim() == 2])
def test_rank1_atoms_are_rank_one_with_norm_u_times_w(arch):
    sae = training_sae(arch)
    atoms = sae.W_dec.view(D_SAE, D_K, D_V)
    assert (torch.linalg.matrix_rank(atoms) == 1).all()
    torch.testing.assert_close(sae.get_W_dec_norm(), sae.W_dec.norm(dim=-1))
    torch.testing.assert_close(sae.get_W_dec_norm(), sae.U_dec.norm(dim=-1) * sae.V_dec.norm(dim=-1))


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_encoder_equals_its_dense_view(arch):
    """The bilinear encoder a_i^T X b_i equals vec(X) W_enc with the derived W_enc."""
    sae = training_sae(arch)
    x = torch.randn(7, D_K * D_V)
    torch.testing.assert_close(sae.hidden_pre(x), x @ sae.W_enc + sae.b_enc, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_decoder_equals_its_dense_view(arch):
    sae = training_sae(arch)
    acts = torch.rand(7, D_SAE)
    torch.testing.assert_close(sae.decode_atoms(acts), acts @ sae.W_dec, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tied", [False, True])
def test_factored_write_path_equals_the_materialised_computation(tied):
    torch.manual_seed(1)
    cfg = WriteTrainingSAEConfig(d_in=D_K * D_V, d_sae=D_SAE, d_k=D_K, d_v=D_V, k=4, tied=tied)
    sae = WriteTrainingSAE(cfg)
    sae.set_input_mean(0.3 * torch.randn(D_K * D_V))
    with torch.no_grad():
        sae.U_dec.mul_(torch.rand(D_SAE, 1) + 0.5)  # atoms of various norms
        sae.b_enc.normal_()
    k, v = torch.randn(50, D_K), torch.randn(50, D_V)
    x = (k[:, :, None] * v[:, None, :]).flatten(1)
    with torch.no_grad():
        acts = sae.encode(x)
        torch.testing.assert_close(sae.encode_factored(k, v), acts, atol=1e-5, rtol=1e-5)
        materialised = (sae.decode(acts) - x).pow(2).sum(-1)
        torch.testing.assert_close(sae.factored_squared_error(k, v, acts), materialised, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_norm_folds_preserve_outputs(arch):
    sae = training_sae(arch)
    with torch.no_grad():
        sae.b_enc.normal_()
        sae.b_dec.normal_()
    x = torch.randn(9, D_K * D_V)
    scale = 2.5
    with torch.no_grad():
        expected = sae(x * scale) / scale
        sae.fold_activation_norm_scaling_factor(scale)
        torch.testing.assert_close(sae(x), expected, atol=1e-5, rtol=1e-5)
        before = sae(x)
        sae.fold_W_dec_norm()
        torch.testing.assert_close(sae.get_W_dec_norm(), torch.ones(D_SAE), atol=1e-5, rtol=0)
        torch.testing.assert_close(sae(x), before, atol=1e-5, rtol=1e-5)


def test_rank_breaking_configurations_are_refused():
    with pytest.raises(RankBreakingFoldError, match="rank 1"):
        training_sae("writesae").fold_activation_whitening(torch.zeros(30), torch.eye(30), torch.eye(30))
    with pytest.raises(RankBreakingFoldError, match="covariance_whitening"):
        training_sae("writesae_matrix", normalize_activations="covariance_whitening")
    with pytest.raises(ValueError, match=r"d_in \(31\) must equal d_k \* d_v"):
        WriteTrainingSAEConfig(d_in=31, d_sae=4, d_k=D_K, d_v=D_V)
