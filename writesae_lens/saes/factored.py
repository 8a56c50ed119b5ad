"""Squared reconstruction error of rank-1 inputs ``X = k v^T`` against rank-1 atoms, from factors only.

For a reconstruction ``R = sum_j c_j u_j w_j^T`` plus a bias matrix ``B``, every Frobenius inner
product factors (``<k v^T, u w^T> = (u.k)(w.v)``, ``<u_i w_i^T, u_j w_j^T> = (u_i.u_j)(w_i.w_j)``)::

    ||k v^T - R - B||^2 = |k|^2 |v|^2 + c^T G c - 2 sum_j c_j (u_j.k)(w_j.v)
                          + |B|^2 - 2 k^T B v + 2 sum_j c_j u_j^T B w_j,     G_ij = (u_i.u_j)(w_i.w_j)

With sparse codes (TopK: ``n`` active atoms per row) only the ``n x n`` block of ``G`` over a row's
active atoms matters, so nothing here ever forms the ``[d_sae, d_sae]`` Gram or a ``d_k x d_v``
matrix per token (unless that is the cheaper way, see :func:`cheapest_strategy`).

Three exact ways to evaluate the same number, chosen by cost (multiply-adds per step):

- ``"gram"``: per-row ``[n, n]`` Gram of the gathered atoms, ``batch n^2 (d_k + d_v)``;
- ``"materialise"``: per-row ``U_a^T diag(c) W_a`` (only the ``n`` active atoms), ``batch n d_k d_v``;
- ``"dense"``: the full ``[d_sae, d_sae]`` Gram, ``d_sae^2 (d_k + d_v + batch)`` (dense codes).
"""

from __future__ import annotations

from typing import Literal

from jaxtyping import Float
from torch import Tensor

Strategy = Literal["gram", "materialise", "dense"]


def cheapest_strategy(batch: int, n: int, d_k: int, d_v: int, d_sae: int) -> Strategy:
    """The cheapest exact way to score ``batch`` rows of ``n`` active atoms each (see the module docstring)."""
    costs = {
        "gram": batch * n * n * (d_k + d_v),
        "materialise": batch * n * d_k * d_v,
        "dense": d_sae * d_sae * (d_k + d_v + batch),
    }
    return min(costs, key=costs.__getitem__)  # type: ignore[return-value]


def sparse_rank1_squared_error(
    k: Float[Tensor, "batch d_k"],
    v: Float[Tensor, "batch d_v"],
    values: Float[Tensor, "batch n"],
    u_rows: Float[Tensor, "batch n d_k"],
    w_rows: Float[Tensor, "batch n d_v"],
    bias: Float[Tensor, "d_k d_v"],
    rows_dot_bias: Float[Tensor, "batch n"],
    strategy: Literal["gram", "materialise"] = "gram",
) -> Float[Tensor, " batch"]:
    """``||k v^T - sum_j values_j u_j w_j^T - bias||_F^2`` per row, from each row's ``n`` atoms.

    ``u_rows`` / ``w_rows`` are the gathered factors of the atoms a row uses (repeats are fine: the
    quadratic form counts them correctly), ``rows_dot_bias[b, j] = u_j^T bias w_j`` for those atoms.
    """
    if strategy == "materialise":
        recon = (u_rows * values[..., None]).transpose(-1, -2) @ w_rows
        err = k[:, :, None] * v[:, None, :] - recon - bias
        return err.pow(2).sum(dim=(-1, -2))
    if strategy != "gram":
        raise ValueError(f"strategy must be 'gram' or 'materialise', not {strategy!r}.")
    gram = (u_rows @ u_rows.transpose(-1, -2)) * (w_rows @ w_rows.transpose(-1, -2))
    quad = ((gram @ values[..., None]).squeeze(-1) * values).sum(-1)
    cross = (values * (u_rows @ k[..., None]).squeeze(-1) * (w_rows @ v[..., None]).squeeze(-1)).sum(-1)
    err = k.pow(2).sum(-1) * v.pow(2).sum(-1) + quad - 2 * cross
    return err + _bias_terms(k, v, bias) + 2 * (values * rows_dot_bias).sum(-1)


def dense_rank1_squared_error(
    k: Float[Tensor, "batch d_k"],
    v: Float[Tensor, "batch d_v"],
    codes: Float[Tensor, "batch d_sae"],
    u: Float[Tensor, "d_sae d_k"],
    w: Float[Tensor, "d_sae d_v"],
    bias: Float[Tensor, "d_k d_v"],
    atom_dot_bias: Float[Tensor, " d_sae"],
) -> Float[Tensor, " batch"]:
    """The same error for dense codes, through the full ``[d_sae, d_sae]`` Gram."""
    gram = (u @ u.T) * (w @ w.T)
    err = k.pow(2).sum(-1) * v.pow(2).sum(-1) + ((codes @ gram) * codes).sum(-1)
    err = err - 2 * (codes * (k @ u.T) * (v @ w.T)).sum(-1)
    return err + _bias_terms(k, v, bias) + 2 * (codes * atom_dot_bias).sum(-1)


def atom_dot_matrix(
    u: Float[Tensor, "d_sae d_k"], w: Float[Tensor, "d_sae d_v"], matrix: Float[Tensor, "d_k d_v"]
) -> Float[Tensor, " d_sae"]:
    """``u_i^T M w_i`` for every atom: ``<u_i w_i^T, M>`` (one ``[d_sae, d_k] x [d_k, d_v]`` product)."""
    return ((u @ matrix) * w).sum(dim=-1)


def _bias_terms(k: Tensor, v: Tensor, bias: Tensor) -> Tensor:
    # |B|^2 - 2 k^T B v
    return bias.pow(2).sum() - 2 * ((k @ bias) * v).sum(-1)
