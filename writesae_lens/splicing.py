"""Splice SAELens SAEs into a ``HookedSSM``, head by head (``HookedSAESSM``).

``HookedSAESSM`` mirrors SAELens's ``HookedSAETransformer`` and reuses its methods where they work
unchanged (``run_with_saes``, ``run_with_cache_with_saes``, ``run_with_hooks_with_saes``,
``reset_saes``, ``acts_to_saes``, special-token exclusion). It differs where HookedSAETransformer
does not fit recurrent models:

* **Head-indexed SAEs.** ``sae.cfg.metadata.hook_head_index = h`` replaces only head ``h`` of a
  ``[batch, pos, head, d]`` hook (e.g. ``blocks.{l}.mixer.hook_write``, where ``d = d_k*d_v``);
  the SAE sees ``[batch, pos, d_in]``. HookedSAETransformer ignores the head index.
* **Several heads of one hook at once.** SAEs are keyed by *site*: ``hook_name`` for a head-less
  SAE, ``f"{hook_name}.h{h}"`` for a head-indexed one. ``add_sae`` on heads 0 and 3 of the same
  hook keeps both (HookedSAETransformer keeps one SAE per hook name).
* **Head-less SAEs on 4-D hooks** see all heads flattened, ``[batch, pos, head*d]`` (as SAELens's
  activation store trains them); an SAE whose ``d_in`` is one head's size raises and asks for a
  ``hook_head_index``.
* **Exact error term.** With ``use_error_term=True`` the spliced hook outputs exactly its input
  (bit for bit) unless a hook on the SAE changes something, so the forward pass equals the clean
  one, and the recurrent mixers keep their fast path.
* **Shapes are checked** (``d_in`` against the hook, the head index against the number of heads)
  when the SAE is added, where the model's layout is known, and on every forward pass.

Hook names of spliced SAEs (what ``run_with_cache`` / ``run_with_cache_with_saes`` return and what
``run_with_hooks_with_saes`` accepts)::

    blocks.0.hook_resid_post.hook_sae_acts_post           # head-less SAE (SAELens's naming)
    blocks.0.mixer.hook_write.h3.hook_sae_acts_post       # SAE on head 3 of hook_write
    blocks.0.mixer.hook_write.h3.hook_sae_input           # [batch, pos, d_k*d_v]: head 3's write
    ...hook_sae_acts_pre / hook_sae_recons / hook_sae_error / hook_sae_output likewise

While an SAE is attached, its hook's own ``HookPoint`` is out of the model (as with
HookedSAETransformer); it is put back, with its permanent hooks, when the last SAE on it is
removed. Transcoders (``metadata.hook_name_out`` differing from ``hook_name``) are not supported.

Usage::

    model = HookedSAESSM.from_pretrained("path/or/name")        # or HookedSAESSM.from_hooked_ssm(model)
    logits = model.run_with_saes(tokens, saes=[sae_h0, sae_h3])
    _, cache = model.run_with_cache_with_saes(tokens, saes=[sae_h3])
    cache["blocks.0.mixer.hook_write.h3.hook_sae_acts_post"]    # [batch, pos, d_sae]
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from sae_lens import logger
from sae_lens.analysis.hooked_sae_transformer import (
    HookedSAETransformer,
    _SAEWrapper,
    get_deep_attr,
    set_deep_attr,
)
from sae_lens.saes.sae import SAE, _disable_hooks
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from hooked_ssm.config import HookedSSMConfig
from hooked_ssm.hook_names import resolve_hook_name
from hooked_ssm.model import HookedSSM
from writesae_lens.sae_checks import check_sae_matches_model

__all__ = ["HookedSAESSM", "SAESplicingMixin", "sae_site_name"]

def sae_site_name(hook_name: str, head: int | None) -> str:
    """The key of an SAE in ``acts_to_saes`` and the prefix of its hook names.

    ``hook_name`` for a head-less SAE, ``f"{hook_name}.h{head}"`` for a head-indexed one.
    """
    return hook_name if head is None else f"{hook_name}.h{head}"


def _sae_head(sae: SAE[Any]) -> int | None:
    head = sae.cfg.metadata.hook_head_index
    if head is None:
        return None
    if isinstance(head, bool) or not isinstance(head, int) or head < 0:
        raise ValueError(f"sae.cfg.metadata.hook_head_index must be None or an int >= 0, got {head!r}.")
    return head


def _shape(x: Tensor) -> str:
    return "[" + ", ".join(str(s) for s in x.shape) + "]"


class _SpliceWrapper(_SAEWrapper):
    """One SAE spliced into one site: a whole hook (``head=None``) or one head of a 4-D hook.

    Reuses ``_SAEWrapper``'s hook bookkeeping (the SAE's HookPoints appear under the wrapper, so the
    cache names are ``<site>.hook_sae_*``; the wrapper owns ``hook_sae_error``/``hook_sae_output``)
    and token masks. ``forward`` is rewritten: it moves activations to the SAE's device and dtype and
    back, and computes the error term so that the output is exactly the input when nothing
    intervenes on the SAE's hooks.
    """

    def __init__(
        self,
        sae: SAE[Any],
        hook_name: str,
        head: int | None,
        use_error_term: bool = False,
        exclude_special_tokens: bool | list[int] = False,
    ):
        super().__init__(sae, use_error_term=use_error_term, exclude_special_tokens=exclude_special_tokens)
        self.hook_name = hook_name
        self.head = head

    @property
    def site(self) -> str:
        return sae_site_name(self.hook_name, self.head)

    # The recurrent mixers only materialise hook_write / hook_state when their hook point has hooks.
    def has_hooks(self, *args: Any, **kwargs: Any) -> bool:
        return True

    def forward(self, x: Tensor) -> Tensor:
        """Head-less: the whole hook tensor. Head-indexed (called by ``_HeadSAESite``): ``[batch, pos, d]``."""
        if self.head is not None:
            return self._splice(x)
        d_in = self.sae.cfg.d_in
        if self.sae.cfg.reshape_activations == "hook_z" and x.dim() >= 4:
            if x.shape[-2] * x.shape[-1] != d_in:
                raise self._shape_error(x, f"head*d = {x.shape[-2] * x.shape[-1]}")
            return self._splice(x)
        if x.dim() == 4:
            n_heads, d = x.shape[2], x.shape[3]
            if n_heads * d == d_in:
                return self._splice(x.flatten(2)).reshape(x.shape)
            if d == d_in:
                raise ValueError(
                    f"SAE {self._describe()} has d_in={d_in}, the size of ONE head of hook {self.hook_name!r} "
                    f"(shape {_shape(x)} = [batch, pos, head, d]), but sae.cfg.metadata.hook_head_index is None. "
                    f"Set sae.cfg.metadata.hook_head_index to the head it belongs to (0..{n_heads - 1}); "
                    f"a head-less SAE on this hook needs d_in = head*d = {n_heads * d}."
                )
            raise self._shape_error(x, f"d = {d} per head, head*d = {n_heads * d} for all heads")
        if x.shape[-1] != d_in:
            raise self._shape_error(x, f"last dim {x.shape[-1]}")
        return self._splice(x)

    def _describe(self) -> str:
        return f"{type(self.sae).__name__} at {self.site!r}"

    def _shape_error(self, x: Tensor, got: str) -> ValueError:
        return ValueError(
            f"SAE {self._describe()} has d_in={self.sae.cfg.d_in}, which does not fit hook {self.hook_name!r} "
            f"of shape {_shape(x)} ({got}). Check sae.cfg.metadata.hook_name / hook_head_index, or train the SAE "
            f"with d_in matching the hook (per head of a [batch, pos, head, d] hook, d_in = d, e.g. d_k*d_v "
            f"for hook_write / hook_state)."
        )

    def _mask_for(self, x: Tensor) -> Tensor | None:
        mask = self._token_mask
        if mask is None:
            return None
        if mask.shape != x.shape[:2]:
            raise ValueError(
                f"exclude_special_tokens: the token mask {tuple(mask.shape)} does not match the [batch, pos] dims "
                f"of hook {self.hook_name!r} ({_shape(x)}); e.g. hook_state with state_positions selects positions. "
                f"Attach the SAE without exclude_special_tokens there."
            )
        return mask.to(x.device).view(*mask.shape, *([1] * (x.dim() - 2)))

    def _splice(self, x: Tensor) -> Tensor:
        sae = self.sae
        sae_in = x.to(sae.device)
        try:
            feature_acts = sae.encode(sae_in)
            sae_out = sae.decode(feature_acts).to(sae_in.dtype)
            if self.use_error_term:
                with torch.no_grad():
                    # A hook-free pass gives the true error term, as in SAELens.
                    with _disable_hooks(sae):
                        sae_out_clean = sae.decode(sae.encode(sae_in)).to(sae_in.dtype)
                    sae_error = sae_in - sae_out_clean
                    mask = self._mask_for(sae_in)
                    if mask is not None:
                        sae_error = torch.where(mask, torch.zeros_like(sae_error), sae_error)
                    hooked_error = self.hook_sae_error(sae_error)
                    correction = hooked_error - sae_error  # exactly 0 unless a hook edited the error
                # Equal to sae_out + hooked_error, but ordered so that it is exactly x when no hook on
                # the SAE intervenes (sae_out == sae_out_clean bit for bit); gradients flow through
                # sae_out only, as in SAELens.
                sae_out = sae_in.detach() + (sae_out - sae_out_clean) + correction
            mask = self._mask_for(sae_in)
            if mask is not None:
                sae_out = torch.where(mask, sae_in, sae_out)
            return self.hook_sae_output(sae_out).to(device=x.device, dtype=x.dtype)
        finally:
            self._captured_input = None


class _HeadSAESite(nn.Module):
    """Installed in place of a 4-D hook point that has head-indexed SAEs: applies each to its head.

    Its children are named ``h{head}`` so the SAEs' hook names are ``<hook_name>.h{head}.hook_sae_*``.
    """

    def __init__(self, hook_name: str):
        super().__init__()
        self.hook_name = hook_name

    def has_hooks(self, *args: Any, **kwargs: Any) -> bool:
        return True

    def wrappers(self) -> dict[int, _SpliceWrapper]:
        return {int(name[1:]): child for name, child in self.named_children()}  # type: ignore[misc]

    def set(self, wrapper: _SpliceWrapper) -> None:
        setattr(self, f"h{wrapper.head}", wrapper)

    def remove(self, head: int) -> None:
        delattr(self, f"h{head}")

    def forward(self, x: Tensor) -> Tensor:
        wrappers = self.wrappers()
        if x.dim() < 4:
            raise ValueError(
                f"Hook {self.hook_name!r} has shape {_shape(x)}, with no head dim, but SAEs with hook_head_index "
                f"{sorted(wrappers)} are attached to it. hook_head_index indexes dim 2 of a [batch, pos, head, d] "
                f"hook; set it to None for this hook."
            )
        n_heads = x.shape[2]
        for head, wrapper in sorted(wrappers.items()):
            if head >= n_heads:
                raise ValueError(
                    f"SAE at {wrapper.site!r} has hook_head_index={head}, but hook {self.hook_name!r} has "
                    f"{n_heads} heads (shape {_shape(x)}); valid head indices are 0..{n_heads - 1}."
                )
            d = x[:, :, head].shape[2:].numel()
            if x.dim() != 4 or d != wrapper.sae.cfg.d_in:
                raise wrapper._shape_error(x, f"head {head} slice {list(x[:, :, head].shape)}")
        heads = list(x.unbind(dim=2))
        for head, wrapper in wrappers.items():
            heads[head] = wrapper(heads[head])
        return torch.stack(heads, dim=2)


class SAESplicingMixin:
    """SAE splicing for a ``HookedSSM`` (see the module docstring). Mix in before ``HookedSSM``."""

    _acts_to_saes: dict[str, _SpliceWrapper]
    _original_hook_points: dict[str, HookPoint]

    # Reused unchanged from HookedSAETransformer: they only use the methods defined here.
    acts_to_saes = HookedSAETransformer.acts_to_saes
    reset_saes = HookedSAETransformer.reset_saes
    run_with_saes = HookedSAETransformer.run_with_saes
    run_with_cache_with_saes = HookedSAETransformer.run_with_cache_with_saes
    run_with_hooks_with_saes = HookedSAETransformer.run_with_hooks_with_saes
    _compute_exclusion_mask = HookedSAETransformer._compute_exclusion_mask
    _token_masks = HookedSAETransformer._token_masks

    def _init_sae_splicing(self) -> None:
        self._acts_to_saes = {}
        self._original_hook_points = {}

    def forward(self, input: Any, *args: Any, **kwargs: Any) -> Any:
        # Token exclusion masks are set on the wrappers for one forward pass (as HookedSAETransformer).
        tokens = input.unsqueeze(0) if isinstance(input, Tensor) and input.dim() == 1 else input
        with self._token_masks(tokens, kwargs):
            return super().forward(input, *args, **kwargs)  # type: ignore[misc]

    # ------------------------------------------------------------------ adding and removing
    def add_sae(
        self,
        sae: SAE[Any],
        use_error_term: bool | None = None,
        exclude_special_tokens: bool | list[int] = False,
        strict: bool = False,
    ) -> None:
        """Attach ``sae`` at ``sae.cfg.metadata.hook_name`` (head ``hook_head_index`` if set).

        Replaces an SAE already attached at the same site; a head-less SAE replaces every SAE on
        its hook, and a head-indexed SAE replaces a head-less one. It stays attached until
        ``reset_saes``. ``use_error_term=None`` keeps ``sae.use_error_term``.
        ``exclude_special_tokens``: True bypasses the SAE at the tokenizer's special tokens, or pass
        a list of token ids.
        An SAE whose ``metadata.model_name`` names another model warns (``SAEModelMismatchWarning``),
        or raises with ``strict=True``.
        """
        self._attach(sae, use_error_term, exclude_special_tokens, strict)

    def _attach(
        self, sae: SAE[Any], use_error_term: bool | None, exclude_special_tokens: bool | list[int], strict: bool = False
    ) -> tuple[str, list[_SpliceWrapper]]:
        """Attach; return the new site name and the wrappers it displaced."""
        hook_name, head = self._check_sae(sae)
        check_sae_matches_model(sae, self, strict=strict)
        wrapper = _SpliceWrapper(
            sae,
            hook_name,
            head,
            use_error_term=sae.use_error_term if use_error_term is None else use_error_term,
            exclude_special_tokens=exclude_special_tokens,
        )
        displaced = self._install(wrapper)
        self.setup()  # type: ignore[attr-defined]
        return wrapper.site, displaced

    def _install(self, wrapper: _SpliceWrapper) -> list[_SpliceWrapper]:
        hook_name, head = wrapper.hook_name, wrapper.head
        current = get_deep_attr(self, hook_name)
        if isinstance(current, HookPoint):
            self._original_hook_points[hook_name] = current
        displaced = [w for w in self._acts_to_saes.values() if w.hook_name == hook_name]
        if head is None or isinstance(current, _SpliceWrapper):
            displaced_now = displaced  # everything on this hook goes
        else:
            displaced_now = [w for w in displaced if w.head == head]
        if displaced_now and [w.site for w in displaced_now] != [wrapper.site]:
            logger.warning(
                f"Attaching an SAE at {wrapper.site!r} removes the SAE(s) at {[w.site for w in displaced_now]}."
            )
        for old in displaced_now:
            del self._acts_to_saes[old.site]
        if head is None:
            set_deep_attr(self, hook_name, wrapper)
        else:
            site = current if isinstance(current, _HeadSAESite) else _HeadSAESite(hook_name)
            if site is not current:
                set_deep_attr(self, hook_name, site)
            site.set(wrapper)
        self._acts_to_saes[wrapper.site] = wrapper
        return displaced_now

    def _reset_sae(self, act_name: str, prev_wrapper: _SpliceWrapper | None = None) -> None:
        """Remove the SAE at site ``act_name`` (or every SAE on hook ``act_name``); restore ``prev_wrapper``."""
        if act_name in self._acts_to_saes:
            targets = [self._acts_to_saes[act_name]]
        else:
            targets = [w for w in self._acts_to_saes.values() if w.hook_name == act_name]
        if not targets:
            logger.warning(f"No SAE is attached to {act_name}. There's nothing to reset.")
        for wrapper in targets:
            self._detach(wrapper)
        if prev_wrapper is not None:
            self.setup()  # type: ignore[attr-defined]
            self._install(prev_wrapper)
        self.setup()  # type: ignore[attr-defined]

    def _detach(self, wrapper: _SpliceWrapper) -> None:
        del self._acts_to_saes[wrapper.site]
        wrapper.set_token_mask(None)
        current = get_deep_attr(self, wrapper.hook_name)
        if isinstance(current, _HeadSAESite) and wrapper.head is not None:
            current.remove(wrapper.head)
            if current.wrappers():
                return
        original = self._original_hook_points.pop(wrapper.hook_name, None)
        set_deep_attr(self, wrapper.hook_name, original if original is not None else HookPoint())

    @contextmanager
    def saes(
        self,
        saes: SAE[Any] | list[SAE[Any]] = [],
        reset_saes_end: bool = True,
        use_error_term: bool | None = None,
        exclude_special_tokens: bool | list[int] = False,
        strict: bool = False,
    ) -> Iterator[Any]:
        """Attach ``saes`` for the duration of the block; on exit (even after an exception) remove
        them and restore whatever they displaced (with ``reset_saes_end=True``)."""
        if isinstance(saes, SAE):
            saes = [saes]
        added: list[tuple[str, list[_SpliceWrapper]]] = []
        try:
            for sae in saes:
                added.append(self._attach(sae, use_error_term, exclude_special_tokens, strict))
            yield self
        finally:
            if reset_saes_end:
                for site, displaced in reversed(added):
                    if site in self._acts_to_saes:
                        self._detach(self._acts_to_saes[site])
                    for old in displaced:
                        self._install(old)
                self.setup()  # type: ignore[attr-defined]

    # ------------------------------------------------------------------ checks
    def _check_sae(self, sae: SAE[Any]) -> tuple[str, int | None]:
        if not isinstance(sae, SAE):
            raise TypeError(f"Expected a sae_lens SAE, got {type(sae).__name__}.")
        metadata = sae.cfg.metadata
        hook_name = metadata.hook_name
        if not hook_name:
            raise ValueError(
                "sae.cfg.metadata.hook_name is not set: set it to the hook the SAE reads, "
                "e.g. 'blocks.0.mixer.hook_write' (with metadata.hook_head_index for one head)."
            )
        if getattr(sae, "reads_write_factors", False) or hook_name.endswith("hook_write_factors"):
            raise ValueError(
                f"An SAE on {hook_name!r} cannot be spliced there: hook_write_factors is observation-only, and an "
                f"SAE trained on the factors outputs a write, not factors. Splice its hook_write form instead: "
                f"model.add_sae(sae.to_write_site()) (what writesae_lens's runner saves and returns)."
            )
        spliced = {w.hook_name for w in self._acts_to_saes.values()}
        if hook_name not in spliced:
            hook_name = resolve_hook_name(hook_name, [*self.hook_dict, *spliced])  # type: ignore[attr-defined]
        if metadata.hook_name_out and metadata.hook_name_out != metadata.hook_name:
            raise NotImplementedError(
                f"Transcoders (hook_name_out={metadata.hook_name_out!r} != hook_name={metadata.hook_name!r}) "
                f"are not supported by HookedSAESSM; use run_with_hooks with your own hook functions."
            )
        head = _sae_head(sae)
        layout = self._head_layout(hook_name)
        if layout is not None:
            n_heads, d = layout
            d_in = sae.cfg.d_in
            shape = f"[batch, pos, {n_heads}, {d}]"
            if head is not None and head >= n_heads:
                raise ValueError(
                    f"sae.cfg.metadata.hook_head_index={head}, but hook {hook_name!r} ({shape}) has {n_heads} "
                    f"heads; valid head indices are 0..{n_heads - 1}."
                )
            if head is not None and d_in != d:
                raise ValueError(
                    f"SAE d_in={d_in} does not match one head of hook {hook_name!r} ({shape}): a head-indexed SAE "
                    f"there needs d_in={d}. Use an SAE trained on this hook (or fix metadata.hook_name)."
                )
            if head is None and sae.cfg.reshape_activations != "hook_z" and d_in != n_heads * d:
                fix = (
                    f"set sae.cfg.metadata.hook_head_index to its head (0..{n_heads - 1})"
                    if d_in == d
                    else "use an SAE trained on this hook (or fix metadata.hook_name)"
                )
                raise ValueError(
                    f"SAE d_in={d_in} does not match hook {hook_name!r} ({shape}): a head-less SAE there needs "
                    f"d_in = head*d = {n_heads * d}, one head needs d_in={d}; {fix}."
                )
        return hook_name, head

    def _head_layout(self, hook_name: str) -> tuple[int, int] | None:
        """``(n_heads, d per head)`` of a recurrent-mixer hook, if known from the model (else None)."""
        parent_name, _, leaf = hook_name.rpartition(".")
        try:
            parent = get_deep_attr(self, parent_name)
        except (AttributeError, IndexError, TypeError):
            return None
        # Each mixer class declares the per-head size of its hooks (hook_names.HOOK_DIMS style).
        factors = getattr(type(parent), "HOOK_DIMS", {}).get(leaf)
        dims = [getattr(parent, name, None) for name in ("n_heads", *(factors or ()))]
        if factors is None or not all(isinstance(v, int) for v in dims):
            return None
        return dims[0], math.prod(dims[1:])


_SPLICING_CLASSES: dict[type, type] = {}


class HookedSAESSM(SAESplicingMixin, HookedSSM):
    """A ``HookedSSM`` that SAEs can be spliced into (see the module docstring).

    ``HookedSAESSM.from_pretrained(...)`` loads like ``HookedSSM.from_pretrained``;
    ``HookedSAESSM.from_hooked_ssm(model)`` converts a loaded model in place.
    """

    def __init__(self, cfg: HookedSSMConfig, tokenizer: Any = None, move_to_device: bool = True):
        super().__init__(cfg, tokenizer=tokenizer, move_to_device=move_to_device)
        self._init_sae_splicing()

    @classmethod
    def from_hooked_ssm(cls, model: HookedSSM) -> HookedSAESSM:
        """Give an already-loaded ``HookedSSM`` the SAE-splicing methods, **in place** (no copy of the
        weights); returns the same object. A subclass of HookedSSM keeps its own methods."""
        if isinstance(model, SAESplicingMixin):
            return model  # type: ignore[return-value]
        if not isinstance(model, HookedSSM):
            raise TypeError(f"Expected a HookedSSM, got {type(model).__name__}.")
        base = type(model)
        if base is HookedSSM:
            new_cls: type = HookedSAESSM
        else:
            new_cls = _SPLICING_CLASSES.get(base) or _SPLICING_CLASSES.setdefault(
                base, type(f"HookedSAE{base.__name__}", (SAESplicingMixin, base), {"__module__": __name__})
            )
        model.__class__ = new_cls
        model._init_sae_splicing()  # type: ignore[attr-defined]
        return model  # type: ignore[return-value]
