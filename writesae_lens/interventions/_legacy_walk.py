"""The prefix walk erasure and steering used before the intervention engine (issue #16).

Kept only until those protocols move onto :mod:`writesae_lens.interventions.engine` (issue #16,
second half); delete this module then. New code uses the engine.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float, Int
from torch import Tensor

from hooked_ssm.state import RecurrentState
from writesae_lens.interventions.engine import select_rows
from writesae_lens.interventions.sites import Site

if TYPE_CHECKING:
    from hooked_ssm import HookedSSM


def continue_run(
    model: HookedSSM,
    tokens: Int[Tensor, "batch pos"],
    state: RecurrentState,
    fwd_hooks: Sequence[tuple[str, Callable]] = (),
    return_type: str | None = "logits",
    positions: Sequence[int] | None = None,
) -> Tensor | None:
    """``model(tokens, past_state=state)`` with ``fwd_hooks`` live; with ``positions``, only those
    positions (of this call) are unembedded."""
    if tokens.shape[1] == 0:
        return None
    tokens = tokens.to(model.cfg.device)
    with model.hooks(fwd_hooks=list(fwd_hooks)):
        if positions is None or return_type != "logits":
            return model(tokens, return_type=return_type, past_state=state)
        resid = model(tokens, past_state=state, stop_at_layer=len(model.blocks))
        if not positions:
            return resid.new_zeros(resid.shape[0], 0, model.cfg.d_vocab)
        return model.unembed(model.ln_final(resid[:, list(positions)]))


def prefix_states(
    model: HookedSSM, tokens: Int[Tensor, "batch pos"], positions: Iterable[int], extra_hooks: Sequence[tuple[str, Callable]] = ()
) -> Iterator[tuple[int, RecurrentState]]:
    """For each ``t`` in ``sorted(set(positions))``, ``(t, state)`` with ``state`` holding ``tokens[:, :t]``."""
    state = RecurrentState.empty(model.cfg.layer_types)
    done = 0
    for t in sorted(set(positions)):
        continue_run(model, tokens[:, done:t], state, extra_hooks, return_type=None)
        done = t
        yield t, state


def branch_logits(
    model: HookedSSM,
    site: Site,
    tokens: Int[Tensor, "batch pos"],
    state: RecurrentState,
    rows: Int[Tensor, "rows"],
    t: int,
    end: int,
    write_hook: Callable,
    extra_hooks: Sequence[tuple[str, Callable]] = (),
    positions: Sequence[int] | None = None,
) -> Float[Tensor, "rows n vocab"]:
    """Logits of ``tokens[rows]`` over ``t..end`` continuing rows ``rows`` of ``state`` (which holds
    ``tokens[:, :t]``), ``write_hook`` on ``hook_write`` during the step at ``t`` only."""
    branch = select_rows(state, rows)
    suffix = tokens[rows, t : end + 1]
    wanted = list(range(t, end + 1)) if positions is None else sorted(positions)
    first = continue_run(model, suffix[:, :1], branch, [*extra_hooks, (site.write_hook, write_hook)],
                         positions=[0] if t in wanted else [])
    rest = continue_run(model, suffix[:, 1:], branch, extra_hooks, positions=[p - t - 1 for p in wanted if p > t])
    return first if rest is None else torch.cat([first, rest], dim=1)


def write_addition_hook(head: int, position: int, deltas: Float[Tensor, "rows dk_dv"]) -> Callable:
    """A ``hook_write`` hook that adds ``deltas`` to the write of ``head`` at ``position``."""

    def hook(act: Tensor, hook: object) -> Tensor:
        act[:, position, head] += deltas.to(act)
        return act

    return hook
