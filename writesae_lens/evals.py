"""SAELens evals on head-indexed (and head-less 4-D) hooks such as ``blocks.{l}.mixer.hook_write``.

SAELens's ``get_recons_loss`` (used by ``run_evals`` and by the in-training ``LLMSaeEvaluator``)
decides whether a hook has a head dim from its *name* (``hook_q/k/v/z``). On
``blocks.{l}.mixer.hook_write`` with ``hook_head_index=h`` it therefore runs the SAE on every head
and crashes (or, for the zero-ablation baseline, ablates every head); a head-less SAE on a 4-D hook
breaks the variance metrics too.

Nothing in SAELens is patched here. Instead the *model* handed to SAELens's evals is a thin proxy,
:class:`HeadAwareEvalModel`, which leaves everything as is except at the SAE's hook:

* ``run_with_hooks``: SAELens's head-agnostic hook functions (``standard_replacement_hook``,
  ``standard_zero_ablate_hook``) see only head ``h`` (``[batch, pos, d]``) and the result is put back
  into head ``h``; for a head-less SAE on a 4-D hook they see ``[batch, pos, head*d]``.
* ``run_with_cache``: for a head-less SAE on a 4-D hook the cached activation is flattened to
  ``[batch, pos, head*d]`` (head-indexed SAEs are already sliced by SAELens).

Hook names that SAELens already handles (containing ``hook_q/k/v/z``) pass through untouched, so
the proxy is a no-op for every SAE SAELens evaluates correctly on its own.

Public entry points:

* :func:`run_evals`: SAELens's ``run_evals`` signature (``activation_scaler`` may be omitted).
* :class:`HeadAwareLLMSaeEvaluator` / :class:`HeadAwareMultiSAEEvaluator` and
  :func:`install_head_aware_evaluator` (``runner.evaluator`` replacement before ``runner.run()``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any, Callable

import torch
from sae_lens.evals import EvalConfig
from sae_lens.evals import run_evals as _sae_lens_run_evals
from sae_lens.llm_sae_training_runner import LLMSaeEvaluator
from sae_lens.multi_sae_training_runner import MultiSAEEvaluator
from sae_lens.saes.sae import SAE
from sae_lens.training.activation_scaler import ActivationScaler
from sae_lens.training.activations_store import ActivationsStore
from torch import Tensor

__all__ = [
    "HeadAwareEvalModel",
    "evaluable_sae",
    "head_aware_model",
    "run_evals",
    "HeadAwareLLMSaeEvaluator",
    "HeadAwareMultiSAEEvaluator",
    "install_head_aware_evaluator",
]

# SAELens's own name heuristic (sae_lens.evals.get_recons_loss / get_sparsity_and_variance_metrics).
_SAE_LENS_HEAD_DIM_SUBSTRINGS = ("hook_q", "hook_k", "hook_v", "hook_z")
# SAELens's head-aware hook functions: those are never wrapped again.
_SAE_LENS_HEAD_AWARE_PREFIXES = ("single_head_", "all_head_")


def _sae_lens_sees_heads(hook_name: str) -> bool:
    return any(substring in hook_name for substring in _SAE_LENS_HEAD_DIM_SUBSTRINGS)


def _function_name(fn: Callable[..., Any]) -> str:
    while hasattr(fn, "func"):  # functools.partial
        fn = fn.func  # type: ignore[attr-defined]
    return getattr(fn, "__name__", "")


class HeadAwareEvalModel:
    """A view of ``model`` for SAELens's evals that honours ``hook_head_index`` on any 4-D hook.

    Args:
        model: the hooked model (``HookedSSM`` or any ``HookedRootModule``).
        sites: ``{hook_name: head_index or None}`` for the hooks being evaluated.

    Every attribute other than ``run_with_hooks`` / ``run_with_cache`` is the model's own
    (``tokenizer``, ``cfg``, ``W_E``, ``__call__``...).
    """

    def __init__(self, model: Any, sites: Mapping[str, int | None]):
        self.__dict__["model"] = model
        self.__dict__["sites"] = dict(sites)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["model"], name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.__dict__["model"], name, value)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def __repr__(self) -> str:
        return f"HeadAwareEvalModel({type(self.model).__name__}, sites={self.sites})"

    def _fixes(self, hook_name: Any) -> bool:
        return isinstance(hook_name, str) and hook_name in self.sites and not _sae_lens_sees_heads(hook_name)

    def _wrap_hook(self, hook_name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        if _function_name(fn).startswith(_SAE_LENS_HEAD_AWARE_PREFIXES):
            return fn
        head = self.sites[hook_name]

        def head_aware_hook(activations: Tensor, hook: Any) -> Any:
            if activations.dim() != 4:
                return fn(activations, hook)
            if head is None:
                return fn(activations.flatten(2), hook).reshape(activations.shape)
            if not 0 <= head < activations.shape[2]:
                raise ValueError(
                    f"hook_head_index={head}, but hook {hook_name!r} has {activations.shape[2]} heads "
                    f"(shape {list(activations.shape)})."
                )
            out = activations.clone()
            out[:, :, head] = fn(activations[:, :, head], hook)
            return out

        return head_aware_hook

    def run_with_hooks(
        self, *args: Any, fwd_hooks: Iterable[tuple[Any, Callable[..., Any]]] = (), **kwargs: Any
    ) -> Any:
        fwd_hooks = [(name, self._wrap_hook(name, fn) if self._fixes(name) else fn) for name, fn in fwd_hooks]
        return self.model.run_with_hooks(*args, fwd_hooks=fwd_hooks, **kwargs)

    def run_with_cache(self, *args: Any, **kwargs: Any) -> Any:
        out, cache = self.model.run_with_cache(*args, **kwargs)
        flatten = [
            name for name, head in self.sites.items()
            if head is None and self._fixes(name) and name in cache and cache[name].dim() == 4
        ]
        if flatten:
            cache = {name: (act.flatten(2) if name in flatten else act) for name, act in cache.items()}
        return out, cache


def evaluable_sae(sae: SAE[Any]) -> SAE[Any]:
    """An SAE trained on ``hook_write_factors`` is evaluated as its ``hook_write`` form: SAELens's evals
    compare the SAE's output with, and splice it into, the hook it reads, and the factors hook is
    observation-only (and its output is a write, not factors)."""
    return sae.to_write_site() if getattr(sae, "reads_write_factors", False) else sae


def head_aware_model(model: Any, *saes: SAE[Any]) -> HeadAwareEvalModel:
    """Wrap ``model`` for SAELens's evals of ``saes`` (their metadata gives the hooks and heads)."""
    while isinstance(model, HeadAwareEvalModel):
        model = model.model
    sites: dict[str, int | None] = {}
    for sae in saes:
        hook_name = sae.cfg.metadata.hook_name
        if hook_name is None:
            raise ValueError("sae.cfg.metadata.hook_name must be set to evaluate the SAE.")
        head = sae.cfg.metadata.hook_head_index
        if hook_name in sites and sites[hook_name] != head:
            raise ValueError(
                f"Two SAEs on hook {hook_name!r} with different heads ({sites[hook_name]} and {head}): "
                f"evaluate them one at a time."
            )
        sites[hook_name] = head
    return HeadAwareEvalModel(model, sites)


@torch.no_grad()
def run_evals(
    sae: SAE[Any],
    activation_store: ActivationsStore,
    model: Any,
    activation_scaler: ActivationScaler | None = None,
    eval_config: EvalConfig = EvalConfig(),
    model_kwargs: Mapping[str, Any] = {},
    exclude_special_tokens: Iterable[int] | bool = True,
    verbose: bool = False,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``sae_lens.evals.run_evals`` for SAEs on head-indexed or 4-D hooks (same signature and output).

    ``activation_scaler`` defaults to no scaling. ``exclude_special_tokens=True`` uses the model's
    tokenizer (nothing is excluded when the model has none). An SAE trained on the write factors is
    evaluated on ``hook_write`` (:func:`evaluable_sae`).
    """
    sae = evaluable_sae(sae)
    return _sae_lens_run_evals(
        sae=sae,
        activation_store=activation_store,
        model=head_aware_model(model, sae),  # type: ignore[arg-type]
        activation_scaler=activation_scaler if activation_scaler is not None else ActivationScaler(),
        eval_config=eval_config,
        model_kwargs=model_kwargs,
        exclude_special_tokens=exclude_special_tokens,
        verbose=verbose,
    )


@dataclasses.dataclass
class HeadAwareLLMSaeEvaluator(LLMSaeEvaluator):  # type: ignore[type-arg]
    """SAELens's in-training evaluator, with the model seen through :class:`HeadAwareEvalModel`."""

    def __call__(self, sae: Any, data_provider: Any, activation_scaler: ActivationScaler) -> dict[str, Any]:
        sae = evaluable_sae(sae)
        view = dataclasses.replace(self, model=head_aware_model(self.model, sae))
        return LLMSaeEvaluator.__call__(view, sae, data_provider, activation_scaler)


@dataclasses.dataclass
class HeadAwareMultiSAEEvaluator(MultiSAEEvaluator):
    """SAELens's multi-SAE in-training evaluator, with the model seen through :class:`HeadAwareEvalModel`."""

    def __call__(
        self,
        saes: dict[str, Any],
        data_provider: Any,
        activation_scalers: dict[str, ActivationScaler],
        hook_names: dict[str, str],
    ) -> dict[str, Any]:
        view = dataclasses.replace(self, model=head_aware_model(self.model, *saes.values()))
        return MultiSAEEvaluator.__call__(view, saes, data_provider, activation_scalers, hook_names)


def install_head_aware_evaluator(runner: Any) -> Any:
    """Replace ``runner.evaluator`` by its head-aware version; call before ``runner.run()``.

    Works for ``LanguageModelSAETrainingRunner`` and ``MultiSAETrainingRunner``; idempotent; returns
    the new evaluator. (SAELens runs the evaluator only when ``logger.log_to_wandb`` is on; use
    ``WANDB_MODE=disabled`` or ``offline`` to get evals without a wandb account.)
    """
    evaluator = runner.evaluator
    if isinstance(evaluator, (HeadAwareLLMSaeEvaluator, HeadAwareMultiSAEEvaluator)):
        return evaluator
    if isinstance(evaluator, LLMSaeEvaluator):
        new_cls: type = HeadAwareLLMSaeEvaluator
    elif isinstance(evaluator, MultiSAEEvaluator):
        new_cls = HeadAwareMultiSAEEvaluator
    else:
        raise TypeError(
            f"runner.evaluator is a {type(evaluator).__name__}, not SAELens's LLMSaeEvaluator or MultiSAEEvaluator."
        )
    runner.evaluator = new_cls(**{f.name: getattr(evaluator, f.name) for f in dataclasses.fields(evaluator)})
    return runner.evaluator
