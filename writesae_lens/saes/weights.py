"""The encoder and decoder pieces the matrix SAEs are built from, as plain functions on tensors.

Inputs are flattened ``d_k x d_v`` matrices, key-major (entry ``i*d_v + j``).

- rank-1 decoder: atoms ``u_i w_i^T`` stored factored (``U [d_sae, d_k]``, ``V [d_sae, d_v]``); an
  atom's Frobenius norm is ``||u_i|| ||w_i||``; ``W_dec`` is a derived view whose rows are exactly rank 1;
- bilinear encoder: ``pre_i = a_i^T X b_i + c_i`` (factors ``A [d_sae, d_k]``, ``B [d_sae, d_v]``);
- dense encoder / flat decoder: ordinary ``[d_in, d_sae]`` / ``[d_sae, d_in]`` matrices (no helper needed).
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

EPS = 1e-8


def random_unit_rows(n: int, d: int, dtype: torch.dtype, device: torch.device | str, norm: float = 1.0) -> Tensor:
    """``n`` Gaussian rows of length ``d``, each rescaled to norm ``norm``."""
    rows = torch.randn(n, d, dtype=dtype, device=device)
    return rows / rows.norm(dim=-1, keepdim=True) * norm


def unit_rows(x: Float[Tensor, "n d"]) -> Float[Tensor, "n d"]:
    return x / x.norm(dim=-1, keepdim=True).clamp(min=EPS)


def rank1_matrices(u: Float[Tensor, "n d_k"], w: Float[Tensor, "n d_v"]) -> Float[Tensor, "n dk_dv"]:
    """``vec(u_i w_i^T)`` for every row: the rank-1 decoder's ``W_dec`` (or a bilinear encoder's ``W_enc^T``)."""
    return (u[:, :, None] * w[:, None, :]).flatten(1)


def rank1_norms(u: Float[Tensor, "n d_k"], w: Float[Tensor, "n d_v"]) -> Float[Tensor, " n"]:
    """Frobenius norm of each atom ``u_i w_i^T``: ``||u_i|| ||w_i||``."""
    return u.norm(dim=-1) * w.norm(dim=-1)


def rank1_decode(
    acts: Float[Tensor, "... d_sae"], u: Float[Tensor, "d_sae d_k"], w: Float[Tensor, "d_sae d_v"]
) -> Float[Tensor, "... dk_dv"]:
    """``vec(sum_i z_i u_i w_i^T) = vec(U^T diag(z) V)`` without building the ``[d_sae, d_in]`` matrix.

    Sparse codes (TopK) only touch their active atoms: ``O(n_active d_k d_v)`` per token instead of
    ``O(d_sae d_k d_v)``."""
    n_active = int((acts != 0).sum(-1).max()) if acts.numel() else 0
    if 0 < n_active * 4 <= acts.shape[-1]:
        values, index = acts.topk(n_active, dim=-1)
        recon = (values[..., :, None] * u[index]).transpose(-1, -2) @ w[index]
    else:
        recon = (acts[..., :, None] * u).transpose(-1, -2) @ w
    return recon.flatten(-2)


@torch.no_grad()
def normalize_rank1_(u: Tensor, w: Tensor) -> Float[Tensor, " n"]:
    """Rescale both factors of every atom to unit norm in place; returns the atoms' former norms."""
    norms = rank1_norms(u, w).clamp(min=EPS)
    u.div_(u.norm(dim=-1, keepdim=True).clamp(min=EPS))
    w.div_(w.norm(dim=-1, keepdim=True).clamp(min=EPS))
    return norms


def bilinear_pre(
    x: Float[Tensor, "... dk_dv"], a: Float[Tensor, "d_sae d_k"], b: Float[Tensor, "d_sae d_v"], d_k: int, d_v: int
) -> Float[Tensor, "... d_sae"]:
    """``a_i^T X b_i`` for every atom, ``X`` the unflattened ``d_k x d_v`` input."""
    return ((x.unflatten(-1, (d_k, d_v)) @ b.T) * a.T).sum(dim=-2)
