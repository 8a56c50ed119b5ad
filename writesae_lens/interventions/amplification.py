"""Feature amplification (paper section 4, METHOD.md section 6): add an offset to chosen SAE
coefficients at every position while the model runs or decodes.

The SAE is spliced with its error term on, so the site's activation becomes
``x + decode(z + offset) - decode(z)``: exactly ``x`` plus ``offset`` times the chosen atoms, and
nothing else about the model changes. The paper scales ``offset`` to 2x / 5x / 10x a feature's
mean activation at its firings, with a dose-matched random-feature control (pick the control
features yourself and call the same functions).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from writesae_lens.sae_checks import check_atoms
from writesae_lens.splicing import HookedSAESSM, sae_site_name


@contextmanager
def amplified(model: Any, sae: Any, features: Sequence[int], offset: float | Tensor) -> Iterator[HookedSAESSM]:
    """Within the block, ``model`` runs with ``offset`` added to ``features`` of ``sae``'s code.

    ``model`` is converted in place to a :class:`HookedSAESSM` if it is a plain ``HookedSSM``.
    """
    sae_model = model if isinstance(model, HookedSAESSM) else HookedSAESSM.from_hooked_ssm(model)
    site = sae_site_name(sae.cfg.metadata.hook_name, sae.cfg.metadata.hook_head_index)
    index = torch.as_tensor(check_atoms(sae, features, "features"), dtype=torch.long)

    def add_offset(acts: Tensor, hook: Any) -> Tensor:
        acts = acts.clone()
        acts[..., index.to(acts.device)] += torch.as_tensor(offset, dtype=acts.dtype, device=acts.device)
        return acts

    with sae_model.saes(saes=[sae], use_error_term=True):
        with sae_model.hooks(fwd_hooks=[(f"{site}.hook_sae_acts_post", add_offset)]):
            yield sae_model


def amplified_generate(
    model: Any, sae: Any, features: Sequence[int], offset: float | Tensor, tokens: Tensor, max_new_tokens: int = 20,
    **generate_kwargs: Any,
) -> Tensor:
    """Greedy continuation (by default) of ``tokens`` with the features amplified at every position."""
    kwargs = {"do_sample": False, "verbose": False, "stop_at_eos": False, **generate_kwargs}
    with amplified(model, sae, features, offset) as sae_model:
        return sae_model.generate(tokens, max_new_tokens=max_new_tokens, **kwargs)


__all__ = ["amplified", "amplified_generate"]
