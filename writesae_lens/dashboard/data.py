"""What an atom dashboard shows, computed in one streaming pass over a corpus (cached on disk).

For a rank-1 SAE at one head (``blocks.{l}.mixer.hook_write`` or ``hook_state``), atom ``i`` is
``u_i w_i^T`` (unit factors: ``u`` key side, ``w`` value side; METHOD.md section 1). Per position
``t`` of every window the pass records, for every atom at once:

- ``act``: the SAE code ``a_i(t)`` (a *firing* is ``a_i(t) > 0``);
- ``write``: the native write's component along the atom, ``<u w^T, b_t k_t v_t^T>_F =
  (u . k_t)(w . b_t v_t)`` (from ``hook_write_factors``): where the atom is *written*;
- ``read``: ``u . q_t``, how strongly the query at ``t`` reads the atom's key direction (the read
  returns ``(u . q_t) w`` per unit of the atom in the state; METHOD.md section 5);
- ``in_state``: whether the atom is in the state at ``t``. For a state SAE, its code there is
  positive. For a write SAE, it was written at some ``s <= t`` of the window and the forget-gate
  product since then, ``G(s -> t) = prod_{r=s+1..t} a_r``, is at least ``presence`` (default 1/2:
  one half-life; the erase term is ignored, as in the closed form).

From those it keeps, per atom: firing count and density, mean/max activation, a histogram of the
non-zero codes, the ``n_contexts`` windows with the largest code (one snippet each, around its
best position) and the windows whose queries read the atom most strongly (largest ``|u . q_t|``
over positions where it is in the state), the firing-level cosines with the native write (for the
register / bundle partition, ``writesae_lens.analysis.partition``). After the pass: ``u``'s nearest
tokens (cosine of ``u`` with each token's mean key at that head over the corpus) and ``w``'s
closed-form logit effect at unit read, ``w . W_O[h] W_U`` (the ``gate`` form of
``writesae_lens.interventions.logit_shift`` with ``G (u . q) = 1``): top promoted and suppressed
tokens.

The corpus streams: texts are tokenised lazily (``token_windows``) and activations never outlive
their batch; only token ids and each atom's top snippets are kept. The result is a JSON-ready
dict (layout in :func:`compute_dashboard_data`), cached under ``cache_dir`` by a key of the model's
site weights, the SAE's weights, the token windows and the settings, so a second call with the
same inputs loads it instead of running the model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from writesae_lens.analysis.partition import atom_write_cosines, partition_atoms
from writesae_lens.dashboard.contexts import Context, TopContexts
from writesae_lens.interventions.atoms import unit_factors
from writesae_lens.interventions.engine import prompt_batches
from writesae_lens.interventions.observe import observe_site
from writesae_lens.interventions.sites import Site, resolve_site
from writesae_lens.interventions.tokens import token_windows
from writesae_lens.interventions.logit_shift import readout_matrix

DATA_VERSION = 1
CHANNELS = ("act", "write", "read", "in_state")
DashboardData = dict[str, Any]  # JSON-ready; layout in compute_dashboard_data


@dataclass(frozen=True)
class DashboardConfig:
    """Settings of the computation (all part of the cache key)."""

    n_contexts: int = 8  # top-activating and top-read windows kept per atom
    context_left: int = 20  # snippet: tokens before the ranked position
    context_right: int = 6  # and after it
    n_tokens: int = 10  # nearest key tokens, promoted and suppressed tokens shown
    histogram_bins: int = 30
    min_firings: int = 5  # alive atoms (the index lists these; the partition's threshold too)
    presence: float = 0.5  # write SAEs: in the state while G(last write -> t) >= presence
    min_position: int = 1  # positions before this (the BOS token) are not ranked or counted
    min_key_count: int = 2  # a token needs this many occurrences for its mean key to count
    batch_size: int = 8

    def __post_init__(self) -> None:
        if min(self.n_contexts, self.n_tokens, self.histogram_bins, self.min_firings, self.batch_size) < 1:
            raise ValueError("n_contexts, n_tokens, histogram_bins, min_firings and batch_size must be >= 1.")
        if not 0 < self.presence <= 1:
            raise ValueError(f"presence must be in (0, 1], not {self.presence}.")


# ---------------------------------------------------------------- per-batch quantities
def write_projection(
    factors: Float[Tensor, "batch pos dk_plus_dv"], u: Float[Tensor, "atom d_k"], w: Float[Tensor, "atom d_v"]
) -> Float[Tensor, "batch pos atom"]:
    """``<u_i w_i^T, k_t (b_t v_t)^T>_F = (u_i . k_t)(w_i . b_t v_t)`` from the write's factors."""
    d_k = u.shape[-1]
    return (factors[..., :d_k].float() @ u.T) * (factors[..., d_k:].float() @ w.T)


def in_state_after_writes(
    fires: Bool[Tensor, "batch pos atom"], decay: Float[Tensor, "batch pos"] | Float[Tensor, "batch pos atom"],
    presence: float,
) -> Bool[Tensor, "batch pos atom"]:
    """Positions where an atom written at some ``s <= t`` still holds ``G(s -> t) >= presence``.

    ``decay`` is the head's forget gate per position, or per position and atom. The latest write
    dominates (``G`` shrinks with distance), so only it is checked.
    """
    length = fires.shape[1]
    steps = torch.arange(length, device=fires.device)[None, :, None]
    last = torch.where(fires, steps, -1).cummax(dim=1).values  # [batch, pos, atom]
    log_cum = decay.double().clamp_min(1e-300).log().cumsum(dim=1)
    log_cum = (log_cum if log_cum.dim() == 3 else log_cum[:, :, None]).expand_as(last)
    gate = (log_cum - log_cum.gather(1, last.clamp_min(0))).exp()
    return (last >= 0) & (gate >= presence)


def atom_decay(decay: Tensor, u: Float[Tensor, "atom d_k"]) -> Tensor:
    """The forget gate an atom sees: the head's ``[batch, pos]`` gate as is (Gated DeltaNet,
    Mamba-2); RWKV-7's per-key-channel decay ``[batch, pos, d_k]`` averaged with weights ``u_i^2``
    (``u^T diag(w_t) u`` for a unit ``u``), ``[batch, pos, atom]``."""
    return decay if decay.dim() == 2 else decay.float() @ (u * u).T


def _masked(score: Tensor, keep: Tensor) -> Tensor:
    return torch.where(keep, score.float(), -torch.inf)


# ---------------------------------------------------------------- cache key
def _digest(*parts: bytes | str) -> str:
    h = hashlib.blake2b(digest_size=12)
    for part in parts:
        h.update(part.encode() if isinstance(part, str) else part)
        h.update(b"\0")
    return h.hexdigest()


def _tensor_bytes(t: Tensor) -> bytes:
    return t.detach().float().cpu().contiguous().numpy().tobytes()


def cache_key(model: Any, sae: Any, site: Site, tokens: Tensor, config: DashboardConfig) -> str:
    """A digest of everything the data depends on: the model's head output map and unembedding
    slice at the site (plus its config), the SAE's parameters, the tokens and the settings."""
    sae_params = [_tensor_bytes(p) for _, p in sorted(sae.state_dict().items())]
    return _digest(
        str(DATA_VERSION), repr(site), repr(model.cfg), json.dumps(dataclasses.asdict(config), sort_keys=True),
        _tensor_bytes(model.W_O[site.layer][site.head]), json.dumps(sae.cfg.to_dict(), sort_keys=True, default=str),
        *sae_params, tokens.cpu().numpy().astype(np.int64).tobytes(),
    )


# ---------------------------------------------------------------- the pass
@torch.no_grad()
def compute_dashboard_data(
    model: Any,
    sae: Any,
    tokens: Int[Tensor, "window pos"] | None = None,
    *,
    texts: Iterable[str] | None = None,
    context_size: int = 128,
    max_windows: int | None = None,
    config: DashboardConfig | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> DashboardData:
    """The dashboard data of ``sae`` (a rank-1 SAE on a ``hook_write`` / ``hook_state`` head).

    Pass ``tokens`` (windows ``[n, pos]``) or ``texts`` (cut into ``max_windows`` windows of
    ``context_size`` tokens, BOS before each text). With ``cache_dir``, the result is stored
    there as ``dashboard-<key>.json`` and loaded on a later call with the same inputs.

    Returns a dict: ``meta`` (site, model, SAE, corpus size, settings), ``partition`` (the
    register / bundle summary), ``vocab`` (``{token id: display string}`` for every id shown)
    and ``atoms``: one dict per alive atom (``n_firings >= min_firings``), ordered by index, with
    ``atom, n_firings, density, mean_act, max_act, median_cos, cls, p_register``,
    ``histogram`` (``edges``, ``counts`` of the non-zero codes), ``top_contexts`` and
    ``read_contexts`` (snippets: ``window, position, focus, score, tokens`` and one list per
    channel ``act, write, read, in_state``), ``key_tokens`` (``token, cos, count``) and
    ``promoted`` / ``suppressed`` (``token, logit``: closed-form logit effect at unit read) and
    ``logit_histogram`` (that effect over the whole vocabulary).
    """
    config = config or DashboardConfig()
    if tokens is None:
        if texts is None:
            raise ValueError("Pass tokens= (token windows) or texts= (strings to cut into windows).")
        tokens = token_windows(model, texts, context_size, max_windows)
    if tokens.dim() != 2 or tokens.shape[0] == 0:
        raise ValueError(f"tokens must be a non-empty [window, pos] tensor, got shape {tuple(tokens.shape)}.")
    site = resolve_site(model, sae)
    if not (hasattr(sae, "atoms") and hasattr(sae, "U_dec")):
        raise TypeError(
            f"{type(sae).__name__} has no rank-1 decoder (U_dec, V_dec): the dashboard shows each atom's key and "
            "value factors, so it needs a 'writesae' or 'writesae_matrix' SAE."
        )
    cache_file = None
    if cache_dir is not None:
        cache_file = Path(cache_dir) / f"dashboard-{cache_key(model, sae, site, tokens, config)}.json"
        if cache_file.is_file():
            return json.loads(cache_file.read_text(encoding="utf-8"))
    data = _compute(model, sae, site, tokens, config, progress)
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        staged = cache_file.with_name(f".{cache_file.name}.{os.getpid()}.tmp")
        staged.write_text(json.dumps(data, allow_nan=False), encoding="utf-8")
        os.replace(staged, cache_file)  # never a half-written cache file under the final name
    return data


def _compute(model: Any, sae: Any, site: Site, tokens: Tensor, config: DashboardConfig, progress: bool) -> DashboardData:
    d_sae, d_k, d_v = sae.cfg.d_sae, model.cfg.d_k, model.cfg.d_v
    u, w = (x.float().cpu() for x in unit_factors(sae, torch.arange(d_sae)))
    top = TopContexts(d_sae, config.n_contexts, CHANNELS, config.context_left, config.context_right)
    reads = TopContexts(d_sae, config.n_contexts, CHANNELS, config.context_left, config.context_right)
    n_fire = torch.zeros(d_sae, dtype=torch.long)
    sum_act = torch.zeros(d_sae, dtype=torch.float64)
    fired_atoms: list[np.ndarray] = []
    fired_values: list[np.ndarray] = []
    cos_atoms: list[np.ndarray] = []
    cos_values: list[np.ndarray] = []
    key_sum = torch.zeros(model.cfg.d_vocab, d_k, dtype=torch.float64)
    key_count = torch.zeros(model.cfg.d_vocab, dtype=torch.long)
    skip = config.min_position
    prompts = list(tokens)
    bar = tqdm(total=len(prompts), disable=not progress, desc=f"dashboard L{site.layer}H{site.head} {site.kind}")
    for ids, batch in prompt_batches(prompts, config.batch_size):
        seen = observe_site(model, batch, site, sae, leaves=("hook_q", "hook_k", "hook_decay", "hook_write_factors"),
                            logits=False)
        codes = seen["codes"].float().cpu()  # [batch, pos, atom]
        fires = codes > 0
        ranked = torch.zeros_like(fires[:, :, :1])
        ranked[:, skip:] = True  # positions that may be ranked / counted
        if site.kind == "state":
            in_state = fires
        else:
            in_state = in_state_after_writes(fires, atom_decay(seen["hook_decay"].float().cpu(), u), config.presence)
        read = seen["hook_q"].float().cpu() @ u.T
        channels = dict(act=codes, write=write_projection(seen["hook_write_factors"].cpu(), u, w), read=read,
                        in_state=in_state.float())
        window_ids = torch.tensor(ids)
        top.update(_masked(codes, fires & ranked), window_ids, batch, channels)
        reads.update(_masked(read.abs(), in_state & ranked), window_ids, batch, channels)

        counted = fires[:, skip:]
        n_fire += counted.sum(dim=(0, 1))
        sum_act += codes[:, skip:].sum(dim=(0, 1)).double()
        where = counted.nonzero()
        fired_atoms.append(where[:, 2].to(torch.int32).numpy())
        fired_values.append(codes[:, skip:][counted].numpy())
        atoms, cos = atom_write_cosines(sae, seen["codes"][:, skip:], seen["write"][:, skip:], d_k, d_v)
        cos_atoms.append(atoms)
        cos_values.append(cos)
        flat_tokens = batch[:, skip:].reshape(-1)
        key_sum.index_add_(0, flat_tokens, seen["hook_k"][:, skip:].reshape(-1, d_k).double().cpu())
        key_count += torch.bincount(flat_tokens, minlength=model.cfg.d_vocab)
        bar.update(len(ids))
    bar.close()

    n_tokens = tokens.shape[0] * max(tokens.shape[1] - skip, 0)
    fired_atoms_all, fired_values_all = np.concatenate(fired_atoms), np.concatenate(fired_values)
    cos_atoms_all, cos_values_all = np.concatenate(cos_atoms), np.concatenate(cos_values)
    cosines = _group_by_atom(cos_atoms_all, cos_values_all)
    fired_by_atom = _group_by_atom(fired_atoms_all, fired_values_all)
    part_rows, part_summary = partition_atoms(cosines, d_sae, min_firings=config.min_firings)
    alive = [i for i in range(d_sae) if int(n_fire[i]) >= config.min_firings]

    # Factor views over the vocabulary, for the alive atoms only.
    index = torch.tensor(alive, dtype=torch.long)
    mean_keys = key_sum / key_count.clamp_min(1)[:, None]
    mean_keys = (mean_keys / mean_keys.norm(dim=-1, keepdim=True).clamp_min(1e-12)).float()
    key_cos = u[index] @ mean_keys.T  # [alive, vocab]
    key_cos[:, key_count < config.min_key_count] = -torch.inf
    n_show = min(config.n_tokens, model.cfg.d_vocab)
    key_top = key_cos.topk(n_show, dim=-1)
    logit = w[index] @ readout_matrix(model, site.layer, site.head).cpu()  # [alive, vocab]
    promoted, suppressed = logit.topk(n_show, dim=-1), (-logit).topk(n_show, dim=-1)

    shown: set[int] = set()
    atoms_out = []
    for slot, atom in enumerate(alive):
        values = fired_by_atom[atom]
        histogram = _histogram(values, config.histogram_bins)
        keys = [dict(token=int(t), cos=float(c), count=int(key_count[t]))
                for c, t in zip(key_top.values[slot].tolist(), key_top.indices[slot].tolist()) if math.isfinite(c)]
        entry = dict(
            atom=atom, n_firings=int(n_fire[atom]), density=int(n_fire[atom]) / max(n_tokens, 1),
            mean_act=float(sum_act[atom]) / max(int(n_fire[atom]), 1), max_act=float(values.max()),
            median_cos=json_safe(part_rows[atom]["median_cos"]), cls=part_rows[atom]["cls"], p_register=part_rows[atom]["p_register"],
            histogram=histogram,
            logit_histogram=_histogram(logit[slot].numpy(), config.histogram_bins),
            top_contexts=[_context_dict(c) for c in top.contexts(atom)],
            read_contexts=[_context_dict(c) for c in reads.contexts(atom)],
            key_tokens=keys,
            promoted=[dict(token=int(t), logit=float(v))
                      for v, t in zip(promoted.values[slot].tolist(), promoted.indices[slot].tolist())],
            suppressed=[dict(token=int(t), logit=-float(v))
                        for v, t in zip(suppressed.values[slot].tolist(), suppressed.indices[slot].tolist())],
        )
        for ctx in entry["top_contexts"] + entry["read_contexts"]:
            shown.update(ctx["tokens"])
        shown.update(item["token"] for key in ("key_tokens", "promoted", "suppressed") for item in entry[key])
        atoms_out.append(entry)

    meta = dict(
        model=str(getattr(model.cfg, "model_name", "")), hook_name=site.hook_name, layer=site.layer, head=site.head,
        site=site.kind, d_sae=d_sae, d_k=d_k, d_v=d_v, architecture=sae.cfg.architecture(),
        sae_model=str(getattr(sae.cfg.metadata, "model_name", "")), n_windows=int(tokens.shape[0]),
        context_size=int(tokens.shape[1]), n_tokens=n_tokens, n_alive=len(alive), config=dataclasses.asdict(config),
    )
    # Only the partition summary holds numpy values or NaN; the atoms are built from Python numbers.
    return dict(version=DATA_VERSION, meta=meta, partition=json_safe(part_summary),
                vocab={str(t): token_string(model, t) for t in sorted(shown)}, atoms=atoms_out)


def json_safe(obj: Any) -> Any:
    """``obj`` with numpy scalars / arrays as Python numbers / lists and NaN or inf as ``None``
    (strict JSON: browsers' ``JSON.parse`` and Neuronpedia's importer reject ``NaN``)."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def _group_by_atom(atoms: np.ndarray, values: np.ndarray) -> dict[int, np.ndarray]:
    """``{atom: its values}`` in one sort (values keep their order within an atom)."""
    order = np.argsort(atoms, kind="stable")
    atoms, values = atoms[order], values[order]
    bounds = np.flatnonzero(np.diff(atoms)) + 1
    return {int(group[0]): vals for group, vals in zip(np.split(atoms, bounds), np.split(values, bounds)) if group.size}


def _histogram(values: np.ndarray, bins: int) -> dict[str, list[float]]:
    counts, edges = np.histogram(values, bins=bins)
    return dict(edges=[float(e) for e in edges], counts=[int(c) for c in counts])


def _context_dict(ctx: Context) -> dict[str, Any]:
    out = dict(window=ctx.window, position=ctx.position, focus=ctx.focus, score=ctx.score, tokens=ctx.tokens)
    out.update(ctx.channels)
    out["in_state"] = [bool(v) for v in out["in_state"]]
    return out


def token_string(model: Any, token: int) -> str:
    """How a token id is displayed: its decoded text (a lone byte of a multi-byte character
    decodes to U+FFFD; the tokenizer's own piece is shown then)."""
    tokenizer = model.tokenizer
    if tokenizer is None:
        return f"<{token}>"
    text = tokenizer.decode([token])
    if "\ufffd" in text:
        text = str(tokenizer.convert_ids_to_tokens([token])[0])
    return text


__all__ = [
    "DashboardConfig",
    "DashboardData",
    "compute_dashboard_data",
    "cache_key",
    "write_projection",
    "in_state_after_writes",
    "atom_decay",
    "token_string",
    "json_safe",
]
