"""The closed-form logit shift of a rank-1 state perturbation (paper Eq. 1 and App. A; METHOD.md section 5).

Add ``eps * u w^T`` to head ``h``'s state at position ``t0`` (``u`` key side, ``w`` value side, both
unit norm; paper App. A writes the same atom ``v_i w_i^T`` with its ``w_i`` = our ``u`` and its
``v_i`` = our ``w``). For Gated DeltaNet the perturbation evolves as
``dS_s = a_s (I - b_s k_s k_s^T) dS_{s-1}``; dropping the erase term,
``dS_t ~ eps G(t0->t) u w^T`` with ``G(t0->t) = prod_{s=t0+1..t} a_s``, the read moves by
``do_t = eps G (u . q_t) w`` and, to first order, the logit of ``tok`` at ``t`` by

    d logit_tok(t) ~ eps * G(t0->t) * (u . q_t) * <J(t) W_O[h]^T w, W_U[:, tok]>.

Three forms are offered (``forms=``):

- ``"gate"``: ``J`` = identity, i.e. ``eps G (u . q_t) (w . W_O[h] W_U[:, tok])`` with
  ``W_O[h]`` the head's ``[d_v, d_model]`` slice of the output projection. No fitted parameter.
  What it ignores: the erase terms ``b_s k_s k_s^T`` after ``t0``; the head's **gated RMSNorm**
  (``y = g * o / rms(o) * silu(z)``: the per-channel scale ``g * silu(z_t) / rms(o_t)`` and the
  removal of the component of ``do`` along ``o_t``); the residual path through the MLP and every
  later layer (later Gated DeltaNet layers, attention); and the **final RMSNorm** (its
  ``1 / rms`` and its ``1 + w`` weight, and the component along the residual). It is exact when
  those are linear identities (see the tests, which linearise them with hooks).
- ``"fitted"`` (the paper's App. A): the gate prediction times one least-squares scalar per
  ``(prompt, atom, eval token)``, fitted over that group's eval positions and eps values
  (an in-sample fit, as the paper's "empirical G").
- ``"jvp"`` (beyond the paper): the exact first-order term ``eps * d logit / d eps`` at ``eps = 0``,
  by forward-mode autodiff through the rest of the model (one dual pass per ``(prompt, atom)``).

Everything the gate form needs (``q_t``, ``a_s``, native write norms, base logits, SAE codes) comes
from one cached forward per batch of prompts; measured shifts reuse the unpatched prefix with a
``RecurrentState`` as the substitution test does.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
import torch.autograd.forward_ad as fwAD
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from hooked_ssm.state import RecurrentState
from writesae_lens.analysis.report import format_logit_shift_table
from writesae_lens.analysis.stats import r_squared
from writesae_lens.interventions.firings import (
    as_prompt_list,
    branch_logits,
    continue_run,
    observe_site,
    prompt_batches,
    resolve_site,
    select_rows,
    unit_factors,
    write_addition_hook,
)
from writesae_lens.sae_checks import check_atoms

FORMS: tuple[str, ...] = ("gate", "fitted", "jvp")
Hooks = Sequence[tuple[str, Callable]]


# ---------------------------------------------------------------- the closed form itself
def readout_matrix(model: Any, layer: int, head: int) -> Float[Tensor, "d_v d_vocab"]:
    """``W_O[h] W_U``: the logit direction of each value-side unit vector when ``J`` = identity."""
    return (model.W_O[layer][head].float() @ model.W_U.float()).detach()


def gate_products(log_decay: Float[Tensor, "... pos"], t0: int, positions: Sequence[int]) -> Tensor:
    """``G(t0 -> t) = prod_{s=t0+1..t} a_s`` for each ``t`` in ``positions`` (``t >= t0``)."""
    cum = torch.cumsum(log_decay.double(), dim=-1)
    idx = torch.tensor(list(positions), device=log_decay.device)
    return (cum[..., idx] - cum[..., t0 : t0 + 1]).exp()


def closed_form_gate(
    q: Float[Tensor, "pos d_k"],
    log_decay: Float[Tensor, "pos"],
    readout: Float[Tensor, "d_v d_vocab"],
    u: Float[Tensor, "atom d_k"],
    w: Float[Tensor, "atom d_v"],
    t0: int,
    positions: Sequence[int],
    tokens: Tensor,
) -> Float[Tensor, "atom n_pos n_tok"]:
    """The gate form per unit eps: ``G(t0->t) (u . q_t) (w . W_O[h] W_U[:, tok])``.

    ``tokens`` is ``[n_pos, n_tok]`` (the eval tokens at each position) or ``[n_tok]`` (the same
    tokens at every position). One prompt; many atoms, positions and tokens at once.
    """
    idx = torch.tensor(list(positions), device=q.device)
    gate = gate_products(log_decay, t0, positions).float().to(q.device)  # [n_pos]
    u, w = u.to(q.device), w.to(readout.device)
    uq = u.float() @ q[idx].float().T  # [atom, n_pos]
    tok = tokens if tokens.dim() == 2 else tokens.expand(len(positions), -1)
    wr = w.float() @ readout  # [atom, vocab]
    return (gate * uq)[..., None] * wr[:, tok.to(wr.device)]  # [atom, n_pos, n_tok]


# ---------------------------------------------------------------- measured and jvp shifts
def _measured_shifts(model, site, batch, state, rows, t0, end, deltas, extra_hooks):
    """Logits over ``t0..end`` for ``rows`` of ``state`` with ``deltas`` added to the write at ``t0``."""
    hook = write_addition_hook(site.head, 0, deltas)
    return branch_logits(model, site, batch, state, rows, t0, end, hook, extra_hooks)


def _jvp_shifts(model, site, batch, state, rows, t0, end, u, w, q_t0, extra_hooks):
    """``d logits[t0..end] / d eps`` for ``eps * u w^T`` added to the state at ``t0`` (one row each).

    The read at ``t0`` gets the tangent ``(u . q_t0) w`` (the read ``S_t0^T q_t0`` happens after the
    update, so it sees the perturbation); the layer's carried state after ``t0`` gets the tangent
    ``u w^T``; forward-mode autodiff carries both through every later position and layer.
    """
    branch = select_rows(state, rows)
    suffix = batch[rows, t0 : end + 1]
    head = site.head
    read_tangent = (u * q_t0).sum(-1, keepdim=True) * w  # [rows, d_v]

    def read_hook(act: Tensor, hook: Any) -> Tensor:
        tangent = torch.zeros_like(act)
        tangent[:, 0, head] = read_tangent.to(act)
        return fwAD.make_dual(act, tangent)

    with fwAD.dual_level():
        # The tangent goes in first, so that extra hooks on hook_read see (and pass on) the dual read.
        first = continue_run(model, suffix[:, :1], branch, [(site.mixer_hook("hook_read"), read_hook), *extra_hooks])
        cache = branch.layers[site.layer]
        primal, tangent = fwAD.unpack_dual(cache.ssm_state)
        tangent = torch.zeros_like(primal) if tangent is None else tangent.clone()
        tangent[:, head] += (u[:, :, None] * w[:, None, :]).to(tangent)
        cache.ssm_state = fwAD.make_dual(primal, tangent)
        rest = continue_run(model, suffix[:, 1:], branch, extra_hooks)
        parts = [first] if rest is None else [first, rest]
        tangents = []
        for part in parts:
            t = fwAD.unpack_dual(part).tangent
            tangents.append(torch.zeros_like(fwAD.unpack_dual(part).primal) if t is None else t)
    return torch.cat(tangents, dim=1).detach()


def _choose_atoms(codes: Iterable[Tensor], n_atoms: int) -> list[int]:
    """The ``n_atoms`` atoms that fire in the most prompts (ties: lower index)."""
    fires = sum((c > 0).any(dim=1).sum(dim=0) for c in codes)  # [d_sae]: prompts where each atom fires
    order = sorted(range(fires.numel()), key=lambda i: (-int(fires[i]), i))
    return [i for i in order[:n_atoms] if fires[i] > 0]


@torch.no_grad()
def run_logit_shift_audit(
    model: Any,
    sae: Any = None,
    layer: int | None = None,
    head: int | None = None,
    tokens: Tensor | Sequence[Tensor] | None = None,
    *,
    atoms: Iterable[int] | None = None,
    factors: tuple[Tensor, Tensor] | None = None,
    n_atoms: int = 50,
    t0: int | Literal["firing"] = "firing",
    eps: Sequence[float] = (0.1, 0.3, 1.0, 3.0),
    eps_unit: Literal["native_norm", "absolute"] = "native_norm",
    horizon: int = 4,
    token_ranks: Sequence[int] = (0,),
    forms: Sequence[str] = FORMS,
    max_prompts_per_atom: int | None = None,
    batch_size: int = 8,
    max_rows: int = 64,
    extra_hooks: Hooks = (),
    progress: bool = True,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Measured vs closed-form logit shifts for many ``(prompt, atom, eps, position, token)``.

    Args:
        sae: a rank-1 SAE whose atoms ``(u_i, w_i)`` are the perturbation directions; or pass
            ``factors=(u [n, d_k], w [n, d_v])`` (any directions; normalised here) and ``layer``/``head``.
        atoms: SAE atoms to audit; default the ``n_atoms`` that fire in the most prompts.
        t0: ``"firing"``: per (prompt, atom), the position of the atom's largest code in that
            prompt (prompts where it never fires are skipped; needs an SAE); or a fixed position.
        eps: perturbation sizes; ``eps_unit="native_norm"`` (default) multiplies each by the
            Frobenius norm of the native write at ``(prompt, t0)``, ``"absolute"`` uses them as is.
        horizon: eval positions are ``t0 .. t0 + horizon`` (clipped at the end of the prompt).
        token_ranks: eval tokens at each position, by rank under the unperturbed model (0 = top-1).
        forms: any of ``"gate"``, ``"fitted"``, ``"jvp"`` (the fitted form needs the gate form).
        extra_hooks: hooks live in every pass (base, measured, jvp), e.g. to force ``b_s = 0``;
            positions inside a hook are relative to the call: add ``model.current_position_offset``.

    Returns:
        ``(records, summary)``: one record per (prompt, atom, eps, position, token) with
        ``measured`` and one column per form, and :func:`summarize_logit_shift` of them.
    """
    if tokens is None:
        raise ValueError("Pass tokens=.")
    forms = tuple(forms)
    if "fitted" in forms and "gate" not in forms:
        forms = ("gate", *forms)
    site = resolve_site(model, sae, layer, head)
    prompts = as_prompt_list(tokens)
    readout = readout_matrix(model, site.layer, site.head)
    if factors is not None:
        u_all = factors[0].float() / factors[0].float().norm(dim=-1, keepdim=True)
        w_all = factors[1].float() / factors[1].float().norm(dim=-1, keepdim=True)
        atom_ids = list(range(u_all.shape[0])) if atoms is None else [int(a) for a in atoms]
    elif sae is not None:
        atom_ids = None if atoms is None else check_atoms(sae, [int(a) for a in atoms], "atoms")
    else:
        raise ValueError("Pass an SAE or factors=(u, w).")
    if t0 == "firing" and sae is None:
        raise ValueError("t0='firing' needs an SAE; pass an integer t0 with factors=.")

    if atom_ids is None:  # a first, light pass (codes only) to rank the atoms by how often they fire
        atom_ids = _choose_atoms(
            [observe_site(model, batch, site, sae, logits=False, extra_hooks=extra_hooks)["codes"]
             for _, batch in prompt_batches(prompts, batch_size)],
            n_atoms,
        )
    if factors is None:
        u_all, w_all = (x.float().cpu() for x in unit_factors(sae, torch.arange(sae.cfg.d_sae)))
    device = torch.device(model.cfg.device)
    u_sel, w_sel = u_all[atom_ids].to(device), w_all[atom_ids].to(device)

    records: list[dict[str, Any]] = []
    per_atom_prompts: dict[int, int] = {a: 0 for a in atom_ids}
    bar = tqdm(total=len(prompts), disable=not progress, desc=f"logit shift L{site.layer}H{site.head}")
    eps_t = torch.tensor(list(eps), dtype=torch.float32)
    for ids, batch in prompt_batches(prompts, batch_size):
        # One observing pass per batch: q, decay, write norms, codes, base logits.
        seen = observe_site(model, batch, site, sae if t0 == "firing" else None,
                            leaves=("hook_q", "hook_decay"), extra_hooks=extra_hooks)
        length = batch.shape[1]
        # (row, atom slot) pairs grouped by t0.
        by_t0: dict[int, list[tuple[int, int]]] = {}
        for row in range(len(ids)):
            for slot, atom in enumerate(atom_ids):
                if t0 == "firing":
                    code = seen["codes"][row, :, atom]
                    if code.max() <= 0:
                        continue
                    start = int(code.argmax())
                else:
                    start = int(t0) if int(t0) >= 0 else length + int(t0)
                if max_prompts_per_atom is not None and per_atom_prompts[atom] >= max_prompts_per_atom:
                    continue
                per_atom_prompts[atom] += 1
                by_t0.setdefault(start, []).append((row, slot))
        state = RecurrentState.empty(model.cfg.layer_types)
        done = 0
        for start in sorted(by_t0):
            continue_run(model, batch[:, done:start], state, extra_hooks, return_type=None)
            done = start
            end = min(start + horizon, length - 1)
            positions = list(range(start, end + 1))
            pairs = by_t0[start]
            per_chunk = max(1, max_rows // len(eps))
            for c0 in range(0, len(pairs), per_chunk):
                chunk = pairs[c0 : c0 + per_chunk]
                rows = torch.tensor([r for r, _ in chunk])
                slots = torch.tensor([s for _, s in chunk])
                base = seen["logits"][rows][:, positions]  # [n, n_pos, vocab]
                eval_tokens = base.argsort(dim=-1, descending=True)[..., list(token_ranks)]  # [n, n_pos, n_rank]
                scale = seen["write_norm"][rows, start].cpu() if eps_unit == "native_norm" else torch.ones(len(chunk))
                eps_abs = scale.float()[:, None] * eps_t[None, :]  # [n, n_eps]
                u, w = u_sel[slots.to(device)], w_sel[slots.to(device)]
                atom_mats = (u[:, :, None] * w[:, None, :]).flatten(1).cpu()  # [n, dk*dv]
                deltas = (eps_abs[:, :, None] * atom_mats[:, None, :]).flatten(0, 1)
                rep = rows.repeat_interleave(len(eps))
                logits = _measured_shifts(model, site, batch, state, rep, start, end, deltas, extra_hooks)
                logits = logits.view(len(chunk), len(eps), len(positions), -1)
                gathered = logits.gather(-1, eval_tokens[:, None].expand(-1, len(eps), -1, -1).to(logits.device))
                base_vals = base.gather(-1, eval_tokens)[:, None]
                measured = (gathered - base_vals).double().cpu()  # [n, n_eps, n_pos, n_rank]
                gate = jvp = None
                if "gate" in forms:
                    gate = torch.stack([
                        closed_form_gate(seen["hook_q"][r], seen["hook_decay"][r].clamp_min(1e-30).log(), readout,
                                         u[i : i + 1], w[i : i + 1], start, positions, eval_tokens[i])[0]
                        for i, r in enumerate(rows.tolist())
                    ]).double().cpu()  # [n, n_pos, n_rank]
                if "jvp" in forms:
                    q_t0 = seen["hook_q"][rows, start].float()
                    tangent = _jvp_shifts(model, site, batch, state, rows, start, end, u, w, q_t0, extra_hooks)
                    jvp = tangent.gather(-1, eval_tokens.to(tangent.device)).double().cpu()  # [n, n_pos, n_rank]
                for i, (row, slot) in enumerate(chunk):
                    G = gate_products(seen["hook_decay"][row].clamp_min(1e-30).log(), start, positions).tolist()
                    for e, eps_value in enumerate(eps):
                        for p, pos in enumerate(positions):
                            for k, rank in enumerate(token_ranks):
                                rec = dict(
                                    prompt=ids[row], atom=atom_ids[slot], layer=site.layer, head=site.head,
                                    t0=start, t=pos, lag=pos - start, eps=float(eps_value),
                                    eps_abs=float(eps_abs[i, e]), rank=int(rank), token=int(eval_tokens[i, p, k]),
                                    gate_product=float(G[p]), measured=float(measured[i, e, p, k]),
                                )
                                if gate is not None:
                                    rec["gate"] = float(eps_abs[i, e]) * float(gate[i, p, k])
                                if jvp is not None:
                                    rec["jvp"] = float(eps_abs[i, e]) * float(jvp[i, p, k])
                                records.append(rec)
        bar.update(len(ids))
    bar.close()
    if "fitted" in forms:
        add_fitted_form(records)
    summary = summarize_logit_shift(records, forms)
    summary["config"] = dict(layer=site.layer, head=site.head, eps=list(eps), eps_unit=eps_unit, horizon=horizon,
                             token_ranks=list(token_ranks), t0=t0, n_atoms=len(atom_ids))
    return records, summary


def add_fitted_form(records: list[dict[str, Any]], group_by: Sequence[str] = ("prompt", "atom", "token")) -> None:
    """The paper's fitted form: ``fitted = c * gate`` with one least-squares ``c`` per group
    (default ``(prompt, atom, eval token)``), pooled over that group's positions and eps values."""
    sums: dict[tuple, list[float]] = {}
    for r in records:
        key = tuple(r[g] for g in group_by)
        acc = sums.setdefault(key, [0.0, 0.0])
        acc[0] += r["gate"] * r["measured"]
        acc[1] += r["gate"] * r["gate"]
    for r in records:
        xy, xx = sums[tuple(r[g] for g in group_by)]
        r["fitted"] = (xy / xx) * r["gate"] if xx > 0 else 0.0


def summarize_logit_shift(records: Sequence[Mapping[str, Any]], forms: Sequence[str] = FORMS) -> dict[str, Any]:
    """R^2 of each form against the measured shifts: pooled, per atom (median, IQR), per eps, per lag."""
    summary: dict[str, Any] = {"n": len(records), "forms": {}}
    if not records:
        return summary
    y = np.array([r["measured"] for r in records])
    atoms = np.array([r["atom"] for r in records])
    eps = np.array([r["eps"] for r in records])
    lags = np.array([r["lag"] for r in records])
    for form in forms:
        if form not in records[0]:
            continue
        f = np.array([r[form] for r in records])
        per_atom = [r_squared(y[atoms == a], f[atoms == a]) for a in np.unique(atoms)]
        stats: dict[str, Any] = dict(
            pooled_r2=r_squared(y, f),
            # Scale-free companion of R^2: the gate form can point the right way at the wrong size.
            pearson_r=float(np.corrcoef(y, f)[0, 1]) if y.size > 1 and f.std() > 0 and y.std() > 0 else math.nan,
            median_atom_r2=float(np.median(per_atom)),
            atom_r2_iqr=(float(np.quantile(per_atom, 0.25)), float(np.quantile(per_atom, 0.75))),
            n_atoms=len(per_atom),
            by_eps={},
            by_lag={int(l): r_squared(y[lags == l], f[lags == l]) for l in np.unique(lags)},
        )
        for e in np.unique(eps):
            sel = eps == e
            cells = [r_squared(y[sel & (atoms == a)], f[sel & (atoms == a)]) for a in np.unique(atoms[sel])]
            stats["by_eps"][float(e)] = dict(pooled_r2=r_squared(y[sel], f[sel]), median_atom_r2=float(np.median(cells)))
        summary["forms"][form] = stats
    summary["median_abs_measured"] = float(np.median(np.abs(y)))
    return summary


__all__ = [
    "FORMS",
    "readout_matrix",
    "gate_products",
    "closed_form_gate",
    "run_logit_shift_audit",
    "add_fitted_form",
    "summarize_logit_shift",
    "format_logit_shift_table",
]
