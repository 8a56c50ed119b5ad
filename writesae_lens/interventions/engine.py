"""The intervention engine: every protocol's "walk the prefix once, branch where the edits start,
run the branches batched, score" (docs/method.md, "The intervention engine").

A protocol says **what it edits** and **what it scores**; the engine does the rest.

- An :class:`Edit` changes one hook's activation at one absolute position of a prompt (for one
  head, or the whole slice): ``replace`` it or ``add`` to it. :func:`replace_write`,
  :func:`add_write`, :func:`add_to_state` and :func:`install` build the edits the paper's
  protocols use. Editing ``hook_write`` at ``t`` is an exact additive edit of the state from ``t``
  on (every family adds its write after the decay), so "add ``D`` to the state at ``t``" *is*
  "add ``D`` to the write at ``t``": the read at ``t`` and every later one see it.
- A :class:`Branch` is one patched continuation of one prompt: its edits, the last position it
  runs (``end``), the positions it scores, and optionally ``generate`` greedy tokens after the
  prompt (edits at positions past the prompt apply during decoding).
- A :class:`Scorer` turns logits into numbers: :class:`KL` (the substitution test), :class:`LogitShift`
  (the closed-form audit), :class:`Tangent` (forward-mode derivatives), :class:`TokenLogProbs`
  (installs), or any callable with the same signature.

How it runs (one prompt batch = prompts of equal length): an edit at layer ``l`` cannot change
blocks ``< l``, so one pass ``model(tokens, stop_at_layer=l)`` gives the residual stream entering
block ``l`` and everything after runs ``model(resid, start_at_layer=l, past_state=...)`` through
the public :meth:`HookedSSM.forward`. The unpatched prefix is walked once, incrementally, and
copied (:func:`select_rows`) at each branch's first edited position. Branches are taken in
position order in groups of at most ``max_rows`` rows; each group is **one batch** whose rows
continue prefixes of different lengths (attention caches become ragged, see
:func:`stack_states`), finished rows dropped between segments; only scored positions are
unembedded. Base logits (the unpatched run) come from one unpatched pass over the batch, or,
when the windows are short and the edits start at layer 0, from one unpatched row per distinct
``(prompt, start, end)`` in the group. Every branch starts from its own copy of the state, so
results do not depend on the order or grouping of branches.

Example (the substitution test's three conditions for one firing at ``t``)::

    engine = InterventionEngine(model)
    branches = [Branch(prompt=p, edits=[replace_write(layer, head, t, D)], scored=[L - 1])
                for D in (atom_write, torch.zeros_like(atom_write), random_write)]
    results = engine.run(tokens, branches, KL())           # results[i].scores["kl"]: [1]

A logit-shift audit adds ``eps u w^T`` and reads shifts at the base model's top tokens::

    Branch(p, [add_to_state(layer, head, t0, eps * torch.outer(u, w))], scored=range(t0, t0 + 5))
    engine.run(tokens, branches, LogitShift(ranks=(0,)))   # scores["shift"], scores["token"]

A sustained install over three positions, then 20 greedy tokens::

    Branch(p, install(layer, head, [t, t + 1, t + 2], [D1, D2, D3]), generate=20)
    engine.run(tokens, branches, TokenLogProbs(targets))   # result.generated, result.generated_scores
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from hooked_ssm.state import AttentionCache, RecurrentState

if TYPE_CHECKING:
    from hooked_ssm import HookedSSM

_LAYER_RE = re.compile(r"^blocks\.(\d+)\.")
_SCORE_BLOCK = 1 << 22  # logits elements scored at once (rows x vocab)
Hooks = Sequence[tuple[str, Callable]]


# ---------------------------------------------------------------- edits
@dataclass(frozen=True)
class Edit:
    """Set (``mode="replace"``) or add to (``mode="add"``) the activation of ``hook_name`` at the
    absolute ``position`` of a branch's prompt, for ``head`` (``None``: the hook's whole slice at
    that position). ``value`` has the shape of that slice (or any shape with as many elements,
    e.g. a ``[d_k, d_v]`` matrix for a flattened ``hook_write``)."""

    hook_name: str
    position: int
    value: Tensor
    head: int | None = None
    mode: Literal["replace", "add"] = "replace"

    @property
    def layer(self) -> int:
        match = _LAYER_RE.match(self.hook_name)
        if match is None:
            raise ValueError(f"The engine edits block hooks ('blocks.{{l}}....'); got {self.hook_name!r}.")
        return int(match.group(1))


def replace_write(layer: int, head: int, position: int, write: Float[Tensor, "d_k d_v"]) -> Edit:
    """The native write of ``head`` at ``position`` becomes ``write`` (the substitution test)."""
    return Edit(f"blocks.{layer}.mixer.hook_write", position, write, head, "replace")


def add_write(layer: int, head: int, position: int, delta: Float[Tensor, "d_k d_v"]) -> Edit:
    """``delta`` is added to the native write of ``head`` at ``position``."""
    return Edit(f"blocks.{layer}.mixer.hook_write", position, delta, head, "add")


def add_to_state(layer: int, head: int, position: int, delta: Float[Tensor, "d_k d_v"]) -> Edit:
    """``S_t += delta`` at ``t = position``: the read at ``t`` and every later one see it, and the
    recurrence carries it on (decayed, erased) as it carries the state. Exactly :func:`add_write`."""
    return add_write(layer, head, position, delta)


def install(layer: int, head: int, positions: Sequence[int], deltas: Sequence[Tensor] | Tensor) -> list[Edit]:
    """``add_to_state`` at several positions (a sustained install)."""
    return [add_to_state(layer, head, int(t), d) for t, d in zip(positions, deltas)]


@dataclass
class Branch:
    """One patched continuation of prompt ``prompt``.

    It starts at its first edited position (or, with no edits, at its first scored position: an
    unpatched control), runs to ``end`` (default: the prompt's last position) and scores the
    absolute ``scored`` positions (``start <= p <= end``). With ``generate > 0`` it then decodes
    that many tokens greedily (``end`` must be the prompt's last position); edits at positions
    past the prompt apply while decoding.
    """

    prompt: int
    edits: Sequence[Edit] = ()
    scored: Sequence[int] = ()
    end: int | None = None
    generate: int = 0

    def window(self, length: int) -> tuple[int, int]:
        """``(start, end)`` in a prompt of ``length`` tokens: the first edited (or scored) position,
        not past the prompt's end, and the last position run."""
        end = length - 1 if self.end is None else self.end
        first = [e.position for e in self.edits] or list(self.scored) or [end]
        return min(min(first), end), end


@dataclass
class BranchResult:
    """What one branch produced: each scorer output stacked over its scored positions (in
    increasing order), and with ``generate``, the greedy tokens and the scorer on each step."""

    scores: dict[str, Tensor] = field(default_factory=dict)
    generated: Int[Tensor, "new"] | None = None
    generated_scores: dict[str, Tensor] = field(default_factory=dict)


# ---------------------------------------------------------------- scorers
class Scorer(Protocol):
    """``scorer(patched, base, branch, position) -> {name: [n, ...]}``.

    ``patched`` are the branch rows' logits at scored positions (``[n, vocab]``), ``base`` the
    unpatched logits there (``None`` while decoding or when ``needs_base`` is False), ``branch``
    and ``position`` the branch index and absolute position of each row."""

    needs_base: bool

    def __call__(
        self, patched: Float[Tensor, "n vocab"], base: Float[Tensor, "n vocab"] | None,
        branch: Int[Tensor, "n"], position: Int[Tensor, "n"],
    ) -> dict[str, Tensor]: ...


def kl_divergence(logits_p: Float[Tensor, "... vocab"], logits_q: Float[Tensor, "... vocab"]) -> Float[Tensor, "..."]:
    """``KL(p || q)`` of the softmax distributions, in float64 (at 1e-7 float32 KL is noise)."""
    log_p = F.log_softmax(logits_p.double(), dim=-1)
    log_q = F.log_softmax(logits_q.double(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


@dataclass
class KL:
    """``{"kl": KL(p_patched || p_base)}`` (``direction="base_patched"``: ``KL(p_base || p_patched)``,
    the authors' script's direction)."""

    direction: Literal["patched_base", "base_patched"] = "patched_base"
    needs_base: bool = True

    def __call__(self, patched, base, branch, position):
        pair = (patched, base) if self.direction == "patched_base" else (base, patched)
        return {"kl": kl_divergence(*pair)}


@dataclass
class LogitShift:
    """``{"token": [n, k], "shift": [n, k]}``: the base model's tokens of rank ``ranks`` (0 = top-1)
    at each scored position and ``logit_patched - logit_base`` there."""

    ranks: Sequence[int] = (0,)
    needs_base: bool = True

    def __call__(self, patched, base, branch, position):
        tokens = base.argsort(dim=-1, descending=True)[:, list(self.ranks)]
        shift = patched.gather(-1, tokens).double() - base.gather(-1, tokens).double()
        return {"token": tokens, "shift": shift}


@dataclass
class Tangent:
    """Forward-mode derivative of the logits at ``tokens[branch]`` (``[n_branch, n_pos, k]``, one
    row of tokens per scored position in order, or ``[n_branch, k]``): run the engine inside
    ``torch.autograd.forward_ad.dual_level()`` with dual edit values (``make_dual(0, direction)``)."""

    tokens: Int[Tensor, "branch ..."]
    scored: Sequence[Sequence[int]] = ()
    needs_base: bool = False

    def __call__(self, patched, base, branch, position):
        tangent = fwAD.unpack_dual(patched).tangent
        tangent = torch.zeros_like(fwAD.unpack_dual(patched).primal) if tangent is None else tangent
        tokens = self.tokens.to(patched.device)[branch]
        if tokens.dim() == 3:  # per scored position: pick this position's row
            slot = torch.tensor([list(self.scored[int(b)]).index(int(p)) for b, p in zip(branch, position)],
                                device=patched.device)
            tokens = tokens[torch.arange(len(branch), device=patched.device), slot]
        return {"tangent": tangent.gather(-1, tokens).double()}


@dataclass
class TokenLogProbs:
    """``{"logprob": [n, k], "argmax": [n]}``: log-probabilities of ``targets[branch]`` (``[n_branch, k]``)
    and the greedy token; works while decoding (no base needed)."""

    targets: Int[Tensor, "branch k"]
    needs_base: bool = False

    def __call__(self, patched, base, branch, position):
        logp = F.log_softmax(patched.double(), dim=-1)
        return {"logprob": logp.gather(-1, self.targets.to(patched.device)[branch]), "argmax": patched.argmax(-1)}


# ---------------------------------------------------------------- RecurrentState surgery
def map_state(state: RecurrentState, fn: Callable[[Tensor], Tensor]) -> RecurrentState:
    """A new ``RecurrentState`` whose every cached tensor is ``fn(tensor)`` (batch is dim 0 of all)."""
    layers = []
    for cache in state.layers:
        changes = {f.name: fn(value) for f in dataclasses.fields(cache) if isinstance(value := getattr(cache, f.name), Tensor)}
        layers.append(dataclasses.replace(cache, **changes))
    return RecurrentState(layers, state.n_tokens)


def select_rows(state: RecurrentState, index: Int[Tensor, "rows"]) -> RecurrentState:
    """Rows ``index`` of every cache (repeats allowed): independent copies to continue from."""
    return map_state(state, lambda x: x.index_select(0, index.to(x.device)))


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


def _pad_slots(value: Tensor | None, slots: int) -> Tensor | None:
    """A per-slot cache tensor ``[batch, slot, ...]`` right-padded with zeros to ``slots`` slots."""
    if value is None or value.shape[1] == slots:
        return value
    return torch.cat([value, value.new_zeros(value.shape[0], slots - value.shape[1], *value.shape[2:])], dim=1)


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


_ATTENTION_FIELDS = {f.name for f in dataclasses.fields(AttentionCache)}


def stack_states(states: Sequence[RecurrentState], sizes: Sequence[int] | None = None) -> RecurrentState:
    """The rows of ``states`` as one batch, whatever number of tokens each has consumed.

    Recurrent caches have a fixed size and concatenate (an untouched cache counts as zeros, which
    is what it means); attention caches of different lengths become one ragged cache, so every row
    continues its own prefix at its own positions. ``n_tokens`` of the result is the longest
    prefix. ``sizes`` (rows of each state) is needed only for a state that holds no tensor yet.
    """
    if sizes is None:
        sizes = [_batch_size(s) or 1 for s in states]
    layers = []
    for caches in zip(*(s.layers for s in states)):
        if isinstance(caches[0], AttentionCache):
            stacked = _stack_attention(caches, sizes)
            # A cache that extends the attention cache (Falcon-H1's ParallelCache) also carries
            # recurrent fields: those concatenate like any recurrent cache's; fields with one entry
            # per slot (Qwen4-Exp's index keys) are right-padded to the stack's slots like the keys.
            extra = {f.name: _cat_or_zeros([_pad_slots(getattr(c, f.name), stacked.length) if f.metadata.get("per_slot")
                                            else getattr(c, f.name) for c in caches], sizes)
                     for f in dataclasses.fields(caches[0]) if f.name not in _ATTENTION_FIELDS}
            attention = {name: getattr(stacked, name) for name in _ATTENTION_FIELDS}
            layers.append(type(caches[0])(**attention, **extra) if extra else stacked)
            continue
        changes = {f.name: _cat_or_zeros([getattr(c, f.name) for c in caches], sizes) for f in dataclasses.fields(caches[0])}
        layers.append(dataclasses.replace(caches[0], **changes))
    return RecurrentState(layers, max(s.n_tokens for s in states))


# ---------------------------------------------------------------- the engine
@dataclass
class _Unit:
    """Branches of one prompt row sharing a start and an end: one state snapshot, one base slot."""

    row: int
    start: int
    end: int
    branches: list[int]

    @property
    def n_after(self) -> int:
        return self.end - self.start


def _gather(x: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """``x[rows[i], cols[i, j]]``, ``cols`` clamped into the prompt (positions past a row's end
    only pad it: the model is causal, so padding cannot reach the row's scored positions)."""
    cols = cols.clamp(max=x.shape[1] - 1).to(x.device)
    return x[rows.to(x.device)[:, None], cols]


class InterventionEngine:
    """Runs :class:`Branch` es of prompts through ``model`` and scores them (see module docstring).

    ``max_rows`` caps the rows of one batched forward (default 48 on CPU, 192 on GPU: on CPU the
    throughput per row-token is flat from 3 to 48 rows; a GPU wants large batches).
    ``min_segment``: rows continue in segments of at least this many tokens, finished rows
    dropped between them (default 16 on CPU, where a call's fixed cost is ~25 row-tokens; 128 on
    GPU, where a call costs about the same whatever its length). ``extra_hooks`` are live in every
    pass (unpatched and patched), e.g. to linearise a component.
    """

    def __init__(self, model: HookedSSM, max_rows: int | None = None, min_segment: int | None = None,
                 extra_hooks: Hooks = ()):
        on_cpu = torch.device(model.cfg.device).type == "cpu"
        self.model = model
        self.max_rows = max_rows or (48 if on_cpu else 192)
        self.min_segment = min_segment or (16 if on_cpu else 128)
        self.extra_hooks = list(extra_hooks)

    # ------------------------------------------------------------ public
    def run(self, tokens: Int[Tensor, "batch pos"] | Sequence[Tensor], branches: Sequence[Branch], scorer: Scorer,
            batch_size: int = 8) -> list[BranchResult]:
        """One :class:`BranchResult` per branch, in the order of ``branches``."""
        results: list[BranchResult | None] = [None] * len(branches)
        for index, done in self.iter_run(tokens, branches, scorer, batch_size):
            for i, r in zip(index, done):
                results[i] = r
        return results  # type: ignore[return-value]

    def iter_run(self, tokens: Int[Tensor, "batch pos"] | Sequence[Tensor], branches: Sequence[Branch],
                 scorer: Scorer, batch_size: int = 8) -> Iterator[tuple[list[int], list[BranchResult]]]:
        """Yield ``(branch indices, results)`` group by group as they finish (for streaming)."""
        prompts = as_prompt_list(tokens)
        by_prompt: dict[int, list[int]] = {}
        for i, b in enumerate(branches):
            self._check(b, len(prompts[b.prompt]) if 0 <= b.prompt < len(prompts) else None)
            by_prompt.setdefault(b.prompt, []).append(i)
        for ids, batch in prompt_batches(prompts, batch_size, ids=sorted(by_prompt)):
            members = [i for p in ids for i in by_prompt[p]]
            row_of = {p: r for r, p in enumerate(ids)}
            with torch.no_grad():
                yield from self._run_batch(batch, [row_of[branches[i].prompt] for i in members],
                                           [branches[i] for i in members], members, scorer)

    # ------------------------------------------------------------ one prompt batch
    @staticmethod
    def _check(branch: Branch, length: int | None) -> None:
        if length is None:
            raise ValueError(f"Branch of prompt {branch.prompt}: there is no such prompt.")
        start, end = branch.window(length)
        if not 0 <= start <= end < length:
            raise ValueError(f"Branch of prompt {branch.prompt} runs {start}..{end}: needs 0 <= start <= end < {length} "
                             "(the prompt's length).")
        if any(not start <= p <= end for p in branch.scored):
            raise ValueError(f"Scored positions {list(branch.scored)} fall outside the branch's window {start}..{end}.")
        if branch.generate and end != length - 1:
            raise ValueError("A branch that generates must run to the prompt's last position (end=None).")
        late = [e.position for e in branch.edits if e.position > end]
        if late and not all(p < length + branch.generate for p in late):
            raise ValueError(f"Edits at {late} come after the branch's end ({end}) and are not inside its generation "
                             f"({branch.generate} tokens).")

    def _run_batch(self, tokens, rows, branches, index, scorer):
        length = tokens.shape[1]
        tokens = tokens.to(self.model.cfg.device)
        generating = any(b.generate for b in branches)
        edited = [e.layer for b in branches for e in b.edits]
        first_layer = 0 if generating or not edited else min(edited)
        units: dict[tuple[int, int, int], _Unit] = {}
        for i, (b, row) in enumerate(zip(branches, rows)):
            start, end = b.window(length)
            units.setdefault((row, start, end), _Unit(row, start, end, [])).branches.append(i)
        # The base logits: one unpatched pass over the batch costs batch x length row-tokens (all
        # blocks from first_layer); an unpatched row per unit costs its window. Take the cheaper.
        base_slot = (scorer.needs_base and first_layer == 0
                     and sum(u.n_after + 1 for u in units.values()) < tokens.numel())
        inputs, side = self._inputs(tokens, first_layer)
        base = self._base_logits(inputs, side, first_layer, branches, rows) if scorer.needs_base and not base_slot else None
        walk = _PrefixWalk(self, inputs, first_layer, side)
        order = sorted(units.values(), key=lambda u: (u.start, u.row))
        group: list[_Unit] = []
        n_rows = 0
        for unit in [*order, None]:
            per = 0 if unit is None else len(unit.branches) + base_slot
            if group and (unit is None or n_rows + per > self.max_rows):
                at: dict[int, list[int]] = {}  # start -> units of the group starting there
                for i, u in enumerate(group):
                    at.setdefault(u.start, []).append(i)
                states = stack_states([walk.snapshot(t, [group[i].row for i in members]) for t, members in at.items()],
                                      [len(members) for members in at.values()])
                snapshot = [0] * len(group)
                for slot, i in enumerate(i for members in at.values() for i in members):
                    snapshot[i] = slot
                run = _GroupRun(self, group, snapshot, states, branches, index, tokens, inputs, side, first_layer,
                                base, base_slot, scorer)
                results = run.run()
                yield [index[i] for i in results], list(results.values())
                group, n_rows = [], 0
            if unit is not None:
                group.append(unit)
                n_rows += per

    def _inputs(self, tokens, first_layer) -> tuple[Tensor, dict[str, Tensor]]:
        """The input of block ``first_layer`` for every position (token ids for block 0), and the
        side inputs that blocks past it read besides the residual stream, by ``forward`` keyword:
        RWKV-7's value residual (``v_first``), Zamba2's token embeddings (``embeddings``), the token
        ids of Qwen4-Exp's Per-Layer Embeddings (``tokens``)."""
        if first_layer == 0:
            return tokens, {}
        captured: dict[str, Tensor] = {}
        side_hooks: dict[str, str] = {}  # forward keyword -> the hook point that gives it
        if "blocks.0.mixer.hook_v_first" in self.model.hook_dict:
            side_hooks["v_first"] = "blocks.0.mixer.hook_v_first"
        if any(self.model.reads_embeddings[first_layer:]):
            side_hooks["embeddings"] = "hook_embed"
        hooks = list(self.extra_hooks) + [
            (name, lambda act, hook, key=key: captured.__setitem__(key, act.detach())) for key, name in side_hooks.items()
        ]
        with self.model.hooks(fwd_hooks=hooks):
            resid = self.model(tokens, stop_at_layer=first_layer)
        if any(self.model.reads_tokens[first_layer:]):
            captured["tokens"] = tokens
        return resid, captured

    def forward(self, inputs: Tensor, state: RecurrentState, first_layer: int, side: dict[str, Tensor],
                hooks: Hooks = ()) -> Float[Tensor, "batch pos d_model"]:
        """The final residual stream (before ``ln_final``) continuing ``state`` (advanced in place),
        blocks ``first_layer..`` only, through :meth:`HookedSSM.forward`."""
        model, hooks = self.model, [*self.extra_hooks, *hooks]
        n_blocks = len(model.blocks)
        with model.hooks(fwd_hooks=hooks):
            if first_layer == 0:
                return model(inputs, past_state=state, stop_at_layer=n_blocks)
            return model(inputs, start_at_layer=first_layer, stop_at_layer=n_blocks, past_state=state, **side)

    def unembed(self, resid: Float[Tensor, "... d_model"]) -> Float[Tensor, "... vocab"]:
        return self.model.unembed(self.model.ln_final(resid))

    def _base_logits(self, inputs, side, first_layer, branches, rows) -> dict[tuple[int, int], Tensor]:
        """One unpatched pass over the batch: the base logits at every scored ``(row, position)``."""
        resid = self.forward(inputs, RecurrentState.empty(self.model.cfg.layer_types), first_layer, side)
        pairs = sorted({(row, p) for b, row in zip(branches, rows) for p in b.scored})
        if not pairs:
            return {}
        logits = self.unembed(resid[torch.tensor([r for r, _ in pairs]), torch.tensor([p for _, p in pairs])])
        return dict(zip(pairs, logits))


class _PrefixWalk:
    """The unpatched prefix of a prompt batch, advanced incrementally (blocks ``first_layer..``)
    to each requested position in increasing order; :meth:`snapshot` copies rows of it at ``t``."""

    def __init__(self, engine: InterventionEngine, inputs: Tensor, first_layer: int, side: dict[str, Tensor]):
        self.engine, self.inputs, self.first_layer, self.side = engine, inputs, first_layer, side
        self.state = RecurrentState.empty(engine.model.cfg.layer_types)
        self.done = 0

    def snapshot(self, t: int, rows: Sequence[int]) -> RecurrentState:
        if t > self.done:
            side = {key: value[:, self.done : t] for key, value in self.side.items()}
            self.engine.forward(self.inputs[:, self.done : t], self.state, self.first_layer, side)
            self.done = t
        return select_rows(self.state, torch.tensor(rows))


class _GroupRun:
    """One group of units as one batch of rows: per unit, one row per branch (plus a base row when
    the base logits come from the group). Rows are sorted by window length, longest first. Every
    row takes one step at its start (offset 0), then the rows continue together in segments,
    finished rows dropped between them; edits apply where their offset falls; scored positions
    are unembedded as they pass; generating rows are kept aside at the prompt's end and decode
    together."""

    def __init__(self, engine, units, snapshot, states, branches, index, tokens, inputs, side, first_layer, base,
                 base_slot, scorer):
        order = sorted(range(len(units)), key=lambda i: (-units[i].n_after, units[i].start))
        self.units = [units[i] for i in order]
        self.engine, self.branches, self.tokens = engine, branches, tokens
        self.inputs, self.side, self.first_layer = inputs, side, first_layer
        self.base, self.scorer = base, scorer
        self.global_index = torch.tensor(index)  # the scorer sees the caller's branch indices
        # Row layout: per unit, its branches, then (base_slot) one unpatched row.
        self.row_branch: list[int | None] = []  # branch index of each row (None: the base row)
        row_unit: list[int] = []
        for u, unit in enumerate(self.units):
            for b in [*unit.branches, *([None] if base_slot else [])]:
                self.row_branch.append(b)
                row_unit.append(u)
        self.base_row = {u: r for r, (u, b) in enumerate(zip(row_unit, self.row_branch)) if b is None}
        self.row_unit = row_unit
        unit_of_row = torch.tensor(row_unit)
        self.prompt_rows = torch.tensor([u.row for u in self.units])[unit_of_row]
        self.starts = torch.tensor([u.start for u in self.units])[unit_of_row]
        self.lengths = [self.units[u].n_after for u in row_unit]  # non-increasing
        self.generates = [b is not None and branches[b].generate > 0 for b in self.row_branch]
        device = torch.device(engine.model.cfg.device)
        self.state = select_rows(states, torch.tensor([snapshot[i] for i in order])[unit_of_row].to(device))
        self.scores: dict[int, dict[str, list[tuple[int, Tensor]]]] = {}
        self.generated: dict[int, BranchResult] = {}
        self.parked: list[tuple[int, RecurrentState, Tensor]] = []  # (row, state, last logits)

    def run(self) -> dict[int, BranchResult]:
        done, active = -1, len(self.row_branch)
        while active:
            stop = self._segment_end(done, active)
            cols = self.starts[:active, None] + torch.arange(done + 1, stop + 1)
            rows = self.prompt_rows[:active]
            hooks = self._edit_hooks(active, done + 1, stop)
            side = {key: _gather(value, rows, cols) for key, value in self.side.items()}
            resid = self.engine.forward(_gather(self.inputs, rows, cols), self.state, self.first_layer, side, hooks)
            self._score(resid, active, done + 1)
            done = stop
            still = sum(n > done for n in self.lengths[:active])  # a prefix: lengths are non-increasing
            self._park(resid, still, active)
            if still < active:
                self.state = select_rows(self.state, torch.arange(still, device=resid.device))
            active = still
        if self.parked:
            self._generate()
        return {b: self._result(b) for u in self.units for b in u.branches}

    def _segment_end(self, done: int, active: int) -> int:
        """The next call runs offsets ``done+1 .. stop``: offset 0 alone first (the usual edit, a
        one-token hooked step), then at least ``min_segment`` tokens, at least to the shortest
        active row's end; a row whose window ends inside is padded to ``stop`` (causal: padding
        cannot reach its scored positions), except a generating row, whose state must stop at the
        prompt's end."""
        if done < 0:
            return 0
        lengths = self.lengths[:active]
        stop = max(lengths[-1], min(lengths[0], done + self.engine.min_segment))
        ends = [n for n, g in zip(lengths, self.generates) if g and n > done]
        return min([stop, *ends])

    def _edit_hooks(self, active: int, first: int, last: int) -> list[tuple[str, Callable]]:
        """Hooks applying every edit whose offset falls in ``first..last`` (columns of this call)."""
        grouped: dict[tuple[str, str, bool], list[tuple[int, int, int | None, Tensor]]] = {}
        for r in range(active):
            b = self.row_branch[r]
            if b is None:
                continue
            start, end = int(self.starts[r]), int(self.starts[r]) + self.lengths[r]
            for e in self.branches[b].edits:
                if first <= e.position - start <= last and e.position <= end:
                    grouped.setdefault((e.hook_name, e.mode, e.head is None), []).append(
                        (r, e.position - start - first, e.head, e.value))
        return [(name, _edit_hook(mode, items)) for (name, mode, _), items in grouped.items()]

    def _score(self, resid: Tensor, active: int, first: int) -> None:
        """Score every scored position ``start + j`` that this call covered (``j >= first``)."""
        last = first + resid.shape[1] - 1
        picks = []  # (row, column, branch, absolute position)
        for r in range(active):
            b = self.row_branch[r]
            if b is None:
                continue
            start = int(self.starts[r])
            picks += [(r, p - start - first, b, p) for p in self.branches[b].scored if first <= p - start <= last]
        step = max(1, _SCORE_BLOCK // self.engine.model.cfg.d_vocab)  # bounds the logits held at once
        for chunk in range(0, len(picks), step):
            self._score_picks(resid, picks[chunk : chunk + step])

    def _score_picks(self, resid: Tensor, picks: Sequence[tuple[int, int, int, int]]) -> None:
        device = resid.device
        cols = torch.tensor([c for _, c, _, _ in picks], device=device)
        patched = self.engine.unembed(resid[torch.tensor([r for r, *_ in picks], device=device), cols])
        base = None
        if self.scorer.needs_base:
            if self.base is not None:
                base = torch.stack([self.base[(int(self.prompt_rows[r]), p)] for r, _, _, p in picks])
            else:  # the unit's unpatched row, same column
                base_rows = torch.tensor([self.base_row[self.row_unit[r]] for r, *_ in picks], device=device)
                base = self.engine.unembed(resid[base_rows, cols])
        out = self.scorer(patched, base, self.global_index[[b for _, _, b, _ in picks]].to(device),
                          torch.tensor([p for *_, p in picks], device=device))
        for i, (_, _, b, p) in enumerate(picks):
            store = self.scores.setdefault(b, {})
            for name, value in out.items():
                store.setdefault(name, []).append((p, value[i]))

    def _park(self, resid: Tensor, still: int, active: int) -> None:
        """Keep the state and last logits of generating rows that just reached the prompt's end
        (the last column of this call: a segment never runs a generating row past its end)."""
        for r in range(still, active):
            if self.generates[r]:
                self.parked.append((self.row_branch[r], select_rows(self.state, torch.tensor([r])),
                                    self.engine.unembed(resid[r, -1])))

    def _generate(self) -> None:
        """Greedy decoding of the parked rows, together (they all stand at the prompt's end)."""
        branches = [b for b, _, _ in self.parked]
        state = stack_states([s for _, s, _ in self.parked], [1] * len(branches))
        logits = torch.stack([lg for _, _, lg in self.parked])
        position = self.tokens.shape[1]
        steps = max(self.branches[b].generate for b in branches)
        device = logits.device
        index = self.global_index[branches].to(device)
        chosen: list[Tensor] = []
        scores: list[dict[str, Tensor]] = []
        for g in range(steps):
            scores.append(self.scorer(logits, None, index, torch.full((len(branches),), position + g, device=device)))
            chosen.append(logits.argmax(-1))
            if g < steps - 1:
                hooks = self._generation_edit_hooks(branches, position + g)
                resid = self.engine.forward(chosen[-1][:, None], state, 0, {}, hooks)
                logits = self.engine.unembed(resid[:, -1])
        tokens = torch.stack(chosen, dim=1).cpu()
        for i, b in enumerate(branches):
            n = self.branches[b].generate
            self.generated[b] = BranchResult(
                generated=tokens[i, :n],
                generated_scores={k: torch.stack([s[k][i] for s in scores[:n]]).cpu() for k in scores[0]})

    def _generation_edit_hooks(self, branches: Sequence[int], position: int) -> list[tuple[str, Callable]]:
        """Edits at absolute ``position`` (the token being fed while decoding) of each row."""
        grouped: dict[tuple[str, str, bool], list[tuple[int, int, int | None, Tensor]]] = {}
        for r, b in enumerate(branches):
            for e in self.branches[b].edits:
                if e.position == position:
                    grouped.setdefault((e.hook_name, e.mode, e.head is None), []).append((r, 0, e.head, e.value))
        return [(name, _edit_hook(mode, items)) for (name, mode, _), items in grouped.items()]

    def _result(self, b: int) -> BranchResult:
        result = self.generated.get(b, BranchResult())
        stored = self.scores.get(b, {})
        result.scores = {name: torch.stack([v for _, v in sorted(values, key=lambda pv: pv[0])]).cpu()
                         for name, values in stored.items()}
        return result


def _edit_hook(mode: str, items: Sequence[tuple[int, int, int | None, Tensor]]) -> Callable:
    """A hook that sets (or adds to) ``act[row, col(, head)]`` for each ``(row, col, head, value)``."""

    def hook(act: Tensor, hook: object) -> Tensor:
        rows = torch.tensor([r for r, *_ in items], device=act.device)
        cols = torch.tensor([c for _, c, *_ in items], device=act.device)
        if items[0][2] is None:
            target = act[rows, cols]
            values = torch.stack([v.reshape(target.shape[1:]) for *_, v in items]).to(act)
            index = (rows, cols)
        else:
            heads = torch.tensor([h for *_, h, _ in items], device=act.device)
            target = act[rows, cols, heads]
            values = torch.stack([v.reshape(target.shape[1:]) for *_, v in items]).to(act)
            index = (rows, cols, heads)
        if mode == "add":
            values = target + values
        if fwAD.unpack_dual(values).tangent is not None:
            act = act.clone()  # out of place: a dual value cannot go into a plain tensor in place
            return act.index_put(index, values)
        act[index] = values
        return act

    return hook


# ---------------------------------------------------------------- prompts
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


__all__ = [
    "Edit", "replace_write", "add_write", "add_to_state", "install",
    "Branch", "BranchResult", "Scorer", "KL", "LogitShift", "Tangent", "TokenLogProbs", "kl_divergence",
    "InterventionEngine", "map_state", "select_rows", "stack_states", "as_prompt_list", "prompt_batches",
]
