"""Padding masks inside the mixers: padded positions must leave every recurrent state untouched.

A pad position is made an identity step of the recurrence (no write, no erase, no decay), so a
padded row computes exactly what the row computes alone, whether the pads sit on the left (before
the row's tokens: the state stays zero) or on the right (after them: the final state is the state
after the last real token). Masking uses ``torch.where`` rather than a product, so a non-finite
value computed at a pad position cannot leak through ``0 * inf = nan``.
"""

from __future__ import annotations

from jaxtyping import Bool, Float
from torch import Tensor


def real_tokens(attention_mask: Tensor | None, length: int) -> Bool[Tensor, "batch pos"] | None:
    """The mask of this call's ``length`` positions (the last columns of a mask that may also cover
    a ``RecurrentState``'s earlier tokens), as booleans; None when nothing is masked."""
    return None if attention_mask is None else attention_mask[:, -length:].bool()


def fill_pads(x: Float[Tensor, "batch pos ..."], real: Bool[Tensor, "batch pos"] | None, value: float = 0.0) -> Tensor:
    """``x`` with every pad position set to ``value`` (0: writes nothing; 1 for a decay: forgets nothing)."""
    if real is None:
        return x
    return x.masked_fill(~real.view(*real.shape, *([1] * (x.dim() - 2))), value)
