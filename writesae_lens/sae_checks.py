"""Checks that an SAE fits the model, hook and atoms it is used with.

An SAE trained on ``toy-gdn`` has the same shapes as one for ``toy-rwkv7`` and would splice into it
without complaint; an SAE for layer 1 head 0 would run a protocol at layer 2 head 3. Both give
numbers that look fine and mean nothing, so :func:`check_sae_matches_model` compares the SAE's
``cfg.metadata`` (``model_name``, ``hook_name``, ``hook_head_index``) with what it is used on and
warns (``SAEModelMismatchWarning``) naming both sides, or raises ``SAEModelMismatchError`` with
``strict=True``. To make every such warning an error:
``warnings.simplefilter("error", SAEModelMismatchWarning)``.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from pathlib import PurePath
from typing import Any

from hooked_ssm.hook_names import ALIASES


class SAEModelMismatchWarning(UserWarning):
    """The SAE's metadata names another model, hook or head than the one it is used on."""


class SAEModelMismatchError(ValueError):
    """``strict=True``: the SAE's metadata names another model, hook or head than the one it is used on."""


def _model_key(name: str) -> str:
    """A model name, a Hub id or a checkpoint path reduced to what identifies the model: the last
    path component, case-insensitive (``toy-gdn`` and ``.../pretrained/toy/toy-gdn`` agree)."""
    return PurePath(str(name).rstrip("/")).name.lower()


def _canonical_hook(name: str) -> str:
    """TransformerLens 4's SSM aliases (``hook_ssm_state``...) resolved to HookedSSM's names."""
    prefix, _, leaf = name.rpartition(".")
    leaf = ALIASES.get(leaf, leaf)
    return f"{prefix}.{leaf}" if prefix else leaf


def sae_model_mismatches(
    sae: Any, model: Any, hook_name: str | None = None, head: int | None = None
) -> list[str]:
    """What the SAE's metadata says that disagrees with ``model`` / ``hook_name`` / ``head`` (empty: all agree).

    Fields the SAE's metadata leaves unset are not compared.
    """
    meta = sae.cfg.metadata
    problems = []
    sae_model = getattr(meta, "model_name", None)
    model_name = getattr(model.cfg, "model_name", None)
    if sae_model and model_name and _model_key(sae_model) != _model_key(model_name):
        problems.append(f"the SAE was trained on model {sae_model!r}, but it is used on {model_name!r}")
    sae_hook = getattr(meta, "hook_name", None)
    if hook_name is not None and sae_hook and _canonical_hook(sae_hook) != _canonical_hook(hook_name):
        problems.append(f"the SAE was trained on hook {sae_hook!r}, but it is used on {hook_name!r}")
    sae_head = getattr(meta, "hook_head_index", None)
    if head is not None and sae_head is not None and int(sae_head) != int(head):
        problems.append(f"the SAE was trained on head {sae_head}, but it is used on head {head}")
    return problems


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:]


def check_sae_matches_model(
    sae: Any, model: Any, hook_name: str | None = None, head: int | None = None, strict: bool = False
) -> None:
    """Warn (or raise with ``strict=True``) when the SAE's metadata names another model, hook or head."""
    problems = sae_model_mismatches(sae, model, hook_name, head)
    if not problems:
        return
    message = (
        _sentence("; ".join(problems)) + ". Its features are then meaningless there: load the SAE trained for "
        "this model and site (or, if the metadata is wrong, fix sae.cfg.metadata)."
    )
    if strict:
        raise SAEModelMismatchError(message)
    warnings.warn(message, SAEModelMismatchWarning, stacklevel=3)


def check_atoms(sae: Any, atoms: int | Iterable[int], argument: str = "atom") -> list[int]:
    """``atoms`` as a list of ints, each a valid atom index of ``sae`` (``0 <= i < d_sae``), else a
    ``ValueError`` naming the argument, the bad indices and the valid range."""
    indices = [atoms] if isinstance(atoms, int) else list(atoms)
    d_sae = int(sae.cfg.d_sae)
    bad = [i for i in indices if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < d_sae]
    if bad:
        raise ValueError(
            f"{argument} {bad[0] if len(bad) == 1 else bad} out of range: the SAE has d_sae={d_sae} atoms, "
            f"indices 0..{d_sae - 1}."
        )
    return indices
