"""Causality of the chunked forms under non-finite values.

A chunked scan multiplies whole chunks at once, e.g. ``(q k^T * decay) @ v``: a NaN or an infinity
in ``v`` at position ``t`` meets the zero weights of every earlier position of its chunk, and
``0 * nan = nan`` (``0 * inf = nan``) would then reach positions before ``t``, which looks like a
causality violation. No mask applied to a product can undo that, so the chunked forms check their
inputs first and hand any call with a non-finite value to the token-by-token recurrence, where
position ``t`` only ever reads positions ``<= t``. A ``-inf`` log-decay (a decay of exactly 0) takes
the same route: the chunked forms subtract cumulative log-decays, and ``-inf - -inf`` is NaN.
"""

from __future__ import annotations

import torch
from torch import Tensor


def all_finite(*tensors: Tensor | None) -> bool:
    """Whether every given tensor holds only finite values (None counts as finite)."""
    return all(x is None or bool(torch.isfinite(x).all()) for x in tensors)
