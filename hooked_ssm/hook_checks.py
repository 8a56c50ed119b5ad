"""Checks wrapped around the hooks users attach to a HookedSSM.

- ``CheckedHook``: a hook must return None (keep the activation, or edit it in place) or a tensor of
  the activation's shape. Anything else would be broadcast silently into every position and head
  (a ``[d]`` vector, a scalar) or fail deep inside torch without naming the hook, so it raises
  here, naming the hook, the expected and the received shape. A dtype change is accepted when it
  is lossless (the values survive the cast back), and the result is cast to the activation's dtype.
- ``raise_if_non_finite``: the hook ``HookedSSM.check_finite`` attaches everywhere, which names the
  first hook point (in execution order) where a NaN or an infinity appears.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from transformer_lens.hook_points import HookPoint

HookFunction = Callable[..., Tensor | None]


class HookReturnError(ValueError):
    """A hook returned something other than None or a tensor of its activation's shape."""


class NonFiniteActivationError(FloatingPointError):
    """``check_finite`` found a NaN or an infinity at a hook point."""


class CheckedHook:
    """``fn`` with its return value checked against the activation it was given (see module docstring)."""

    def __init__(self, fn: HookFunction):
        self.fn = fn

    def __repr__(self) -> str:  # TransformerLens names hook handles after the user's function
        return repr(self.fn)

    def __call__(self, activation: Tensor, hook: HookPoint) -> Tensor | None:
        return checked_return(hook.name, activation, self.fn(activation, hook=hook), self.fn)


def checked_return(name: str | None, activation: Tensor, out: object, fn: HookFunction | None = None) -> Tensor | None:
    if out is None or out is activation:
        return out
    who = f"The hook {getattr(fn, '__name__', fn)!r} on {name}" if fn is not None else f"A hook on {name}"
    if not isinstance(out, Tensor):
        raise HookReturnError(
            f"{who} returned a {type(out).__name__}; a hook must return None or a tensor of shape "
            f"{tuple(activation.shape)} (the activation it was given)."
        )
    if out.shape != activation.shape:
        raise HookReturnError(
            f"{who} returned shape {tuple(out.shape)}, expected {tuple(activation.shape)} (the activation's "
            f"shape). Return None, or a tensor of the same shape: edit a copy of the activation "
            f"(e.g. `act = act.clone(); act[:, pos] = ...`) instead of returning a slice or a vector."
        )
    if out.device != activation.device:
        raise HookReturnError(f"{who} returned a tensor on {out.device}; the activation is on {activation.device}.")
    if out.dtype != activation.dtype:
        cast = out.to(activation.dtype)
        if not torch.equal(cast.to(out.dtype).nan_to_num(), out.nan_to_num()):
            raise HookReturnError(
                f"{who} returned dtype {out.dtype}, and its values do not survive a cast to the activation's "
                f"{activation.dtype}. Return a {activation.dtype} tensor (e.g. `.to(act.dtype)`)."
            )
        return cast
    return out


def raise_if_non_finite(activation: Tensor, hook: HookPoint) -> None:
    finite = torch.isfinite(activation)
    if bool(finite.all()):
        return
    where = (~finite).nonzero()[0].tolist()
    kinds = ", ".join(k for k, bad in (("nan", activation.isnan()), ("inf", activation.isinf())) if bool(bad.any()))
    raise NonFiniteActivationError(
        f"First non-finite value ({kinds}) appears at {hook.name}, index {where} of shape {tuple(activation.shape)}. "
        f"Inspect the hooks and inputs that feed it (e.g. run_with_cache on the hook points just before it)."
    )
