"""The RWKV-7 ("x070", Goose) state recurrence as a pure function.

Orientation is key-major, like every recurrence in hooked_ssm: per head the state ``S`` is
``[d_k, d_v]``, the transpose of BlinkDL's ``[N_v, N_k]`` (fla stores it key-major too). With the
read key ``r``, the per-channel decay ``w`` in ``(0, 1)``, the write key ``k`` (BlinkDL's ``k``
after the ``k_a`` mix, "k~"), the erase key ``kappa`` (unit norm per head, "kappa-hat") and the
in-context learning rate ``a``::

    S_t = diag(w_t) S_{t-1} - (a_t * kappa_t) (kappa_t^T S_{t-1}) + k_t v_t^T     (the update)
    o_t = S_t^T r_t                                                                (the read, no scaling)

The erase uses the *undecayed* ``S_{t-1}``. The write ``k_t v_t^T`` is rank 1 and does not involve
the erase key, so replacing it is a clean edit. The update is affine in ``S`` (the transition
``diag(w) - (a*kappa) kappa^T`` does not depend on the state), so additive state edits at
position ``t`` are exact: add them to the state after the update at ``t``.

This is the reference form (and the one that yields states at chosen positions); plain forwards
use the chunked form in ``hooked_ssm.ops.rwkv7_chunked``, tested equal to it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

StateEdits = Mapping[int, Float[Tensor, "batch head d_k d_v"]]


def recurrent_rwkv7(
    r: Float[Tensor, "batch pos head d_k"],
    w: Float[Tensor, "batch pos head d_k"],
    k: Float[Tensor, "batch pos head d_k"],
    v: Float[Tensor, "batch pos head d_v"],
    kappa: Float[Tensor, "batch pos head d_k"],
    a: Float[Tensor, "batch pos head d_k"],
    initial_state: Float[Tensor, "batch head d_k d_v"] | None = None,
    edits: StateEdits | None = None,
    state_positions: Sequence[int] | None = None,
) -> tuple[
    Float[Tensor, "batch pos head d_v"],
    Float[Tensor, "batch head d_k d_v"],
    Float[Tensor, "batch n_sel head d_k d_v"] | None,
]:
    """Token-by-token RWKV-7 recurrence in float32.

    Returns ``(o, final_state, states)``; ``states`` holds ``S_t`` (after any edit at ``t``) for each
    position in ``state_positions`` (None when none is asked for).
    """
    batch, length, heads, d_k = k.shape
    state = k.new_zeros(batch, heads, d_k, v.shape[-1]) if initial_state is None else initial_state
    edits = edits or {}
    wanted = set(state_positions or ())
    erase_dir = a * kappa
    outputs, states = [], {}
    for t in range(length):
        erased = torch.einsum("bhk,bhkv->bhv", kappa[:, t], state)  # kappa^T S_{t-1}
        state = (
            state * w[:, t, :, :, None]
            - erase_dir[:, t, :, :, None] * erased[:, :, None, :]
            + k[:, t, :, :, None] * v[:, t, :, None, :]
        )
        if t in edits:
            state = state + edits[t]
        outputs.append(torch.einsum("bhkv,bhk->bhv", state, r[:, t]))
        if t in wanted:
            states[t] = state
    o = torch.stack(outputs, dim=1) if outputs else v.new_zeros(v.shape)
    selected = torch.stack([states[t] for t in state_positions], dim=1) if state_positions else None
    return o, state, selected
