"""Sites: one head of one recurrent layer, and the hook an SAE there reads (docs/method.md, "Objects").

A **site** is ``(layer, head, kind)`` with ``kind`` the hook the SAE reads: ``"write"``
(``blocks.{l}.mixer.hook_write``, the native rank-1 writes) or ``"state"`` (``hook_state``, the
paper's main site). Interventions always edit the *write* at a position: replacing the write at
``t`` is an exact additive edit of the state after ``t`` that every later token reads.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from writesae_lens.sae_checks import check_sae_matches_model

if TYPE_CHECKING:
    from sae_lens import SAE

    from hooked_ssm import HookedSSM

_SITE_RE = re.compile(r"^blocks\.(\d+)\.mixer\.hook_(write|state|ssm_write|ssm_state)$")


@dataclass(frozen=True)
class Site:
    """One head of one recurrent layer, and the hook an SAE there reads (``"write"`` or ``"state"``)."""

    layer: int
    head: int
    kind: str = "write"

    @property
    def hook_name(self) -> str:
        return f"blocks.{self.layer}.mixer.hook_{self.kind}"

    @property
    def write_hook(self) -> str:
        return f"blocks.{self.layer}.mixer.hook_write"

    def mixer_hook(self, leaf: str) -> str:
        return f"blocks.{self.layer}.mixer.{leaf}"


def resolve_site(
    model: HookedSSM, sae: SAE | None = None, layer: int | None = None, head: int | None = None, strict: bool = False
) -> Site:
    """The site of ``sae`` (from ``cfg.metadata.hook_name`` / ``hook_head_index``), or of the
    explicit ``layer`` / ``head``. Explicit arguments win over the SAE's metadata. When they, or the
    model, disagree with the SAE's metadata: a ``SAEModelMismatchWarning`` naming both sides (an
    error with ``strict=True``). Checks that the layer is a recurrent mixer with a ``hook_write``."""
    kind = "write"
    meta_layer = meta_head = None
    if sae is not None:
        meta = sae.cfg.metadata
        name = getattr(meta, "hook_name", None)
        match = _SITE_RE.match(name or "")
        if match is None:
            raise ValueError(
                f"The SAE reads {name!r}; the intervention toolkit needs an SAE on "
                "'blocks.{l}.mixer.hook_write' or 'blocks.{l}.mixer.hook_state'."
            )
        meta_layer, kind = int(match.group(1)), match.group(2).removeprefix("ssm_")
        meta_head = getattr(meta, "hook_head_index", None)
    layer = meta_layer if layer is None else layer
    head = meta_head if head is None else head
    if layer is None or head is None:
        raise ValueError("Pass layer= and head= (the SAE's metadata does not name them).")
    site = Site(int(layer), int(head), kind)
    if site.write_hook not in model.hook_dict:
        raise ValueError(f"Layer {layer} has no recurrent mixer (layer types: {model.cfg.layer_types}).")
    if not 0 <= site.head < model.cfg.n_heads:
        raise ValueError(f"head {head} is out of range: the mixer has {model.cfg.n_heads} heads.")
    if sae is not None:
        check_sae_matches_model(sae, model, site.hook_name, site.head, strict=strict)
    return site


__all__ = ["Site", "resolve_site"]
