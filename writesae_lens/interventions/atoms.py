"""Decoder atoms as key-major matrices (docs/method.md, "Objects").

Orientation: the state of head ``h`` is a key-major ``d_k x d_v`` matrix read as ``o_t = S_t^T q_t``.
An atom is ``u_i w_i^T`` with ``u_i`` on the **key** side (pairs with queries and keys) and ``w_i``
on the **value** side (leaves through the head's output projection ``W_O[h]``). The paper's App. A
writes the same atom ``v_i w_i^T``: paper ``w_i`` = our ``u_i``, paper ``v_i`` = our ``w_i``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from jaxtyping import Float, Int
from torch import Tensor

if TYPE_CHECKING:
    from sae_lens import SAE


def has_rank1_decoder(sae: SAE) -> bool:
    """A WriteSAE-style decoder exposing ``atoms() -> (u, w)``."""
    return hasattr(sae, "atoms") and hasattr(sae, "U_dec")


def atom_norms(sae: SAE) -> Float[Tensor, "d_sae"]:
    """Frobenius norm of each decoder atom (``||u_i|| ||w_i||`` for rank-1 decoders)."""
    if hasattr(sae, "atom_norms"):
        return sae.atom_norms().detach()
    return sae.W_dec.detach().norm(dim=-1)


def unit_atoms(sae: SAE, index: Int[Tensor, "n"], d_k: int, d_v: int) -> Float[Tensor, "n d_k d_v"]:
    """Unit-Frobenius-norm atoms ``index`` as key-major matrices (rank 1 for WriteSAE decoders,
    the normalised dense row for flat SAEs)."""
    index = index.to(sae.device)
    if has_rank1_decoder(sae):
        u, w = sae.atoms()
        return (u[index, :, None] * w[index, None, :]).detach()
    rows = sae.W_dec.detach()[index]
    return (rows / rows.norm(dim=-1, keepdim=True).clamp(min=1e-12)).view(-1, d_k, d_v)


def unit_factors(sae: SAE, index: Int[Tensor, "n"]) -> tuple[Float[Tensor, "n d_k"], Float[Tensor, "n d_v"]]:
    """``(u, w)``: unit key-side and value-side factors of rank-1 atoms ``index``."""
    if not has_rank1_decoder(sae):
        raise TypeError("This needs a rank-1 decoder (a WriteSAE / MatrixWriteSAE exposing atoms()).")
    u, w = sae.atoms()
    index = index.to(u.device)
    return u[index].detach(), w[index].detach()


def contribution_norms(sae: SAE, coefficients: Float[Tensor, "n"], index: Int[Tensor, "n"]) -> Float[Tensor, "n"]:
    """Frobenius norm of what the decoder adds for code value ``coefficients`` of atoms ``index``
    (the paper's "coefficient" scale: ``a_i`` times the atom's unit form)."""
    coefficients = coefficients.to(sae.device)
    if getattr(sae.cfg, "rescale_acts_by_decoder_norm", False):
        return coefficients.abs()
    return coefficients.abs() * atom_norms(sae)[index.to(sae.device)]


__all__ = ["has_rank1_decoder", "atom_norms", "unit_atoms", "unit_factors", "contribution_norms"]
