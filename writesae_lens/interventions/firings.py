"""Shared machinery of the intervention toolkit: sites, atoms, firings, token windows and
``RecurrentState`` surgery.

Orientation (METHOD.md section 1): the state of head ``h`` at layer ``l`` is a key-major ``d_k x d_v``
matrix, read as ``o_t = S_t^T q_t``. An atom is ``u_i w_i^T`` with ``u_i`` on the **key** side
(pairs with queries and keys) and ``w_i`` on the **value** side (leaves through the head's output
projection ``W_O[h]``). The paper writes the same atom ``v_i w_i^T`` in App. A (its ``w_i`` pairs
with ``q_t`` and its ``v_i`` with ``W_U``): paper ``w_i`` = our ``u_i`` (key side), paper ``v_i`` =
our ``w_i`` (value side).

A **site** is ``(layer, head, kind)`` with ``kind`` the hook the SAE reads: ``"write"``
(``blocks.{l}.mixer.hook_write``, the native rank-1 writes) or ``"state"`` (``hook_state``, the
paper's main site). Interventions always edit the *write* at a position: replacing the write at
``t`` is an exact additive edit of the state after ``t`` that every later token reads.

A **firing** is a position whose SAE code is non-zero; its **dominant atom** is the argmax of the
code there (section 4).
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from hooked_ssm.state import AttentionCache, RecurrentState
from writesae_lens.sae_checks import check_sae_matches_model

_SITE_RE = re.compile(r"^blocks\.(\d+)\.mixer\.hook_(write|state|ssm_write|ssm_state)$")


# ---------------------------------------------------------------- sites
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
    model: Any, sae: Any = None, layer: int | None = None, head: int | None = None, strict: bool = False
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


# ---------------------------------------------------------------- atoms
def atom_norms(sae: Any) -> Float[Tensor, "d_sae"]:
    """Frobenius norm of each decoder atom (``||u_i|| ||w_i||`` for rank-1 decoders)."""
    if hasattr(sae, "atom_norms"):
        return sae.atom_norms().detach()
    return sae.W_dec.detach().norm(dim=-1)


def unit_atoms(sae: Any, index: Int[Tensor, "n"], d_k: int, d_v: int) -> Float[Tensor, "n d_k d_v"]:
    """Unit-Frobenius-norm atoms ``index`` as key-major matrices (rank 1 for WriteSAE decoders,
    the normalised dense row for flat SAEs)."""
    index = index.to(sae.device)
    if hasattr(sae, "atoms") and hasattr(sae, "U_dec"):
        u, w = sae.atoms()
        return (u[index, :, None] * w[index, None, :]).detach()
    rows = sae.W_dec.detach()[index]
    return (rows / rows.norm(dim=-1, keepdim=True).clamp(min=1e-12)).view(-1, d_k, d_v)


def unit_factors(sae: Any, index: Int[Tensor, "n"]) -> tuple[Tensor, Tensor]:
    """``(u, w)``: unit key-side and value-side factors of rank-1 atoms ``index``."""
    if not (hasattr(sae, "atoms") and hasattr(sae, "U_dec")):
        raise TypeError("This needs a rank-1 decoder (a WriteSAE / MatrixWriteSAE exposing atoms()).")
    u, w = sae.atoms()
    index = index.to(u.device)
    return u[index].detach(), w[index].detach()


def contribution_norms(sae: Any, coefficients: Tensor, index: Tensor) -> Tensor:
    """Frobenius norm of what the decoder adds for code value ``coefficients`` of atoms ``index``
    (the paper's "coefficient" scale: ``a_i`` times the atom's unit form)."""
    coefficients = coefficients.to(sae.device)
    if getattr(sae.cfg, "rescale_acts_by_decoder_norm", False):
        return coefficients.abs()
    return coefficients.abs() * atom_norms(sae)[index.to(sae.device)]


# ---------------------------------------------------------------- token windows
def token_windows(
    model: Any,
    texts: Iterable[str],
    context_size: int = 256,
    max_windows: int | None = None,
    prepend_bos: bool = True,
) -> Int[Tensor, "window pos"]:
    """Tokenise ``texts``, join them (each preceded by BOS when ``prepend_bos``), and cut the stream
    into non-overlapping windows of ``context_size`` tokens (the last partial window is dropped)."""
    tokenizer = model.tokenizer
    if tokenizer is None:
        raise ValueError("The model has no tokenizer; pass token ids instead of text.")
    ids: list[int] = []
    bos = tokenizer.bos_token_id
    need = None if max_windows is None else max_windows * context_size
    for text in texts:
        if prepend_bos and bos is not None:
            ids.append(bos)
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if need is not None and len(ids) >= need:
            break
    n = len(ids) // context_size
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"The text holds {len(ids)} tokens, fewer than one window of {context_size}.")
    return torch.tensor(ids[: n * context_size], dtype=torch.long).view(n, context_size)


def toy_validation_texts() -> list[str]:
    """The documents of the bundled toy corpus's validation split (the CLI's default text)."""
    from hooked_ssm.pretrained.toy.corpus import iter_documents

    return list(iter_documents("validation"))


def as_prompt_list(tokens: Tensor | Sequence[Tensor]) -> list[Tensor]:
    """A ``[n, pos]`` tensor or a list of 1-D token tensors, as a list of 1-D tensors."""
    if isinstance(tokens, Tensor):
        return list(tokens.unsqueeze(0) if tokens.dim() == 1 else tokens)
    return [torch.as_tensor(t).flatten() for t in tokens]


def prompt_batches(prompts: Sequence[Tensor], batch_size: int, ids: Sequence[int] | None = None) -> Iterator[tuple[list[int], Tensor]]:
    """Batches of equal-length prompts ``(prompt ids, tokens [b, pos])``, in order of first appearance."""
    ids = list(range(len(prompts))) if ids is None else list(ids)
    by_length: dict[int, list[int]] = {}
    for i in ids:
        by_length.setdefault(len(prompts[i]), []).append(i)
    for members in by_length.values():
        for start in range(0, len(members), batch_size):
            chunk = members[start : start + batch_size]
            yield chunk, torch.stack([prompts[i] for i in chunk])


# ---------------------------------------------------------------- one observing forward pass
@torch.no_grad()
def observe_site(
    model: Any,
    tokens: Int[Tensor, "batch pos"],
    site: Site,
    sae: Any = None,
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
        def hook(act: Tensor, hook: Any) -> None:
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
        sae_in = captured["state" if site.kind == "state" else "write"]
        captured["codes"] = encode(sae, sae_in)
    return captured


@torch.no_grad()
def encode(sae: Any, sae_in: Float[Tensor, "... d_in"], chunk: int = 4096) -> Float[Tensor, "... d_sae"]:
    """``sae.encode`` on any leading shape, in chunks of rows (returns on the input's device)."""
    flat = sae_in.reshape(-1, sae_in.shape[-1])
    parts = [sae.encode(flat[i : i + chunk].to(sae.device, sae.dtype)) for i in range(0, flat.shape[0], chunk)]
    codes = torch.cat(parts) if parts else flat.new_zeros(0, sae.cfg.d_sae)
    return codes.view(*sae_in.shape[:-1], -1).to(sae_in.device)


# ---------------------------------------------------------------- firings
@dataclass
class Firing:
    """One evaluated position: prompt ``prompt``, position ``position``, dominant atom ``atom``
    with code value ``coefficient``; ``contribution_norm`` is that atom's decoded Frobenius norm
    (the "coefficient" scale) and ``native_norm`` the native write's Frobenius norm there."""

    prompt: int
    position: int
    layer: int
    head: int
    atom: int
    coefficient: float
    contribution_norm: float
    native_norm: float

    @property
    def key(self) -> tuple[int, int, int, int]:
        return (self.prompt, self.position, self.layer, self.head)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def dominant_firings(
    prompt_ids: Sequence[int],
    codes: Float[Tensor, "batch pos d_sae"],
    write_norm: Float[Tensor, "batch pos"],
    sae: Any,
    site: Site,
    min_position: int = 1,
    max_position: int | None = None,
    atoms: Iterable[int] | None = None,
) -> list[Firing]:
    """Firings of one batch: positions ``min_position <= t <= max_position`` (default: all but the
    last) where the largest code entry is positive; optionally only those whose dominant atom is
    in ``atoms``."""
    length = codes.shape[1]
    max_position = length - 2 if max_position is None else min(max_position, length - 1)
    values, index = codes.max(dim=-1)
    contrib = contribution_norms(sae, values.flatten(), index.flatten()).view_as(values).cpu()
    values, index = values.cpu(), index.cpu()
    keep_atoms = None if atoms is None else set(int(a) for a in atoms)
    out = []
    for row, prompt in enumerate(prompt_ids):
        for t in range(min_position, max_position + 1):
            a = float(values[row, t])
            j = int(index[row, t])
            if a <= 0 or (keep_atoms is not None and j not in keep_atoms):
                continue
            out.append(Firing(int(prompt), t, site.layer, site.head, j, a, float(contrib[row, t]), float(write_norm[row, t])))
    return out


@torch.no_grad()
def find_firings(
    model: Any,
    sae: Any,
    tokens: Tensor | Sequence[Tensor],
    site: Site | None = None,
    batch_size: int = 8,
    min_position: int = 1,
    atoms: Iterable[int] | None = None,
    max_firings: int | None = None,
    max_per_atom: int | None = None,
    seed: int = 0,
) -> list[Firing]:
    """Every dominant-atom firing of ``sae`` over ``tokens`` (one observing pass per batch), then an
    optional seeded subsample: at most ``max_per_atom`` per atom, then at most ``max_firings``.
    The result is sorted by ``(prompt, position)`` and is a fixed function of the inputs and
    ``seed``, so a resumed run selects the same firings."""
    site = site or resolve_site(model, sae)
    prompts = as_prompt_list(tokens)
    firings: list[Firing] = []
    for ids, batch in prompt_batches(prompts, batch_size):
        seen = observe_site(model, batch, site, sae, logits=False)
        firings += dominant_firings(ids, seen["codes"], seen["write_norm"], sae, site, min_position, atoms=atoms)
    generator = torch.Generator().manual_seed(seed)
    if max_per_atom is not None:
        by_atom: dict[int, list[Firing]] = {}
        for f in firings:
            by_atom.setdefault(f.atom, []).append(f)
        firings = []
        for atom in sorted(by_atom):
            group = by_atom[atom]
            if len(group) > max_per_atom:
                pick = torch.randperm(len(group), generator=generator)[:max_per_atom].tolist()
                group = [group[i] for i in pick]
            firings += group
    if max_firings is not None and len(firings) > max_firings:
        pick = torch.randperm(len(firings), generator=generator)[:max_firings].tolist()
        firings = [firings[i] for i in pick]
    return sorted(firings, key=lambda f: (f.prompt, f.position))


def firing_generator(seed: int, *key: int) -> torch.Generator:
    """A generator seeded by ``(seed, *key)`` alone, so a firing's random control does not depend on
    the batch it was evaluated in, the order of conditions, or whether the run was resumed."""
    digest = hashlib.blake2b(repr((seed, *key)).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))


def random_rank1(d_k: int, d_v: int, generator: torch.Generator) -> Float[Tensor, "d_k d_v"]:
    """A fresh random unit-Frobenius-norm rank-1 matrix ``r s^T`` (Gaussian directions)."""
    r = torch.randn(d_k, generator=generator, dtype=torch.float64)
    s = torch.randn(d_v, generator=generator, dtype=torch.float64)
    return torch.outer(r / r.norm(), s / s.norm()).float()


# ---------------------------------------------------------------- RecurrentState surgery
def map_state(state: RecurrentState, fn: Callable[[Tensor], Tensor]) -> RecurrentState:
    """A new ``RecurrentState`` whose every cached tensor is ``fn(tensor)`` (batch is dim 0 of all)."""
    layers = []
    for cache in state.layers:
        changes = {
            f.name: fn(value)
            for f in dataclasses.fields(cache)
            if isinstance(value := getattr(cache, f.name), Tensor)
        }
        layers.append(dataclasses.replace(cache, **changes))
    return RecurrentState(layers, state.n_tokens)


def select_rows(state: RecurrentState, index: Int[Tensor, "rows"]) -> RecurrentState:
    """Rows ``index`` of every cache (repeats allowed): independent copies to continue from."""
    return map_state(state, lambda x: x.index_select(0, index.to(x.device)))


def clone_state(state: RecurrentState) -> RecurrentState:
    return map_state(state, lambda x: x.clone())


def continue_run(
    model: Any,
    tokens: Int[Tensor, "batch pos"],
    state: RecurrentState,
    fwd_hooks: Sequence[tuple[str, Callable]] = (),
    return_type: str | None = "logits",
    positions: Sequence[int] | None = None,
) -> Tensor | None:
    """``model(tokens, past_state=state)`` with ``fwd_hooks`` live.

    With ``positions`` (indices into this call), only those positions are unembedded: the final
    norm and unembedding run on ``[batch, len(positions), d_model]`` instead of every position.
    """
    if tokens.shape[1] == 0:
        return None
    tokens = tokens.to(model.cfg.device)
    with model.hooks(fwd_hooks=list(fwd_hooks)):
        if positions is None or return_type != "logits":
            return model(tokens, return_type=return_type, past_state=state)
        resid = model(tokens, past_state=state, stop_at_layer=len(model.blocks))
        state.n_tokens += tokens.shape[1]  # forward() skips this when it stops early
        if not positions:
            return resid.new_zeros(resid.shape[0], 0, model.cfg.d_vocab)
        return model.unembed(model.ln_final(resid[:, list(positions)]))


def prefix_states(
    model: Any, tokens: Int[Tensor, "batch pos"], positions: Iterable[int], extra_hooks: Sequence[tuple[str, Callable]] = ()
) -> Iterator[tuple[int, RecurrentState]]:
    """For each ``t`` in ``sorted(set(positions))``, yield ``(t, state)`` where ``state`` has consumed
    ``tokens[:, :t]`` (all rows; advanced incrementally, so the whole walk costs one pass).
    Branch off it with :func:`select_rows`; do not run it forward yourself."""
    state = RecurrentState.empty(model.cfg.layer_types)
    done = 0
    for t in sorted(set(positions)):
        continue_run(model, tokens[:, done:t], state, extra_hooks, return_type=None)
        done = t
        yield t, state


def branch_logits(
    model: Any,
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
    """Logits of ``tokens[rows]`` continuing from rows ``rows`` of ``state`` (which holds
    ``tokens[:, :t]``) over positions ``t..end``, with ``write_hook`` on ``site``'s ``hook_write``
    during the step at ``t`` only (its position index is 0 there). ``positions`` (absolute, within
    ``t..end``) selects which positions are unembedded and returned (default: all)."""
    branch = select_rows(state, rows)
    suffix = tokens[rows, t : end + 1]
    wanted = list(range(t, end + 1)) if positions is None else sorted(positions)
    first = continue_run(model, suffix[:, :1], branch, [*extra_hooks, (site.write_hook, write_hook)],
                         positions=[0] if t in wanted else [])
    rest = continue_run(model, suffix[:, 1:], branch, extra_hooks, positions=[p - t - 1 for p in wanted if p > t])
    return first if rest is None else torch.cat([first, rest], dim=1)


# ---------------------------------------------------------------- batched branches of different prefixes
def _batch_size(state: RecurrentState) -> int | None:
    for cache in state.layers:
        for f in dataclasses.fields(cache):
            if isinstance(value := getattr(cache, f.name), Tensor):
                return value.shape[0]
    return None


def _cat_or_zeros(values: Sequence[Tensor | None], sizes: Sequence[int]) -> Tensor | None:
    """Concatenate along the batch dim; ``None`` (an untouched cache, which means zeros) becomes
    zeros shaped like the others."""
    like = next((v for v in values if v is not None), None)
    if like is None:
        return None
    return torch.cat([like.new_zeros(n, *like.shape[1:]) if v is None else v for v, n in zip(values, sizes)])


def _stack_attention(caches: Sequence[AttentionCache], sizes: Sequence[int]) -> AttentionCache:
    """One attention cache for rows whose prefixes have different lengths (see ``AttentionCache``):
    keys and values right-padded to the longest prefix, with the key mask and row lengths."""
    slots = max(c.length for c in caches)
    ragged = any(c.row_lengths is not None or c.length != slots for c in caches)
    if slots == 0:
        return AttentionCache()
    if not ragged:
        return AttentionCache(torch.cat([c.keys for c in caches]), torch.cat([c.values for c in caches]))
    like = next(c for c in caches if c.keys is not None)
    total = sum(sizes)
    keys = like.keys.new_zeros(total, slots, *like.keys.shape[2:])
    values = like.values.new_zeros(total, slots, *like.values.shape[2:])
    key_mask = torch.zeros(total, slots, dtype=torch.bool, device=like.keys.device)
    lengths = []
    start = 0
    for cache, n in zip(caches, sizes):
        if cache.keys is not None:
            keys[start : start + n, : cache.length] = cache.keys
            values[start : start + n, : cache.length] = cache.values
            key_mask[start : start + n, : cache.length] = True if cache.key_mask is None else cache.key_mask
        lengths.append(torch.full((n,), cache.length, device=key_mask.device) if cache.row_lengths is None
                       else cache.row_lengths)
        start += n
    return AttentionCache(keys, values, key_mask, torch.cat(lengths))


def stack_states(states: Sequence[RecurrentState], sizes: Sequence[int] | None = None) -> RecurrentState:
    """The rows of ``states`` as one batch, whatever number of tokens each has consumed.

    Recurrent caches have a fixed size and simply concatenate (an untouched cache counts as zeros,
    which is what it means); attention caches of different lengths become one ragged cache (see
    ``hooked_ssm.state.AttentionCache``), so every row continues its own prefix at its own
    positions. ``n_tokens`` of the result is the longest prefix (hooks that use
    ``model.current_position_offset`` see that one). ``sizes`` (rows of each state) is needed only
    for a state that holds no tensor yet (nothing consumed); such a state otherwise counts as one row.
    """
    if sizes is None:
        sizes = [_batch_size(s) or 1 for s in states]
    layers = []
    for caches in zip(*(s.layers for s in states)):
        if isinstance(caches[0], AttentionCache):
            layers.append(_stack_attention(caches, sizes))
            continue
        changes = {f.name: _cat_or_zeros([getattr(c, f.name) for c in caches], sizes) for f in dataclasses.fields(caches[0])}
        layers.append(dataclasses.replace(caches[0], **changes))
    return RecurrentState(layers, max(s.n_tokens for s in states))


def run_layers(
    model: Any,
    inputs: Int[Tensor, "batch pos"] | Float[Tensor, "batch pos d_model"],
    state: RecurrentState,
    first_layer: int = 0,
    fwd_hooks: Sequence[tuple[str, Callable]] = (),
    v_first: Float[Tensor, "batch pos head d_v"] | None = None,
) -> Float[Tensor, "batch pos d_model"]:
    """The final residual stream (before ``ln_final``) of a continuation of ``state``, with
    ``fwd_hooks`` live. Advances ``state`` in place.

    With ``first_layer = 0``, ``inputs`` are token ids. An edit at layer ``l`` cannot change the
    blocks before ``l``, so a caller that has their output can start at ``first_layer = l``:
    ``inputs`` is then the residual stream entering that block (its ``hook_resid_pre``) and only
    the caches of blocks ``>= l`` are read or advanced. RWKV-7 layers ``>= 1`` also read layer 0's
    value (the value residual): pass it as ``v_first`` (``blocks.0.mixer.hook_v_first``).
    """
    length = inputs.shape[1]
    # Leaving a hooks() context resets every hook point: skipped when there is nothing to add.
    hooks = model.hooks(fwd_hooks=list(fwd_hooks)) if fwd_hooks else nullcontext()
    with hooks:
        if first_layer == 0:
            resid = model(inputs.to(model.cfg.device), past_state=state, stop_at_layer=len(model.blocks))
        else:
            model.current_position_offset = state.n_tokens
            if v_first is not None:
                model.blocks[0].mixer.value_residual.value = v_first
            resid = inputs
            for layer in range(first_layer, len(model.blocks)):
                resid = model.blocks[layer](resid, state.layers[layer])
    state.n_tokens += length  # forward() skips this when it stops early
    return resid


def write_replacement_hook(head: int, position: int, new_writes: Float[Tensor, "rows dk_dv"]) -> Callable:
    """A ``hook_write`` hook that sets the write of ``head`` at ``position`` (of this forward call)
    to ``new_writes`` (one flattened key-major matrix per batch row)."""

    def hook(act: Tensor, hook: Any) -> Tensor:
        act[:, position, head] = new_writes.to(act)
        return act

    return hook


def write_addition_hook(head: int, position: int, deltas: Float[Tensor, "rows dk_dv"]) -> Callable:
    """A ``hook_write`` hook that adds ``deltas`` to the write of ``head`` at ``position``."""

    def hook(act: Tensor, hook: Any) -> Tensor:
        act[:, position, head] += deltas.to(act)
        return act

    return hook


__all__ = [
    "Site",
    "resolve_site",
    "atom_norms",
    "unit_atoms",
    "unit_factors",
    "contribution_norms",
    "token_windows",
    "toy_validation_texts",
    "as_prompt_list",
    "prompt_batches",
    "observe_site",
    "encode",
    "Firing",
    "dominant_firings",
    "find_firings",
    "firing_generator",
    "random_rank1",
    "map_state",
    "select_rows",
    "clone_state",
    "continue_run",
    "stack_states",
    "run_layers",
    "prefix_states",
    "branch_logits",
    "write_replacement_hook",
    "write_addition_hook",
]
