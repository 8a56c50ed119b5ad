"""The paper's training recipe: its defaults, decoder re-normalisation and dead-atom resampling,
checked against hand computations (numpy SVD for the rank-1 resampled atoms)."""

import inspect

import numpy as np
import pytest
import torch
from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig

from writesae_lens.recipe import PAPER_RECIPE, TrainingRecipe, renormalize_decoder_, resample_dead_atoms_
from writesae_lens.saes import ARCHITECTURES
from writesae_lens.training import build_runner

D_K, D_V, D_SAE = 5, 4, 12


def test_defaults_are_the_papers_appendix_d():
    assert TrainingRecipe() == PAPER_RECIPE
    assert (PAPER_RECIPE.epochs, PAPER_RECIPE.heldout_fraction, PAPER_RECIPE.split_seed) == (20, 0.2, 42)
    assert (PAPER_RECIPE.renorm_every, PAPER_RECIPE.resample_every, PAPER_RECIPE.dead_after) == (100, 250, 100)
    assert PAPER_RECIPE.input_dtype == "bfloat16"
    assert inspect.signature(build_runner).parameters["recipe"].default is PAPER_RECIPE


def test_bad_recipes_are_refused():
    with pytest.raises(ValueError, match="heldout_fraction"):
        TrainingRecipe(heldout_fraction=1.0)
    with pytest.raises(ValueError, match="positive"):
        TrainingRecipe(epochs=0)
    with pytest.raises(AttributeError):
        TrainingRecipe(input_dtype="bfloat17")


def training_sae(architecture, **overrides):
    if architecture == "topk":
        return TopKTrainingSAE(TopKTrainingSAEConfig(d_in=D_K * D_V, d_sae=D_SAE, k=3, **overrides))
    cfg_cls = ARCHITECTURES[architecture][3]
    return ARCHITECTURES[architecture][2](cfg_cls(d_in=D_K * D_V, d_sae=D_SAE, d_k=D_K, d_v=D_V, k=3, **overrides))


ALL = ["writesae", "writesae_matrix", "writesae_bilinear", "writesae_rank_r", "topk"]


@pytest.mark.parametrize("architecture", ALL)
def test_renormalisation_makes_atoms_unit_norm_and_keeps_a_rescaled_sae_unchanged(architecture):
    torch.manual_seed(0)
    sae = training_sae(architecture, rescale_acts_by_decoder_norm=True)
    with torch.no_grad():
        for name, param in sae.named_parameters():
            param.mul_(1 + torch.rand(param.shape))  # atoms of assorted norms
    x = torch.randn(16, D_K * D_V)
    with torch.no_grad():
        before = sae(x)
        renormalize_decoder_(sae)
        norms = sae.W_dec.norm(dim=-1)
        after = sae(x)
    torch.testing.assert_close(norms, torch.ones(D_SAE))
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)


def test_renormalisation_of_a_tied_writesae_only_normalises():
    sae = training_sae("writesae", tied=True)
    with torch.no_grad():
        sae.U_dec.mul_(3.0)
        renormalize_decoder_(sae)
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(D_SAE))


@pytest.mark.parametrize("architecture", ALL)
def test_resampling_puts_dead_atoms_on_the_residual_and_clears_their_adam_state(architecture):
    torch.manual_seed(1)
    sae = training_sae(architecture)
    optimizer = torch.optim.Adam(sae.parameters())
    x = torch.randn(8, D_K * D_V)
    sae(x).pow(2).sum().backward()
    optimizer.step()
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[[2, 7]] = True
    before = {name: p.detach().clone() for name, p in sae.named_parameters()}
    # One input with a residual, the others reconstructed exactly: every dead atom must take its residual.
    batch = x[:1].repeat(4, 1)
    with torch.no_grad():
        residual = (batch[0] - sae(batch[:1])[0]).numpy().astype(np.float64)
    n = resample_dead_atoms_(sae, dead, batch, optimizer)
    assert n == 2
    atoms = sae.W_dec.detach()
    if architecture in ("writesae", "writesae_matrix", "writesae_rank_r"):  # the leading singular pair: the leading singular pair
        u, _, vt = np.linalg.svd(residual.reshape(D_K, D_V))
        expected = np.outer(u[:, 0], vt[0])
        for i in (2, 7):
            cos = float(np.dot(atoms[i].numpy(), expected.ravel()))
            assert abs(cos) == pytest.approx(1.0, abs=1e-5)
    else:
        for i in (2, 7):
            cos = float(np.dot(atoms[i].numpy(), residual / np.linalg.norm(residual)))
            assert cos == pytest.approx(1.0, abs=1e-5)
    for name, param in sae.named_parameters():
        if name == "b_dec":
            continue
        dim = 1 if name == "W_enc" else 0
        live = torch.tensor([i for i in range(D_SAE) if not dead[i]])
        torch.testing.assert_close(param.detach().index_select(dim, live), before[name].index_select(dim, live))
        state = optimizer.state[param]
        assert state["exp_avg"].index_select(dim, torch.tensor([2, 7])).abs().sum() == 0
    assert (sae.b_enc.detach()[[2, 7]] == 0).all()


def test_nothing_dead_nothing_resampled():
    sae = training_sae("writesae")
    assert resample_dead_atoms_(sae, torch.zeros(D_SAE, dtype=torch.bool), torch.randn(4, D_K * D_V), None) == 0
