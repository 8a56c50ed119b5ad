"""Writing a chosen direction into the cache (paper section 4, App. I.5-I.6; METHOD.md section 6).

For a target token ``T`` the closed form picks the value-side direction
``w*_T = W_O[h] W_U[:, T] / ||W_O[h] W_U[:, T]||`` (our orientation: ``W_O[h]`` is the head's
``[d_v, d_model]`` slice; the paper's ``W_O[head]^T W_U[T]``). Writing ``s * u w*_T^T`` into head
``h``'s state shifts ``T``'s logit at a later position ``t`` by about ``s G (u . q_t) ||W_O[h] W_U[:, T]||``,
so its sign is predicted by ``sign(u . q_t)`` alone (``G > 0``).

- :func:`run_sign_prediction`: one write at one position; does the logit of ``T`` move in the
  predicted direction?
- :func:`sustained_install` / :func:`run_install_experiment`: write ``w*_T`` at three consecutive
  positions with magnitude ``m * ||D_nat(t)||_F`` (``m`` in {1.5, 3, 6}) and decode greedily; does
  ``T`` appear in the continuation (target inclusion), and how much does its first-step
  log-probability rise?

The key side ``u`` (``key=``): ``"native"`` (default) the native write key ``k_t`` at the written
position (the slot the model itself would write), ``"query"`` the query ``q_t`` there (so the read at
``t`` sees ``+|q_t|``), ``"random"`` a seeded random unit vector, or an explicit ``[d_k]`` tensor.
``mode="add"`` adds the install to the native write, ``"replace"`` replaces the write by it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from writesae_lens.analysis.report import format_steering_table
from writesae_lens.analysis.stats import r_squared, wilson_interval
from writesae_lens.interventions._legacy_walk import branch_logits, prefix_states, write_addition_hook
from writesae_lens.interventions.engine import as_prompt_list, prompt_batches
from writesae_lens.interventions.observe import observe_site
from writesae_lens.interventions.sites import Site, resolve_site
from writesae_lens.interventions.logit_shift import gate_products, readout_matrix

Key = Literal["native", "query", "random"] | Tensor

#: Rank strata of targets under the unmodified model at the first generated step (1-based ranks,
#: ``[lo, hi)``; ``None`` = end of the vocabulary). The paper's fourth stratum ("semantic") needs
#: a notion of relatedness and is left to the caller (pass ``targets=``).
DEFAULT_STRATA: dict[str, tuple[int, int | None]] = {"frequent": (2, 11), "mid": (100, 1000), "rare": (1000, None)}


def target_directions(model: Any, layer: int, head: int, targets: Tensor) -> Tensor:
    """``w*_T`` for each target: unit ``W_O[h] W_U[:, T]`` (``[n, d_v]``)."""
    directions = readout_matrix(model, layer, head)[:, targets.to(model.W_U.device)].T
    return directions / directions.norm(dim=-1, keepdim=True).clamp(min=1e-12)


def _key_vectors(key: Key, k: Tensor, q: Tensor, generator: torch.Generator) -> Tensor:
    """Unit key-side vectors ``[rows, d_k]`` from the captured ``k`` / ``q`` rows at the position."""
    if isinstance(key, Tensor):
        u = key.float().to(k.device).expand_as(k)
    elif key == "native":
        u = k.float()
    elif key == "query":
        u = q.float()
    elif key == "random":
        u = torch.randn(k.shape, generator=generator).to(k.device)
    else:
        raise ValueError(f"key must be 'native', 'query', 'random' or a tensor, not {key!r}.")
    return u / u.norm(dim=-1, keepdim=True).clamp(min=1e-12)


def install_hook(
    model: Any,
    site: Site,
    positions: Sequence[int] | Sequence[Sequence[int]],
    w_star: Tensor,
    multiplier: float,
    key: Key = "native",
    mode: Literal["add", "replace"] = "add",
    seed: int = 0,
) -> list[tuple[str, Callable]]:
    """Hooks that write ``multiplier * ||D_nat(t)||_F * u_t w*^T`` at absolute ``positions``
    (one list for all rows, or one list per row), valid across the calls of ``model.generate``
    (they read ``model.current_position_offset``). ``w_star`` is ``[rows, d_v]``."""
    captured: dict[str, Tensor] = {}
    head = site.head
    generator = torch.Generator().manual_seed(seed)

    def keep(name: str) -> Callable:
        def hook(act: Tensor, hook: Any) -> None:
            captured[name] = act[:, :, head]
        return hook

    def write(act: Tensor, hook: Any) -> Tensor:
        offset = model.current_position_offset
        per_row = positions and isinstance(positions[0], Sequence)
        for row in range(act.shape[0]):
            row_positions = positions[row] if per_row else positions
            for p in row_positions:
                rel = p - offset
                if not 0 <= rel < act.shape[1]:
                    continue
                native = act[row, rel, head]
                u = _key_vectors(key, captured["hook_k"][row : row + 1, rel], captured["hook_q"][row : row + 1, rel], generator)[0]
                install = multiplier * native.norm() * torch.outer(u, w_star[row].to(u)).flatten().to(act)
                act[row, rel, head] = install if mode == "replace" else native + install
        return act

    return [(site.mixer_hook("hook_q"), keep("hook_q")), (site.mixer_hook("hook_k"), keep("hook_k")), (site.write_hook, write)]


@torch.no_grad()
def sustained_install(
    model: Any,
    layer: int,
    head: int,
    prompts: Tensor,
    targets: Tensor,
    multiplier: float = 3.0,
    positions: Sequence[int] | None = None,
    n_positions: int = 3,
    key: Key = "native",
    mode: Literal["add", "replace"] = "add",
    max_new_tokens: int = 20,
    seed: int = 0,
) -> dict[str, Tensor]:
    """Greedy decoding of ``prompts`` (``[batch, pos]``, one target per row) with ``w*_T`` written
    at ``positions`` (default: the last ``n_positions`` prompt positions) of every row, and without.

    Returns ``continuation_base`` / ``continuation`` (``[batch, max_new_tokens]``), ``included_base``
    / ``included`` (the target appears in the continuation), and the first generated step's
    ``logp_base`` / ``logp`` and ``rank_base`` / ``rank`` of the target (rank 1 = top).
    """
    site = resolve_site(model, None, layer, head)
    prompts = prompts if prompts.dim() == 2 else prompts[None]
    targets = torch.as_tensor(targets).flatten().to(model.cfg.device)
    length = prompts.shape[1]
    positions = list(range(length - n_positions, length)) if positions is None else list(positions)
    w_star = target_directions(model, layer, head, targets)
    hooks = install_hook(model, site, positions, w_star, multiplier, key, mode, seed)
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, stop_at_eos=False, verbose=False, return_type="tokens")
    base_tokens = model.generate(prompts, **kwargs)[:, length:]
    with model.hooks(fwd_hooks=hooks):
        installed_tokens = model.generate(prompts, **kwargs)[:, length:]
        first = F.log_softmax(model(prompts)[:, -1].double(), dim=-1)
    first_base = F.log_softmax(model(prompts)[:, -1].double(), dim=-1)
    rows = torch.arange(len(targets), device=targets.device)
    rank = lambda logp: (logp > logp[rows, targets][:, None]).sum(-1) + 1  # noqa: E731
    return dict(
        continuation_base=base_tokens.cpu(),
        continuation=installed_tokens.cpu(),
        included_base=(base_tokens == targets[:, None]).any(-1).cpu(),
        included=(installed_tokens == targets[:, None]).any(-1).cpu(),
        logp_base=first_base[rows, targets].cpu(),
        logp=first[rows, targets].cpu(),
        rank_base=rank(first_base).cpu(),
        rank=rank(first).cpu(),
    )


def pick_targets(logits_last: Tensor, lo: int, hi: int | None, generator: torch.Generator) -> Tensor:
    """One target per row, drawn uniformly among the tokens ranked ``lo <= rank < hi`` (1-based)."""
    order = logits_last.argsort(dim=-1, descending=True)
    hi = order.shape[-1] + 1 if hi is None else min(hi, order.shape[-1] + 1)
    choice = torch.randint(lo - 1, hi - 1, (order.shape[0],), generator=generator)
    return order[torch.arange(order.shape[0]), choice.to(order.device)]


@torch.no_grad()
def run_install_experiment(
    model: Any,
    layer: int,
    head: int,
    contexts: Tensor,
    *,
    strata: Mapping[str, tuple[int, int | None]] = DEFAULT_STRATA,
    targets: Tensor | None = None,
    multipliers: Sequence[float] = (1.5, 3.0, 6.0),
    n_positions: int = 3,
    key: Key = "native",
    mode: Literal["add", "replace"] = "add",
    max_new_tokens: int = 20,
    batch_size: int = 16,
    seed: int = 0,
    progress: bool = True,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Sustained installs over ``contexts`` (``[n, pos]``): per context one target per stratum
    (ranks under the unmodified model at the first generated step), or the given ``targets``
    (``[n]``, stratum ``"given"``); every multiplier. One row per (context, stratum, m)."""
    site = resolve_site(model, None, layer, head)
    generator = torch.Generator().manual_seed(seed)
    rows: list[dict[str, Any]] = []
    plan = {"given": None} if targets is not None else dict(strata)
    bar = tqdm(total=len(contexts) * len(plan) * len(multipliers), disable=not progress, desc="installs")
    for start in range(0, len(contexts), batch_size):
        batch = contexts[start : start + batch_size].to(model.cfg.device)
        last = model(batch)[:, -1]
        for stratum, bounds in plan.items():
            chosen = targets[start : start + batch_size] if bounds is None else pick_targets(last, *bounds, generator)
            for m in multipliers:
                out = sustained_install(model, site.layer, site.head, batch, chosen, m, n_positions=n_positions,
                                        key=key, mode=mode, max_new_tokens=max_new_tokens, seed=seed)
                for i in range(len(batch)):
                    rows.append(dict(
                        context=start + i, stratum=stratum, multiplier=float(m), target=int(chosen[i]),
                        included_base=bool(out["included_base"][i]), included=bool(out["included"][i]),
                        logp_base=float(out["logp_base"][i]), logp=float(out["logp"][i]),
                        logprob_lift=float(out["logp"][i] - out["logp_base"][i]),
                        rank_base=int(out["rank_base"][i]), rank=int(out["rank"][i]),
                    ))
                bar.update(len(batch))
    bar.close()
    return rows, summarize_installs(rows)


def summarize_installs(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per stratum and multiplier (and pooled): inclusion rates with and without the install
    (Wilson CIs), median first-step log-prob lift, fraction of trials whose first-step rank improved."""
    groups: dict[str, dict[float, list]] = {}
    for r in rows:
        groups.setdefault(r["stratum"], {}).setdefault(r["multiplier"], []).append(r)
        groups.setdefault("pooled", {}).setdefault(r["multiplier"], []).append(r)
    out: dict[str, Any] = {"strata": {}}
    for stratum, by_m in groups.items():
        out["strata"][stratum] = {}
        for m, rs in by_m.items():
            n = len(rs)
            base = sum(r["included_base"] for r in rs)
            inc = sum(r["included"] for r in rs)
            out["strata"][stratum][m] = dict(
                n=n, base_inclusion=base / n, base_ci=wilson_interval(base, n), install_inclusion=inc / n,
                install_ci=wilson_interval(inc, n), median_logprob_lift=float(np.median([r["logprob_lift"] for r in rs])),
                rank_improved=float(np.mean([r["rank"] < r["rank_base"] for r in rs])),
            )
    return out


@torch.no_grad()
def run_sign_prediction(
    model: Any,
    layer: int,
    head: int,
    tokens: Tensor | Sequence[Tensor],
    *,
    n_trials_per_prompt: int = 8,
    rank_range: tuple[int, int] = (2, 1000),
    lag: int = 0,
    magnitude: float = 1.0,
    key: Key = "native",
    min_position: int = 1,
    batch_size: int = 8,
    max_rows: int = 64,
    seed: int = 0,
    progress: bool = True,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Single-position writes: per trial a prompt, a position ``t0``, a target ``T`` (drawn among the
    tokens ranked ``rank_range`` at ``t0 + lag`` under the unmodified model) and the write
    ``magnitude * ||D_nat(t0)||_F * u w*_T^T`` added at ``t0``. The predicted sign of the change of
    ``T``'s logit at ``t0 + lag`` is ``sign(u . q_{t0+lag})``; the predicted size is the gate form.

    Summary: sign accuracy (Wilson CI), Pearson r and pooled R^2 of predicted vs measured, median
    measured / predicted ratio."""
    site = resolve_site(model, None, layer, head)
    prompts = as_prompt_list(tokens)
    generator = torch.Generator().manual_seed(seed)
    readout = readout_matrix(model, site.layer, site.head)
    rows: list[dict[str, Any]] = []
    bar = tqdm(total=len(prompts) * n_trials_per_prompt, disable=not progress, desc="sign prediction")
    for ids, batch in prompt_batches(prompts, batch_size):
        seen = observe_site(model, batch, site, leaves=("hook_q", "hook_k", "hook_decay"))
        length = batch.shape[1]
        plan: dict[int, list[tuple[int, int]]] = {}
        for row in range(len(ids)):
            for t0 in torch.randint(min_position, length - lag, (n_trials_per_prompt,), generator=generator).tolist():
                order = seen["logits"][row, t0 + lag].argsort(descending=True)
                hi = min(rank_range[1], order.numel() + 1)
                rank = int(torch.randint(rank_range[0] - 1, hi - 1, (1,), generator=generator))
                plan.setdefault(t0, []).append((row, int(order[rank])))
        for t0, state in prefix_states(model, batch, plan):
            members = plan[t0]
            for c0 in range(0, len(members), max_rows):
                chunk = members[c0 : c0 + max_rows]
                rows_idx = torch.tensor([r for r, _ in chunk])
                tgt = torch.tensor([tok for _, tok in chunk])
                w_star = target_directions(model, site.layer, site.head, tgt).cpu()
                u = _key_vectors(key, seen["hook_k"][rows_idx, t0], seen["hook_q"][rows_idx, t0], generator).cpu()
                s = magnitude * seen["write_norm"][rows_idx, t0].cpu()
                deltas = (s[:, None, None] * u[:, :, None] * w_star[:, None, :]).flatten(1)
                logits = branch_logits(model, site, batch, state, rows_idx, t0, t0 + lag,
                                       write_addition_hook(site.head, 0, deltas), positions=[t0 + lag])
                measured = (logits[:, 0].cpu() - seen["logits"][rows_idx, t0 + lag].cpu())[torch.arange(len(chunk)), tgt]
                for i, (row, token) in enumerate(chunk):
                    q_t = seen["hook_q"][row, t0 + lag].float().cpu()
                    uq = float(u[i] @ q_t)
                    G = float(gate_products(seen["hook_decay"][row].clamp_min(1e-30).log(), t0, [t0 + lag])[0])
                    predicted = float(s[i]) * G * uq * float(readout[:, token].norm())
                    rows.append(dict(prompt=ids[row], t0=t0, lag=lag, target=token, predicted=predicted,
                                     measured=float(measured[i]), sign_correct=bool(np.sign(predicted) == np.sign(float(measured[i])))))
                bar.update(len(chunk))
    bar.close()
    return rows, summarize_sign_prediction(rows)


def summarize_sign_prediction(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    n = len(rows)
    if n == 0:
        return {"n": 0}
    correct = sum(r["sign_correct"] for r in rows)
    pred = np.array([r["predicted"] for r in rows])
    meas = np.array([r["measured"] for r in rows])
    ok = pred != 0
    return dict(
        n=n, sign_accuracy=correct / n, sign_ci=wilson_interval(correct, n),
        pearson_r=float(np.corrcoef(pred, meas)[0, 1]) if n > 1 else float("nan"),
        pooled_r2=r_squared(meas, pred), median_ratio=float(np.median(meas[ok] / pred[ok])) if ok.any() else float("nan"),
    )


__all__ = [
    "DEFAULT_STRATA",
    "target_directions",
    "install_hook",
    "sustained_install",
    "pick_targets",
    "run_install_experiment",
    "summarize_installs",
    "run_sign_prediction",
    "summarize_sign_prediction",
    "format_steering_table",
]
