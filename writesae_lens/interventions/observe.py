"""One observing forward pass at a site: native writes, SAE codes, mixer leaves, logits."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float, Int
from torch import Tensor

from writesae_lens.interventions.sites import Site

if TYPE_CHECKING:
    from sae_lens import SAE

    from hooked_ssm import HookedSSM


@torch.no_grad()
def observe_site(
    model: HookedSSM,
    tokens: Int[Tensor, "batch pos"],
    site: Site,
    sae: SAE | None = None,
    leaves: Sequence[str] = (),
    logits: bool = True,
    extra_hooks: Sequence[tuple[str, Callable]] = (),
) -> dict[str, Tensor]:
    """One forward pass that captures, for ``site.head`` only:

    - ``"write"``: the native write ``[batch, pos, d_k*d_v]``; ``"write_norm"``: its Frobenius norm;
    - ``"sae_in"`` and ``"codes"`` (``[batch, pos, d_sae]``) when ``sae`` is given;
    - each mixer hook leaf in ``leaves`` (e.g. ``"hook_q"``, ``"hook_k"``, ``"hook_decay"``),
      sliced at the head;
    - ``"logits"`` (when ``logits``).
    """
    captured: dict[str, Tensor] = {}
    head = site.head

    def capture(key: str) -> Callable:
        def hook(act: Tensor, hook: object) -> None:
            captured[key] = act[:, :, head].detach().clone()

        return hook

    hooks: list[tuple[str, Callable]] = [(site.write_hook, capture("write"))]
    if sae is not None and site.kind == "state":
        hooks.append((site.hook_name, capture("state")))
    hooks += [(site.mixer_hook(leaf), capture(leaf)) for leaf in leaves]
    with model.hooks(fwd_hooks=[*extra_hooks, *hooks]):
        out = model(tokens.to(model.cfg.device), return_type="logits" if logits else None)
    captured["write_norm"] = captured["write"].float().norm(dim=-1)
    if logits:
        captured["logits"] = out
    if sae is not None:
        captured["sae_in"] = captured["state" if site.kind == "state" else "write"]
        captured["codes"] = encode(sae, captured["sae_in"])
    return captured


@torch.no_grad()
def encode(sae: SAE, sae_in: Float[Tensor, "... d_in"], chunk: int = 4096) -> Float[Tensor, "... d_sae"]:
    """``sae.encode`` on any leading shape, in chunks of rows (returns on the input's device)."""
    flat = sae_in.reshape(-1, sae_in.shape[-1])
    parts = [sae.encode(flat[i : i + chunk].to(sae.device, sae.dtype)) for i in range(0, flat.shape[0], chunk)]
    codes = torch.cat(parts) if parts else flat.new_zeros(0, sae.cfg.d_sae)
    return codes.view(*sae_in.shape[:-1], -1).to(sae_in.device)


__all__ = ["observe_site", "encode"]
