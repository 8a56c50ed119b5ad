"""Rank-r atoms: exact rank, norms, decoding and the rank-1 case against independent computations."""

import numpy as np
import pytest
import torch

from writesae_lens.saes import RankRTrainingSAE, RankRTrainingSAEConfig, WriteTrainingSAE, WriteTrainingSAEConfig

D_K, D_V, D_SAE = 6, 5, 10


def rank_r_sae(rank, **overrides):
    torch.manual_seed(rank)
    return RankRTrainingSAE(RankRTrainingSAEConfig(d_in=D_K * D_V, d_sae=D_SAE, d_k=D_K, d_v=D_V, k=3, rank=rank, **overrides))


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_atoms_have_rank_r_and_their_frobenius_norm(rank):
    sae = rank_r_sae(rank)
    u, w = sae.U_dec.detach().numpy(), sae.V_dec.detach().numpy()
    for i in range(D_SAE):
        atom = sum(np.outer(u[i, j], w[i, j]) for j in range(rank))  # by hand, component by component
        np.testing.assert_allclose(sae.W_dec[i].detach().numpy(), atom.ravel(), rtol=1e-5, atol=1e-6)
        assert np.linalg.matrix_rank(atom) == rank
        assert float(sae.atom_norms()[i]) == pytest.approx(np.linalg.norm(atom), rel=1e-5)


def test_sparse_decoding_equals_the_dense_product():
    sae = rank_r_sae(2)
    acts = torch.zeros(7, D_SAE)
    acts[:, :2] = torch.rand(7, 2)  # few active atoms: the sparse path
    dense = acts @ sae.W_dec
    torch.testing.assert_close(sae.decode_atoms(acts), dense, rtol=1e-5, atol=1e-6)
    acts = torch.rand(7, D_SAE)  # all active: the dense path
    torch.testing.assert_close(sae.decode_atoms(acts), acts @ sae.W_dec, rtol=1e-5, atol=1e-6)


def test_rank_one_is_the_writesae_model():
    rank1 = rank_r_sae(1)
    write = WriteTrainingSAE(WriteTrainingSAEConfig(d_in=D_K * D_V, d_sae=D_SAE, d_k=D_K, d_v=D_V, k=3))
    with torch.no_grad():
        write.U_dec.copy_(rank1.U_dec[:, 0])
        write.V_dec.copy_(rank1.V_dec[:, 0])
        write.A_enc.copy_(rank1.A_enc)
        write.B_enc.copy_(rank1.B_enc)
    x = torch.randn(9, D_K * D_V)
    with torch.no_grad():
        torch.testing.assert_close(rank1(x), write(x))


def test_bad_rank_is_refused():
    with pytest.raises(ValueError, match="rank"):
        rank_r_sae(0)
    with pytest.raises(ValueError, match="rank"):
        RankRTrainingSAEConfig(d_in=D_K * D_V, d_sae=4, d_k=D_K, d_v=D_V, rank=D_V + 1)
