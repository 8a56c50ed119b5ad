"""The closed-form logit shift of a rank-1 state perturbation (paper Eq. 1 and App. A; METHOD.md section 5).

Add ``eps * u w^T`` to head ``h``'s state at position ``t0`` (``u`` key side, ``w`` value side, both
unit norm; paper App. A writes the same atom ``v_i w_i^T`` with its ``w_i`` = our ``u`` and its
``v_i`` = our ``w``). For Gated DeltaNet the perturbation evolves as
``dS_s = a_s (I - b_s k_s k_s^T) dS_{s-1}``; dropping the erase term,
``dS_t ~ eps G(t0->t) u w^T`` with ``G(t0->t) = prod_{s=t0+1..t} a_s``, the read moves by
``do_t = eps G (u . q_t) w`` and, to first order, the logit of ``tok`` at ``t`` by

    d logit_tok(t) ~ eps * G(t0->t) * (u . q_t) * <J(t) W_O[h]^T w, W_U[:, tok]>.

Where the decay is per key channel (RWKV-7, Kimi Delta Attention) ``G`` is the diagonal matrix
``prod_s diag(a_s)``: ``dS_t ~ eps diag(G) u w^T`` and ``G (u . q_t)`` becomes ``u . (G * q_t)``, with
each channel's own product (records carry ``gate_product = u^T diag(G) u``, the atom's gate).

Three forms are offered (``forms=``):

- ``"gate"``: ``J`` = identity, i.e. ``eps G (u . q_t) (w . W_O[h] W_U[:, tok])`` with
  ``W_O[h]`` the head's ``[d_v, d_model]`` slice of the output projection. No fitted parameter.
  What it ignores: the erase terms ``b_s k_s k_s^T`` after ``t0``; the head's **gated RMSNorm**
  (``y = g * o / rms(o) * silu(z)``: the per-channel scale ``g * silu(z_t) / rms(o_t)`` and the
  removal of the component of ``do`` along ``o_t``); the residual path through the MLP and every
  later layer (later Gated DeltaNet layers, attention); and the **final RMSNorm** (its
  ``1 / rms`` and its ``1 + w`` weight, and the component along the residual). It is exact when
  those are linear identities (see the tests, which linearise them with hooks).
- ``"jvp"`` (beyond the paper): the exact first-order term ``eps * d logit / d eps`` at ``eps = 0``,
  by forward-mode autodiff through the rest of the model (a dual edit on the engine).
- ``"fitted"`` (the paper's App. A): the gate prediction times one least-squares scalar per
  ``(prompt, atom, eval token)``, fitted over that group's eval positions and eps values (an
  in-sample fit, as the paper's "empirical G"). With few positions per group this fit is nearly
  tautological (AUDIT item 6: pure noise times eps scores 0.93), so it is reported only beside
  ``fitted_null``: the same fit applied to a seeded Gaussian-noise "prediction" times eps.

R^2 is reported as the paper does: per ``(atom, eps)`` cell (all prompts, positions and tokens of
that cell), then the median (and IQR) over cells (docs/method.md, "Closed-form logit shift").

Measured shifts and the jvp run on the :class:`InterventionEngine` (``add_to_state`` edits at
``t0``, scored at ``t0 .. t0 + horizon``); the gate form's inputs (``q_t``, ``a_s``, native write
norms, SAE codes) come from one observing forward per batch of prompts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
import torch.autograd.forward_ad as fwAD
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from writesae_lens.analysis.stats import r_squared
from writesae_lens.interventions.atoms import unit_factors
from writesae_lens.interventions.engine import (
    Branch,
    InterventionEngine,
    LogitShift,
    Tangent,
    add_to_state,
    as_prompt_list,
    prompt_batches,
)
from writesae_lens.interventions.observe import observe_site
from writesae_lens.interventions.sites import resolve_site
from writesae_lens.sae_checks import check_atoms

if TYPE_CHECKING:
    from sae_lens import SAE

    from hooked_ssm import HookedSSM

FORMS: tuple[str, ...] = ("gate", "jvp", "fitted")
Hooks = Sequence[tuple[str, Callable]]
Record = dict[str, float | int]


# ---------------------------------------------------------------- the closed form itself
def readout_matrix(model: HookedSSM, layer: int, head: int) -> Float[Tensor, "d_v d_vocab"]:
    """``W_O[h] W_U``: the logit direction of each value-side unit vector when ``J`` = identity."""
    return (model.W_O[layer][head].float() @ model.W_U.float()).detach()


def gate_products(
    log_decay: Float[Tensor, "pos"] | Float[Tensor, "pos d_k"], t0: int, positions: Sequence[int]
) -> Float[Tensor, "n_pos"] | Float[Tensor, "n_pos d_k"]:
    """``G(t0 -> t) = prod_{s=t0+1..t} a_s`` for each ``t`` in ``positions`` (``t >= t0``).

    A per-head decay ``[pos]`` gives ``[n_pos]``; a per-key-channel decay ``[pos, d_k]`` (RWKV-7, Kimi
    Delta Attention: ``a_s`` is ``diag(a_s)``) gives ``[n_pos, d_k]``, one product per key channel.
    """
    cum = torch.cumsum(log_decay.double(), dim=0)
    idx = torch.tensor(list(positions), device=log_decay.device)
    return (cum[idx] - cum[t0 : t0 + 1]).exp()


def closed_form_gate(
    q: Float[Tensor, "pos d_k"],
    log_decay: Float[Tensor, "pos"] | Float[Tensor, "pos d_k"],
    readout: Float[Tensor, "d_v d_vocab"],
    u: Float[Tensor, "atom d_k"],
    w: Float[Tensor, "atom d_v"],
    t0: int,
    positions: Sequence[int],
    tokens: Tensor,
) -> Float[Tensor, "atom n_pos n_tok"]:
    """The gate form per unit eps: ``G(t0->t) (u . q_t) (w . W_O[h] W_U[:, tok])``.

    With a per-key-channel decay (``log_decay`` ``[pos, d_k]``) the perturbation decays as
    ``diag(G) u w^T``, so the key-side factor is ``u . (G_t * q_t)``: each channel of ``u`` keeps its
    own product, none is summed or averaged over d_k.

    ``tokens`` is ``[n_pos, n_tok]`` (the eval tokens at each position) or ``[n_tok]`` (the same
    tokens at every position). One prompt; many atoms, positions and tokens at once.
    """
    idx = torch.tensor(list(positions), device=q.device)
    gate = gate_products(log_decay, t0, positions).float().to(q.device)  # [n_pos] or [n_pos, d_k]
    u, w = u.to(q.device), w.to(readout.device)
    q_sel = q[idx].float()
    if gate.dim() == 2:
        guq = u.float() @ (gate * q_sel).T  # [atom, n_pos]: u . (G_t * q_t)
    else:
        guq = gate * (u.float() @ q_sel.T)
    tok = tokens if tokens.dim() == 2 else tokens.expand(len(positions), -1)
    wr = w.float() @ readout  # [atom, vocab]
    return guq[..., None] * wr[:, tok.to(wr.device)]  # [atom, n_pos, n_tok]


# ---------------------------------------------------------------- the audit
@dataclass
class _Perturbation:
    """One (prompt, atom) perturbed at ``t0`` and read over ``t0 .. end`` at each eps."""

    prompt: int
    atom: int
    slot: int
    t0: int
    end: int
    eps_abs: list[float]

    @property
    def positions(self) -> list[int]:
        return list(range(self.t0, self.end + 1))


def _choose_atoms(codes: Iterable[Tensor], n_atoms: int) -> list[int]:
    """The ``n_atoms`` atoms that fire in the most prompts (ties: lower index)."""
    fires = sum((c > 0).any(dim=1).sum(dim=0) for c in codes)  # [d_sae]: prompts where each atom fires
    order = sorted(range(fires.numel()), key=lambda i: (-int(fires[i]), i))
    return [i for i in order[:n_atoms] if fires[i] > 0]


def _plan(model, site, sae, prompts, atom_ids, t0, eps, eps_unit, horizon, max_prompts_per_atom, batch_size,
          extra_hooks):
    """Observe every prompt once (q, decay, write norms, codes) and list the perturbations."""
    plans: list[_Perturbation] = []
    seen_by_prompt: dict[int, dict[str, Tensor]] = {}
    per_atom = {a: 0 for a in atom_ids}
    for ids, batch in prompt_batches(prompts, batch_size):
        seen = observe_site(model, batch, site, sae if t0 == "firing" else None, leaves=("hook_q", "hook_decay"),
                            logits=False, extra_hooks=extra_hooks)
        length = batch.shape[1]
        for row, prompt in enumerate(ids):
            seen_by_prompt[prompt] = {k: seen[k][row].cpu() for k in ("hook_q", "hook_decay", "write_norm")}
            for slot, atom in enumerate(atom_ids):
                if t0 == "firing":
                    code = seen["codes"][row, :, atom]
                    if code.max() <= 0:
                        continue
                    start = int(code.argmax())
                else:
                    start = int(t0) if int(t0) >= 0 else length + int(t0)
                if max_prompts_per_atom is not None and per_atom[atom] >= max_prompts_per_atom:
                    continue
                per_atom[atom] += 1
                scale = float(seen["write_norm"][row, start]) if eps_unit == "native_norm" else 1.0
                plans.append(_Perturbation(prompt, atom, slot, start, min(start + horizon, length - 1),
                                           [scale * float(e) for e in eps]))
    return plans, seen_by_prompt


@torch.no_grad()
def run_logit_shift_audit(
    model: HookedSSM,
    sae: SAE | None = None,
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
    max_rows: int | None = None,
    extra_hooks: Hooks = (),
    seed: int = 0,
    progress: bool = True,
) -> tuple[list[Record], dict[str, object]]:
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
        forms: any of ``"gate"``, ``"jvp"``, ``"fitted"`` (the fitted form needs the gate form and
            comes with its ``fitted_null`` baseline).
        extra_hooks: hooks live in every pass (observing, measured, jvp), e.g. to force ``b_s = 0``;
            positions inside a hook are relative to the call: add ``model.current_position_offset``.

    Returns:
        ``(records, summary)``: one record per (prompt, atom, eps, position, token) with
        ``measured`` and one column per form, and :func:`summarize_logit_shift` of them.
    """
    if tokens is None:
        raise ValueError("Pass tokens=.")
    forms = tuple(forms)
    unknown = set(forms) - set(FORMS)
    if unknown:
        raise ValueError(f"Unknown forms {sorted(unknown)}; choose from {FORMS}.")
    if "fitted" in forms and "gate" not in forms:
        forms = ("gate", *forms)
    if t0 == "firing" and sae is None:
        raise ValueError("t0='firing' needs an SAE; pass an integer t0 with factors=.")
    site = resolve_site(model, sae, layer, head)
    prompts = as_prompt_list(tokens)
    if factors is not None:
        u_all = factors[0].float() / factors[0].float().norm(dim=-1, keepdim=True)
        w_all = factors[1].float() / factors[1].float().norm(dim=-1, keepdim=True)
        atom_ids = list(range(u_all.shape[0])) if atoms is None else [int(a) for a in atoms]
    elif sae is not None:
        u_all, w_all = (x.float().cpu() for x in unit_factors(sae, torch.arange(sae.cfg.d_sae)))
        atom_ids = None if atoms is None else check_atoms(sae, [int(a) for a in atoms], "atoms")
    else:
        raise ValueError("Pass an SAE or factors=(u, w).")
    if atom_ids is None:  # a light first pass (codes only) ranks the atoms by how often they fire
        atom_ids = _choose_atoms([observe_site(model, batch, site, sae, logits=False, extra_hooks=extra_hooks)["codes"]
                                  for _, batch in prompt_batches(prompts, batch_size)], n_atoms)
    u_sel, w_sel = u_all[atom_ids].cpu(), w_all[atom_ids].cpu()
    plans, seen = _plan(model, site, sae, prompts, atom_ids, t0, eps, eps_unit, horizon, max_prompts_per_atom,
                        batch_size, extra_hooks)
    atom_matrix = [torch.outer(u_sel[p.slot], w_sel[p.slot]) for p in plans]
    engine = InterventionEngine(model, max_rows=max_rows, extra_hooks=extra_hooks)
    progress_bar = tqdm(total=3 if "jvp" in forms else 2, disable=not progress, desc=f"logit shift L{site.layer}H{site.head}")

    # Measured shifts: eps * u w^T added to the state at t0, one branch per (plan, eps).
    branches = [Branch(p.prompt, [add_to_state(site.layer, site.head, p.t0, e * m)], scored=p.positions, end=p.end)
                for p, m in zip(plans, atom_matrix) for e in p.eps_abs]
    measured = engine.run(prompts, branches, LogitShift(tuple(token_ranks)), batch_size)
    progress_bar.update(1)
    n_eps = len(eps)
    eval_tokens = [measured[i * n_eps].scores["token"] for i in range(len(plans))]  # [n_pos, n_rank] per plan

    jvp = None
    if "jvp" in forms:
        jvp = _jvp(engine, prompts, plans, atom_matrix, eval_tokens, site, batch_size)
    progress_bar.update(1)
    readout = readout_matrix(model, site.layer, site.head).cpu()
    records: list[Record] = []
    for i, p in enumerate(plans):
        obs = seen[p.prompt]
        log_decay = obs["hook_decay"].clamp_min(1e-30).log()
        G = gate_products(log_decay, p.t0, p.positions)
        if G.dim() == 2:  # per key channel: the atom's own gate, u^T diag(G) u for its unit u
            G = G @ u_sel[p.slot].double() ** 2
        G = G.tolist()
        gate = None
        if "gate" in forms:
            gate = closed_form_gate(obs["hook_q"], log_decay, readout, u_sel[p.slot : p.slot + 1],
                                    w_sel[p.slot : p.slot + 1], p.t0, p.positions, eval_tokens[i])[0].double()
        for e, eps_value in enumerate(eps):
            shift = measured[i * n_eps + e].scores["shift"]
            for k, pos in enumerate(p.positions):
                for r, rank in enumerate(token_ranks):
                    rec: Record = dict(prompt=p.prompt, atom=p.atom, layer=site.layer, head=site.head, t0=p.t0, t=pos,
                                       lag=pos - p.t0, eps=float(eps_value), eps_abs=p.eps_abs[e], rank=int(rank),
                                       token=int(eval_tokens[i][k, r]), gate_product=float(G[k]),
                                       measured=float(shift[k, r]))
                    if gate is not None:
                        rec["gate"] = p.eps_abs[e] * float(gate[k, r])
                    if jvp is not None:
                        rec["jvp"] = p.eps_abs[e] * float(jvp[i][k, r])
                    records.append(rec)
    if "fitted" in forms:
        add_fitted_form(records)
        add_null_fitted_form(records, seed=seed)
    progress_bar.update(1)
    progress_bar.close()
    summary = summarize_logit_shift(records, forms)
    summary["config"] = dict(layer=site.layer, head=site.head, eps=list(eps), eps_unit=eps_unit, horizon=horizon,
                             token_ranks=list(token_ranks), t0=t0, n_atoms=len(atom_ids))
    return records, summary


def _jvp(engine, prompts, plans, atom_matrix, eval_tokens, site, batch_size) -> list[Tensor]:
    """``d logit / d eps`` at ``eps = 0`` at each plan's eval tokens: one dual edit per plan (primal
    0, tangent ``u w^T`` added to the state at ``t0``), forward-mode through the rest of the model."""
    width = max(len(p.positions) for p in plans)
    tokens = torch.zeros(len(plans), width, eval_tokens[0].shape[-1], dtype=torch.long)
    for i, t in enumerate(eval_tokens):
        tokens[i, : t.shape[0]] = t
    with fwAD.dual_level():
        branches = [Branch(p.prompt, [add_to_state(site.layer, site.head, p.t0, fwAD.make_dual(torch.zeros_like(m), m))],
                           scored=p.positions, end=p.end) for p, m in zip(plans, atom_matrix)]
        results = engine.run(prompts, branches, Tangent(tokens, [p.positions for p in plans]), batch_size)
    return [r.scores["tangent"] for r in results]


def add_fitted_form(records: list[Record], prediction: str = "gate", name: str = "fitted",
                    group_by: Sequence[str] = ("prompt", "atom", "token")) -> None:
    """The paper's fitted form: ``name = c * prediction`` with one least-squares ``c`` per group
    (default ``(prompt, atom, eval token)``), pooled over that group's positions and eps values."""
    sums: dict[tuple, list[float]] = {}
    for r in records:
        acc = sums.setdefault(tuple(r[g] for g in group_by), [0.0, 0.0])
        acc[0] += r[prediction] * r["measured"]
        acc[1] += r[prediction] * r[prediction]
    for r in records:
        xy, xx = sums[tuple(r[g] for g in group_by)]
        r[name] = (xy / xx) * r[prediction] if xx > 0 else 0.0


def add_null_fitted_form(records: list[Record], seed: int = 0) -> None:
    """``fitted_null``: the fitted form's procedure applied to a prediction that knows nothing but
    eps (seeded standard-normal noise per (prompt, atom, position, token), times ``eps_abs``). What
    the fit alone explains; the fitted form means something only where it clearly beats this."""
    rng = np.random.default_rng(seed)
    noise: dict[tuple, float] = {}
    for r in records:
        key = (r["prompt"], r["atom"], r["t"], r["token"])
        if key not in noise:
            noise[key] = float(rng.standard_normal())
        r["null"] = r["eps_abs"] * noise[key]
    add_fitted_form(records, prediction="null", name="fitted_null")
    for r in records:
        del r["null"]


def _cell_r2(y: np.ndarray, f: np.ndarray, atoms: np.ndarray, eps: np.ndarray) -> dict[tuple[int, float], float]:
    """R^2 of each (atom, eps) cell with at least two measurements."""
    cells = {}
    for a in np.unique(atoms):
        for e in np.unique(eps):
            sel = (atoms == a) & (eps == e)
            if sel.sum() >= 2:
                cells[(int(a), float(e))] = r_squared(y[sel], f[sel])
    return cells


def summarize_logit_shift(records: Sequence[Mapping[str, float | int]], forms: Sequence[str] = FORMS) -> dict[str, object]:
    """R^2 of each form against the measured shifts, as the paper reports it: per (atom, eps) cell,
    then ``median_cell_r2`` and its IQR over cells; also ``pooled_r2``, ``pearson_r``, per-eps
    medians over atoms and pooled R^2 per lag. ``fitted_null`` comes with ``fitted``."""
    summary: dict[str, object] = {"n": len(records), "forms": {}}
    if not records:
        return summary
    y = np.array([r["measured"] for r in records])
    atoms = np.array([r["atom"] for r in records])
    eps = np.array([r["eps"] for r in records])
    lags = np.array([r["lag"] for r in records])
    names = [*forms, *(["fitted_null"] if "fitted" in forms else [])]
    for form in names:
        if form not in records[0]:
            continue
        f = np.array([r[form] for r in records])
        cells = _cell_r2(y, f, atoms, eps)
        values = np.array(list(cells.values()))
        summary["forms"][form] = dict(
            median_cell_r2=float(np.median(values)) if values.size else math.nan,
            cell_r2_iqr=(float(np.quantile(values, 0.25)), float(np.quantile(values, 0.75))) if values.size else None,
            n_cells=len(cells),
            n_atoms=len({a for a, _ in cells}),
            pooled_r2=r_squared(y, f),
            # Scale-free companion of R^2: the gate form can point the right way at the wrong size.
            pearson_r=float(np.corrcoef(y, f)[0, 1]) if y.size > 1 and f.std() > 0 and y.std() > 0 else math.nan,
            by_eps={float(e): float(np.median([v for (a, ce), v in cells.items() if ce == e]))
                    for e in np.unique(eps) if any(ce == e for _, ce in cells)},
            by_lag={int(lag): r_squared(y[lags == lag], f[lags == lag]) for lag in np.unique(lags)},
        )
    summary["median_abs_measured"] = float(np.median(np.abs(y)))
    return summary


__all__ = [
    "FORMS",
    "readout_matrix",
    "gate_products",
    "closed_form_gate",
    "run_logit_shift_audit",
    "add_fitted_form",
    "add_null_fitted_form",
    "summarize_logit_shift",
]
