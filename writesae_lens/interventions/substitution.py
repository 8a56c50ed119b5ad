"""The substitution test (paper section 2 "replacement protocol", section 3.2, App. J; METHOD.md section 4).

For each firing (prompt ``c``, position ``t``, layer ``l``, head ``h``, dominant atom ``j``) three
patched forward passes replace the native write ``D_nat(t) = b_t k_t v_t^T`` of head ``h`` at ``t``
only, and let the change propagate to every later position and layer:

- ``atom``: ``D = s * u_j w_j^T`` (unit-norm atom);
- ``delete``: ``D = 0``;
- ``random``: ``D = s * r q^T`` with fresh Gaussian unit directions ``r, q`` (same Frobenius
  norm as the atom condition; seeded by the firing alone, so it is reproducible).

``scale="native_norm"`` (default, App. J) sets ``s = ||D_nat(t)||_F``; ``scale="coefficient"``
(section 2) sets ``s`` to the Frobenius norm of the atom's decoded contribution, ``a_j(t)`` times its
unit form. Each condition is scored by ``KL(p_patched || p_base)`` of the next-token distribution:

- ``score="last"`` (default): at the last position of the evaluated window. The window ends at
  ``min(t + horizon, L - 1)``; ``horizon=None`` (default) means the end of the prompt;
- ``score="next"``: at position ``t + 1`` (the first position whose input token comes after the
  edited write; its distribution predicts token ``t + 2``);
- ``score="mean_after"``: the mean over positions ``t+1 .. window end``;
- ``score="current"``: at position ``t`` itself (the read right after the edited write; it
  predicts token ``t + 1``).

The atom **wins** when ``KL_atom < KL_delete``; the strict chain is ``KL_atom < KL_delete < KL_random``.

**Fast path** (``method="fast"``, default). The prompt batch's unpatched prefix is run once,
incrementally (a ``RecurrentState``), and copied at each firing position ``t``. Firings are then
taken in position order in groups, and each group runs as **one batch**: rows = firings x
conditions, each row continuing its own copy of the state at its own ``t`` over ``t..window end``
only (the attention layers of hybrids hold a ragged KV cache, so prefixes of different lengths
share a batch). Every row takes one hooked step (its write replaced), then the rows continue
together in segments, finished rows dropped between segments; only scored positions are
unembedded. Because an edit at layer ``l`` cannot change blocks ``< l``, an unpatched pass records
the residual stream entering block ``l`` and the prefix walk and the branches run blocks ``l..``
only. The base logits come from that pass, or, for layer 0 with short windows, from an extra
unpatched row per firing in the branch. Each condition starts from its own copy of the state, so
results do not depend on the order or grouping of conditions. ``max_rows`` caps the rows of one
batch (default 48 on CPU, 192 on GPU).

``method="naive"`` re-runs the prefix for each firing (``run_with_hooks`` on ``0..window end``);
the two agree to float32 round-off (tested to 1e-6 in KL).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from hooked_ssm.state import RecurrentState
from writesae_lens.analysis.report import append_jsonl, format_summary_table
from writesae_lens.analysis.stats import (
    bootstrap_ci,
    cliffs_delta,
    cluster_bootstrap_ci,
    median_mad,
    wilcoxon_signed_rank,
    wilson_interval,
)
from writesae_lens.interventions.firings import (
    Firing,
    Site,
    as_prompt_list,
    find_firings,
    firing_generator,
    prompt_batches,
    random_rank1,
    resolve_site,
    run_layers,
    select_rows,
    stack_states,
    unit_atoms,
    write_replacement_hook,
)
from writesae_lens.run_record import ResultsFile, describe_sae, run_record

CONDITIONS: tuple[str, ...] = ("atom", "delete", "random")
# Keyword arguments of the suite that change how fast it runs, not what its rows hold.
_NOT_RECORDED = ("batch_size", "max_rows", "progress", "layer", "head")
Scale = Literal["native_norm", "coefficient"]
Score = Literal["last", "next", "mean_after", "current"]


# ---------------------------------------------------------------- pieces
def kl_divergence(logits_p: Float[Tensor, "... vocab"], logits_q: Float[Tensor, "... vocab"]) -> Tensor:
    """``KL(p || q)`` of the softmax distributions, computed in float64."""
    log_p = F.log_softmax(logits_p.double(), dim=-1)
    log_q = F.log_softmax(logits_q.double(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def window_end(t: int, length: int, score: Score, horizon: int | None) -> int:
    """Last position run for a firing at ``t`` in a prompt of ``length`` tokens."""
    if score == "next":
        return t + 1
    if score == "current":
        return t
    return length - 1 if horizon is None else min(t + horizon, length - 1)


def scored_positions(t: int, end: int, score: Score) -> list[int]:
    if score == "last":
        return [end]
    if score == "next":
        return [t + 1]
    if score == "mean_after":
        return list(range(t + 1, end + 1))
    if score == "current":
        return [t]
    raise ValueError(f"score must be 'last', 'next', 'mean_after' or 'current', not {score!r}.")


def condition_writes(
    firings: Sequence[Firing],
    sae: Any,
    d_k: int,
    d_v: int,
    scale: Scale = "native_norm",
    conditions: Sequence[str] = CONDITIONS,
    seed: int = 0,
) -> Float[Tensor, "firing condition dk_dv"]:
    """The replacement write of each condition for each firing, flattened key-major."""
    if scale not in ("native_norm", "coefficient"):
        raise ValueError(f"scale must be 'native_norm' or 'coefficient', not {scale!r}.")
    unknown = set(conditions) - set(CONDITIONS)
    if unknown:
        raise ValueError(f"Unknown conditions {sorted(unknown)}; choose from {CONDITIONS}.")
    s = torch.tensor([f.native_norm if scale == "native_norm" else f.contribution_norm for f in firings])
    out = torch.zeros(len(firings), len(conditions), d_k * d_v)
    if "atom" in conditions:
        atoms = unit_atoms(sae, torch.tensor([f.atom for f in firings]), d_k, d_v).float().cpu()
        out[:, conditions.index("atom")] = (s[:, None, None] * atoms).flatten(1)
    if "random" in conditions:
        rand = torch.stack([random_rank1(d_k, d_v, firing_generator(seed, *f.key)) for f in firings])
        out[:, conditions.index("random")] = (s[:, None, None] * rand).flatten(1)
    return out


def _row(f: Firing, kls: Sequence[float], conditions: Sequence[str], scale: str, s: float, score: str, end: int) -> dict[str, Any]:
    row: dict[str, Any] = f.as_dict()
    row.update(scale_mode=scale, scale=s, score=score, window_end=end)
    for name, kl in zip(conditions, kls):
        row[f"kl_{name}"] = float(kl)
    if "atom" in conditions and "delete" in conditions:
        row["atom_wins"] = bool(row["kl_atom"] < row["kl_delete"])
    if "random" in conditions and "delete" in conditions:
        row["delete_beats_random"] = bool(row["kl_delete"] < row["kl_random"])
    if set(CONDITIONS) <= set(conditions):
        row["chain"] = bool(row["kl_atom"] < row["kl_delete"] < row["kl_random"])
    return row


# ---------------------------------------------------------------- the runs
@dataclass
class _Plan:
    """One firing of a prompt batch: ``index`` into the batch's firings (and their writes), its
    ``row`` in the batch, the edited position ``t``, the last position run ``end`` and the scored
    positions (absolute, within ``t..end``)."""

    index: int
    row: int
    t: int
    end: int
    scored: list[int]

    @property
    def n_after(self) -> int:
        return self.end - self.t


# Elements of one float64 KL block (positions x rows x vocab): bounds the scoring's memory.
_KL_BLOCK = 1 << 22


def _on_cpu(model: Any) -> bool:
    return torch.device(model.cfg.device).type == "cpu"


def _min_segment(model: Any) -> int:
    """Rows of a branch continue in segments of at least this many tokens: a row whose window ends
    inside a segment is padded to its end (causal, so the padding cannot reach it) and finished
    rows are dropped between segments. On CPU a call's fixed cost is ~25 row-tokens of work; on a
    GPU a call costs about the same whatever its length, so segments are long there."""
    return 16 if _on_cpu(model) else 128


def _default_max_rows(model: Any) -> int:
    """Rows of one batched branch when ``max_rows`` is not given: on CPU the throughput per
    row-token is flat from 3 to 48 rows; on a GPU larger batches mean fewer launches."""
    return 48 if _on_cpu(model) else 192


def _clean_pass(
    model: Any, tokens: Int[Tensor, "batch pos"], plans: Sequence[_Plan], first_layer: int
) -> tuple[dict[tuple[int, int], int], Tensor, Tensor, Tensor | None]:
    """One unpatched pass over the batch: the base logits at every scored ``(row, position)``
    (``index`` into ``logits``), the residual stream entering block ``first_layer`` (token ids when
    it is 0) and, for RWKV-7 runs starting past layer 0, layer 0's value residual."""
    hooks, captured = [], {}
    if first_layer > 0:
        def keep(name: str) -> Callable:
            def hook(act: Tensor, hook: Any) -> None:
                captured[name] = act.detach()
            return hook

        hooks.append((f"blocks.{first_layer}.hook_resid_pre", keep("resid")))
        if "blocks.0.mixer.hook_v_first" in model.hook_dict:
            hooks.append(("blocks.0.mixer.hook_v_first", keep("v_first")))
    with model.hooks(fwd_hooks=hooks):
        resid = model(tokens, stop_at_layer=len(model.blocks))
    pairs = sorted({(p.row, pos) for p in plans for pos in p.scored})
    index = {pair: i for i, pair in enumerate(pairs)}
    rows = torch.tensor([r for r, _ in pairs], device=resid.device, dtype=torch.long)
    cols = torch.tensor([c for _, c in pairs], device=resid.device, dtype=torch.long)
    logits = model.unembed(model.ln_final(resid[rows, cols]))
    inputs = captured["resid"] if first_layer > 0 else tokens
    return index, logits, inputs, captured.get("v_first")


class _PrefixWalk:
    """The unpatched prefix, advanced incrementally (blocks ``first_layer..`` only) to each firing
    position in increasing order; :meth:`snapshot` copies one row of it at ``t``."""

    def __init__(self, model: Any, inputs: Tensor, first_layer: int, v_first: Tensor | None):
        self.model, self.inputs, self.first_layer, self.v_first = model, inputs, first_layer, v_first
        self.state = RecurrentState.empty(model.cfg.layer_types)
        self.done = 0

    def snapshot(self, t: int, rows: Sequence[int]) -> RecurrentState:
        if t > self.done:
            v_first = None if self.v_first is None else self.v_first[:, self.done : t]
            run_layers(self.model, self.inputs[:, self.done : t], self.state, self.first_layer, (), v_first)
            self.done = t
        return select_rows(self.state, torch.tensor(rows))


def _gather(x: Tensor | None, rows: Tensor, cols: Tensor) -> Tensor | None:
    """``x[rows[i], cols[i, j]]`` as ``[n, len, ...]``, with ``cols`` clamped into the prompt
    (positions past a row's window only pad it, see :func:`_min_segment`)."""
    if x is None:
        return None
    cols = cols.clamp(max=x.shape[1] - 1).to(x.device)
    return x[rows.to(x.device)[:, None], cols]


class _Branch:
    """The patched continuations of one group of firings as one batch of rows.

    Rows are the firings (sorted by window length, longest first) times ``per`` slots: one per
    condition, plus an unpatched slot when the base logits are computed here (``base is None``).
    Each row starts from its firing's copy of the prefix state (``states``: one row per plan, in
    the order of ``plans``; prefixes of different lengths make ragged attention caches), takes one
    hooked step at its own ``t`` (its write replaced), then continues in segments that drop
    finished rows. Scored positions are unembedded as they pass.
    """

    def __init__(self, model, site, plans, states, writes, inputs, v_first, base, n_cond, first_layer):
        order = sorted(range(len(plans)), key=lambda i: (-plans[i].n_after, plans[i].t))
        self.plans = [plans[i] for i in order]
        self.model, self.site, self.inputs, self.v_first, self.first_layer = model, site, inputs, v_first, first_layer
        self.base, self.n_cond = base, n_cond
        self.per = n_cond + (base is None)
        per, device = self.per, torch.device(model.cfg.device)
        self.prompt_rows = torch.tensor([p.row for p in self.plans]).repeat_interleave(per)
        self.starts = torch.tensor([p.t for p in self.plans]).repeat_interleave(per)
        self.state = select_rows(states, torch.tensor(order, device=device).repeat_interleave(per))
        self.writes = writes[[p.index for p in self.plans]].flatten(0, 1).to(device)
        slot = torch.arange(len(order) * per) % per
        self.edited = torch.nonzero(slot < n_cond).flatten().to(device)  # rows whose write is replaced
        self.kl_sum = torch.zeros(len(order), n_cond, dtype=torch.float64, device=device)
        self.count = torch.zeros(len(order), dtype=torch.float64, device=device)

    def run(self, min_segment: int) -> tuple[list[int], Tensor]:
        """``(firing indices, mean KL [n, n_cond])``."""
        rows, starts = self.prompt_rows, self.starts
        edited, writes, head = self.edited, self.writes, self.site.head

        def replace(act: Tensor, hook: Any) -> Tensor:
            act[edited, 0, head] = writes.to(act)
            return act

        cols = starts[:, None]
        resid = run_layers(self.model, _gather(self.inputs, rows, cols), self.state, self.first_layer,
                           [(self.site.write_hook, replace)], _gather(self.v_first, rows, cols))
        self._score(resid, 0, 0)
        lengths = [p.n_after for p in self.plans]
        done = 0
        while lengths and lengths[0] > done:
            active = sum(n > done for n in lengths)  # a prefix: lengths are sorted, longest first
            if active * self.per < resid.shape[0]:
                self.state = select_rows(self.state, torch.arange(active * self.per, device=resid.device))
                rows, starts = rows[: active * self.per], starts[: active * self.per]
            stop = max(lengths[active - 1], min(lengths[0], done + min_segment))
            cols = starts[:, None] + torch.arange(done + 1, stop + 1)
            resid = run_layers(self.model, _gather(self.inputs, rows, cols), self.state, self.first_layer, (),
                               _gather(self.v_first, rows, cols))
            self._score(resid, done + 1, stop)
            done = stop
        return [p.index for p in self.plans], (self.kl_sum / self.count[:, None]).cpu()

    def _score(self, resid: Float[Tensor, "rows len d_model"], first: int, last: int) -> None:
        """KL of every scored position ``t + j`` with ``first <= j <= last`` (``resid`` covers exactly
        those offsets, starting at ``first``), accumulated per firing and condition."""
        pairs = [(i, pos) for i, p in enumerate(self.plans[: resid.shape[0] // self.per])
                 for pos in p.scored if first <= pos - p.t <= last]
        if not pairs:
            return
        per, vocab = self.per, self.model.cfg.d_vocab
        step = max(1, _KL_BLOCK // (per * vocab))
        device = resid.device
        for start in range(0, len(pairs), step):
            chunk = pairs[start : start + step]
            firing = torch.tensor([i for i, _ in chunk], device=device)
            offset = torch.tensor([pos - self.plans[i].t - first for i, pos in chunk], device=device)
            picked = resid[(firing * per)[:, None] + torch.arange(per, device=device), offset[:, None]]
            logits = self.model.unembed(self.model.ln_final(picked))  # [n, per, vocab]
            if self.base is None:
                reference = logits[:, self.n_cond]
            else:
                index, base_logits = self.base
                reference = base_logits[[index[(self.plans[i].row, pos)] for i, pos in chunk]]
            kl = kl_divergence(logits[:, : self.n_cond], reference[:, None])
            self.kl_sum.index_add_(0, firing, kl)
            self.count.index_add_(0, firing, torch.ones(len(chunk), dtype=torch.float64, device=device))


@torch.no_grad()
def _fast_batch(model, site, prompt_tokens, plans, writes, max_rows, n_cond):
    """Yield ``(firing indices, kl [n, n_cond])`` per group of one equal-length prompt batch.

    One prefix walk over the batch snapshots each firing's state at its position; firings are
    taken in position order in groups of ``max_rows // rows-per-firing`` and each group runs as one
    batched branch (see :class:`_Branch`). The base logits come from one unpatched pass over the
    batch, or, when the windows are short (together fewer tokens than the batch), from an
    unpatched slot in the branch. An edit at layer ``l`` cannot change blocks ``< l``: when
    ``l > 0`` the unpatched pass also records the residual stream entering block ``l`` and the
    walk and branches run blocks ``l..`` only.
    """
    batch, length = prompt_tokens.shape
    tokens = prompt_tokens.to(model.cfg.device)
    first_layer = site.layer
    clean_slot = first_layer == 0 and sum(p.n_after + 1 for p in plans) < batch * length
    if clean_slot:
        base, inputs, v_first = None, tokens, None
    else:
        index, logits, inputs, v_first = _clean_pass(model, tokens, plans, first_layer)
        base = (index, logits)
    walk = _PrefixWalk(model, inputs, first_layer, v_first)
    group_size = max(1, max_rows // (n_cond + clean_slot))
    min_segment = _min_segment(model)
    order = sorted(plans, key=lambda p: (p.t, p.row))
    for start in range(0, len(order), group_size):
        group = order[start : start + group_size]
        at: dict[int, list[int]] = {}  # t -> rows of the batch firing there, in group order
        for p in group:
            at.setdefault(p.t, []).append(p.row)
        states = stack_states([walk.snapshot(t, rows) for t, rows in at.items()], [len(r) for r in at.values()])
        branch = _Branch(model, site, group, states, writes, inputs, v_first, base, n_cond, first_layer)
        yield branch.run(min_segment)


@torch.no_grad()
def _naive_batch(model, site, prompt_tokens, plans, writes, max_rows, n_cond):
    """Reference: one full ``run_with_hooks`` from position 0 per firing (conditions batched)."""
    base_logits = model(prompt_tokens.to(model.cfg.device))
    for p in sorted(plans, key=lambda p: (p.t, p.row)):
        hook = write_replacement_hook(site.head, p.t, writes[p.index])
        tokens = prompt_tokens[p.row : p.row + 1, : p.end + 1].expand(n_cond, -1).to(model.cfg.device)
        logits = model.run_with_hooks(tokens, fwd_hooks=[(site.write_hook, hook)])
        base = base_logits[p.row : p.row + 1, p.scored].expand(n_cond, -1, -1)
        kl = kl_divergence(logits[:, p.scored], base).mean(-1).view(1, n_cond)
        yield [p.index], kl.cpu()


def substitute_firings(
    model: Any,
    sae: Any,
    tokens: Tensor | Sequence[Tensor],
    firings: Sequence[Firing],
    site: Site | None = None,
    scale: Scale = "native_norm",
    score: Score = "last",
    horizon: int | None = None,
    conditions: Sequence[str] = CONDITIONS,
    method: Literal["fast", "naive"] = "fast",
    batch_size: int = 8,
    max_rows: int | None = None,
    seed: int = 0,
    out: str | Path | ResultsFile | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Run the patched passes for the given ``firings``; one row per firing (see module docstring).

    Rows are appended to ``out`` (JSONL, or a :class:`ResultsFile`) as they complete, each whole. ``max_rows`` caps the batch rows of one
    patched forward of the fast path (firings x conditions); default 48 on CPU, 192 on GPU.
    """
    site = site or resolve_site(model, sae)
    conditions = tuple(conditions)
    prompts = as_prompt_list(tokens)
    d_k, d_v = model.cfg.d_k, model.cfg.d_v
    run_batch = {"fast": _fast_batch, "naive": _naive_batch}[method]
    if max_rows is None:
        max_rows = _default_max_rows(model)
    by_prompt: dict[int, list[Firing]] = {}
    for f in firings:
        if f.position >= len(prompts[f.prompt]) - 1 or f.position < 0:
            raise ValueError(f"Firing at position {f.position} of prompt {f.prompt}: needs 0 <= t < length - 1.")
        by_prompt.setdefault(f.prompt, []).append(f)
    rows: list[dict[str, Any]] = []
    bar = tqdm(total=len(firings), disable=not progress, desc=f"substitution L{site.layer}H{site.head}")
    for ids, batch in prompt_batches(prompts, batch_size, ids=sorted(by_prompt)):
        members = [(row, f) for row, prompt in enumerate(ids) for f in by_prompt[prompt]]
        plans = []
        for i, (row, f) in enumerate(members):
            end = window_end(f.position, batch.shape[1], score, horizon)
            plans.append(_Plan(i, row, f.position, end, scored_positions(f.position, end, score)))
        writes = condition_writes([f for _, f in members], sae, d_k, d_v, scale, conditions, seed)
        for group, kl in run_batch(model, site, batch, plans, writes, max_rows, len(conditions)):
            new = []
            for i, k in zip(group, kl):
                f = members[i][1]
                s = f.native_norm if scale == "native_norm" else f.contribution_norm
                new.append(_row(f, k.tolist(), conditions, scale, s, score, plans[i].end))
            rows += new
            if isinstance(out, ResultsFile):
                out.append(new)
            elif out is not None:
                append_jsonl(out, new)
            bar.update(len(new))
    bar.close()
    return rows


def run_substitution_test(
    model: Any,
    sae: Any,
    layer: int | None = None,
    head: int | None = None,
    tokens: Tensor | Sequence[Tensor] | None = None,
    *,
    firings: Sequence[Firing] | None = None,
    scale: Scale = "native_norm",
    score: Score = "last",
    horizon: int | None = None,
    conditions: Sequence[str] = CONDITIONS,
    method: Literal["fast", "naive"] = "fast",
    min_position: int = 1,
    atoms: Iterable[int] | None = None,
    max_firings: int | None = None,
    max_per_atom: int | None = None,
    batch_size: int = 8,
    max_rows: int | None = None,
    seed: int = 0,
    out: str | Path | ResultsFile | None = None,
    resume: bool = False,
    progress: bool = True,
    min_firings_per_atom: int = 1,
    provenance: Mapping[str, Any] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The paper's substitution test of ``sae`` at ``(layer, head)`` over ``tokens``.

    Args:
        tokens: token windows, ``[n, pos]`` or a list of 1-D tensors (prompt ids are their indices).
        firings: evaluate these instead of finding them (see :func:`find_firings`).
        scale, score, horizon, conditions, method: see the module docstring.
        min_position, atoms, max_firings, max_per_atom, seed: firing selection (seeded subsample).
        out: JSONL file that receives one row per firing as it completes, headed by the run's
            record (model, SAE and its weights' hash, site, seed, settings, tokens, versions;
            see :mod:`writesae_lens.run_record`); started afresh unless ``resume``.
        resume: skip the firings already in ``out`` and return them with the new ones; refused
            (``ResumeMismatchError`` naming the differing settings) when ``out`` was made by
            another run.
        min_firings_per_atom: atoms with fewer firings are left out of the population test.
        provenance: more settings to record with the run (e.g. the command line's arguments), so
            that a resume with other ones is refused naming them.

    Returns:
        ``(rows, summary)``: one dict per firing (ids, ``kl_atom``, ``kl_delete``, ``kl_random``,
        ``atom_wins``, ``chain``, ...) and :func:`summarize_substitution` of all rows.
    """
    if tokens is None:
        raise ValueError("Pass tokens= (token windows, e.g. from writesae_lens.interventions.token_windows).")
    site = resolve_site(model, sae, layer, head)
    atoms = None if atoms is None else sorted(int(a) for a in atoms)
    # Explicit firings are not recorded: a row depends on its firing and these settings only, so a
    # resume may add firings (e.g. continue with a longer list).
    settings = dict(scale=scale, score=score, horizon=horizon, conditions=list(conditions), method=method,
                    min_position=min_position, atoms=atoms, max_firings=max_firings, max_per_atom=max_per_atom,
                    **(provenance or {}))
    record = run_record("substitution", settings, model=model, sae=sae, seed=seed, tokens=as_prompt_list(tokens),
                        site=dict(layer=site.layer, head=site.head, kind=site.kind))
    previous: list[dict[str, Any]] = []
    if out is not None:  # opened first: a mismatched --resume fails before any work
        out = out if isinstance(out, ResultsFile) else ResultsFile(out, record, resume)
        previous = [r for r in out.previous_rows if (r["layer"], r["head"]) == (site.layer, site.head)]
    if firings is None:
        firings = find_firings(model, sae, tokens, site, batch_size, min_position, atoms, max_firings, max_per_atom, seed)
    done = {(r["prompt"], r["position"], r["layer"], r["head"]) for r in previous}
    firings = [f for f in firings if f.key not in done]
    rows = substitute_firings(
        model, sae, tokens, firings, site, scale, score, horizon, conditions, method, batch_size, max_rows, seed, out, progress
    )
    rows = sorted(previous + rows, key=lambda r: (r["prompt"], r["position"], r["layer"], r["head"]))
    summary = summarize_substitution(rows, min_firings_per_atom=min_firings_per_atom, seed=seed)
    summary["config"] = dict(layer=site.layer, head=site.head, site=site.kind, scale=scale, score=score,
                             horizon=horizon)
    summary["run"] = record
    return rows, summary


def run_substitution_suite(
    model: Any,
    saes: Sequence[Any],
    tokens: Tensor | Sequence[Tensor],
    *,
    out: str | Path | None = None,
    resume: bool = False,
    **kwargs: Any,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """:func:`run_substitution_test` for several SAEs (e.g. the paper's L1 / L9 / L17 H4) on the
    same tokens; rows of all sites together (one JSONL file when ``out`` is given, resumable), and
    one summary with ``per_layer`` rows."""
    record = run_record("substitution_suite", {k: v for k, v in kwargs.items() if k not in _NOT_RECORDED},
                        model=model, seed=kwargs.get("seed", 0), tokens=as_prompt_list(tokens))
    record["saes"] = [describe_sae(sae) for sae in saes]
    results = None if out is None else ResultsFile(out, record, resume)
    rows: list[dict[str, Any]] = []
    for sae in saes:
        site = resolve_site(model, sae, kwargs.get("layer"), kwargs.get("head"))
        site_kwargs = {k: v for k, v in kwargs.items() if k not in ("layer", "head")}
        site_rows, _ = run_substitution_test(model, sae, site.layer, site.head, tokens, out=results, **site_kwargs)
        rows += [r for r in site_rows if (r["layer"], r["head"]) == (site.layer, site.head)]
    summary = summarize_substitution(rows, min_firings_per_atom=kwargs.get("min_firings_per_atom", 1),
                                     seed=kwargs.get("seed", 0))
    summary["config"] = dict(sites=sorted({(r["layer"], r["head"]) for r in rows}),
                             scale=kwargs.get("scale", "native_norm"), score=kwargs.get("score", "last"))
    summary["run"] = record
    return rows, summary


# ---------------------------------------------------------------- summary
def summarize_substitution(
    rows: Sequence[Mapping[str, Any]],
    min_firings_per_atom: int = 1,
    n_boot: int = 2000,
    seed: int = 0,
    per_layer: bool = True,
) -> dict[str, Any]:
    """Win rate (Wilson CI, cluster bootstrap by atom), strict-chain rate, median KLs +- MAD/sqrt(n),
    ratio of medians, paired Wilcoxon (atom vs delete), Cliff's delta (delete vs atom: > 0 when the
    atom's KL is lower) and the per-atom population test (mean over alive atoms of their win rate,
    bootstrap CI over atoms)."""
    n = len(rows)
    summary: dict[str, Any] = {"n": n}
    if n == 0:
        return summary
    conditions = [c for c in CONDITIONS if f"kl_{c}" in rows[0]]
    kl = {c: np.array([r[f"kl_{c}"] for r in rows], dtype=float) for c in conditions}
    summary["median_kl"], summary["median_kl_se"] = {}, {}
    for c in conditions:
        summary["median_kl"][c], summary["median_kl_se"][c] = median_mad(kl[c])
    if "atom" in kl:
        base = summary["median_kl"]["atom"]
        summary["ratio_of_medians"] = {c: (summary["median_kl"][c] / base if base > 0 else math.nan) for c in conditions}
    if "atom" in kl and "delete" in kl:
        wins = kl["atom"] < kl["delete"]
        summary["wins"] = int(wins.sum())
        summary["win_rate"] = float(wins.mean())
        summary["win_ci"] = wilson_interval(int(wins.sum()), n)
        atoms = [r["atom"] for r in rows]
        summary["win_ci_cluster"] = cluster_bootstrap_ci(wins.astype(float), atoms, n_resamples=n_boot, seed=seed)
        summary["wilcoxon"] = wilcoxon_signed_rank(kl["atom"], kl["delete"])
        summary["cliffs_delta"] = cliffs_delta(kl["delete"], kl["atom"])
        by_atom: dict[int, list[bool]] = {}
        for atom, win in zip(atoms, wins):
            by_atom.setdefault(int(atom), []).append(bool(win))
        alive = {a: float(np.mean(w)) for a, w in by_atom.items() if len(w) >= min_firings_per_atom}
        rates = np.array(list(alive.values()))
        summary["population"] = dict(
            n_atoms=len(alive),
            mean_win_rate=float(rates.mean()) if rates.size else math.nan,
            ci=bootstrap_ci(rates, n_resamples=n_boot, seed=seed) if rates.size else (math.nan, math.nan),
            min_firings_per_atom=min_firings_per_atom,
        )
        if per_layer:
            layers: dict[int, list[bool]] = {}
            for r, win in zip(rows, wins):
                layers.setdefault(int(r["layer"]), []).append(bool(win))
            summary["per_layer"] = {
                layer: dict(n=len(w), win_rate=float(np.mean(w)), win_ci=wilson_interval(int(np.sum(w)), len(w)))
                for layer, w in sorted(layers.items())
            }
    if set(CONDITIONS) <= set(conditions):
        chain = (kl["atom"] < kl["delete"]) & (kl["delete"] < kl["random"])
        summary["chain_rate"] = float(chain.mean())
        summary["chain_ci"] = wilson_interval(int(chain.sum()), n)
        summary["delete_beats_random_rate"] = float((kl["delete"] < kl["random"]).mean())
    return summary


__all__ = [
    "CONDITIONS",
    "kl_divergence",
    "condition_writes",
    "substitute_firings",
    "run_substitution_test",
    "run_substitution_suite",
    "summarize_substitution",
    "format_summary_table",
]
