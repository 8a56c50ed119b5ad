"""Cache-slot erasure (paper section 4 "Cache-slot erasure", App. I.4; METHOD.md section 6).

At each firing position ``t`` of atom ``i`` (its code ``a_i(t) > 0``, dominant or not) the atom's
decoded contribution ``C_i(t)`` (``a_i(t)`` times its unit form) is removed from the native write
of the head: ``W'(t) = D_nat(t) - C_i(t)``. The control applies the same edit, with the atom's mean
firing contribution times ``control_scale``, at positions where the atom does not fire (the
paper's "same write at non-firing positions", at 4x a* in its table).

The score is the change of one token's log-probability at position ``t + score_offset``
(``score_offset=0``: the next-token distribution right after the edited write):

- ``target="promoted"`` (default): the token the removed contribution promoted, predicted
  without looking at the outcome: ``argmax_tok (C^T q_t) . W_O[h] W_U[:, tok]`` (the closed form
  at lag 0 with ``J`` = identity);
- ``target="most_affected"``: the token with the largest ``|d log p|`` (signed value reported);
- an ``int``: that token id.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from writesae_lens.analysis.stats import bootstrap_ci, signed_rank_test
from writesae_lens.interventions._legacy_walk import branch_logits, prefix_states, write_addition_hook
from writesae_lens.interventions.atoms import contribution_norms, unit_atoms
from writesae_lens.interventions.engine import as_prompt_list, prompt_batches
from writesae_lens.interventions.observe import observe_site
from writesae_lens.interventions.sites import resolve_site
from writesae_lens.interventions.logit_shift import readout_matrix


@torch.no_grad()
def run_erasure(
    model: Any,
    sae: Any,
    layer: int | None = None,
    head: int | None = None,
    tokens: Tensor | Sequence[Tensor] | None = None,
    *,
    atom: int,
    n: int = 150,
    control_scale: float = 1.0,
    target: Literal["promoted", "most_affected"] | int = "promoted",
    score_offset: int = 0,
    min_position: int = 1,
    batch_size: int = 8,
    max_rows: int = 64,
    seed: int = 0,
    progress: bool = True,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Erase ``atom`` at up to ``n`` of its firings and apply the control edit at ``n`` non-firing
    positions (both seeded samples). Returns one row per trial (``condition`` is ``"firing"`` or
    ``"control"``, ``delta_logp`` of ``token``) and a summary per condition (median with bootstrap
    CI, Wilcoxon signed-rank p against 0)."""
    if tokens is None:
        raise ValueError("Pass tokens=.")
    site = resolve_site(model, sae, layer, head)
    prompts = as_prompt_list(tokens)
    d_k, d_v = model.cfg.d_k, model.cfg.d_v
    unit = unit_atoms(sae, torch.tensor([atom]), d_k, d_v)[0].float().cpu()
    readout = readout_matrix(model, site.layer, site.head).cpu()

    # Pass 1: firing and non-firing positions of the atom.
    fire, quiet = [], []
    for ids, batch in prompt_batches(prompts, batch_size):
        seen = observe_site(model, batch, site, sae, logits=False)
        code = seen["codes"][:, :, atom]
        contrib = contribution_norms(sae, code.flatten(), torch.full((code.numel(),), atom)).view_as(code).cpu()
        last = batch.shape[1] - 1 - score_offset
        for row, prompt in enumerate(ids):
            for t in range(min_position, last + 1):
                (fire if code[row, t] > 0 else quiet).append((prompt, t, float(contrib[row, t])))
    generator = torch.Generator().manual_seed(seed)
    pick = lambda items: [items[i] for i in sorted(torch.randperm(len(items), generator=generator)[:n].tolist())]  # noqa: E731
    fire, quiet = pick(fire), pick(quiet)
    if not fire:
        raise ValueError(f"Atom {atom} never fires on these tokens.")
    mean_contrib = float(np.mean([c for _, _, c in fire]))
    trials = [(p, t, c, "firing") for p, t, c in fire] + [(p, t, control_scale * mean_contrib, "control") for p, t, _ in quiet]

    rows: list[dict[str, Any]] = []
    by_prompt: dict[int, list] = {}
    for trial in trials:
        by_prompt.setdefault(trial[0], []).append(trial)
    bar = tqdm(total=len(trials), disable=not progress, desc=f"erasure atom {atom}")
    for ids, batch in prompt_batches(prompts, batch_size, ids=sorted(by_prompt)):
        seen = observe_site(model, batch, site, leaves=("hook_q",))
        base_logp = F.log_softmax(seen["logits"].double(), dim=-1)
        at: dict[int, list[tuple[int, tuple]]] = {}
        for row, prompt in enumerate(ids):
            for trial in by_prompt[prompt]:
                at.setdefault(trial[1], []).append((row, trial))
        for t, state in prefix_states(model, batch, at):
            members = at[t]
            for c0 in range(0, len(members), max_rows):
                chunk = members[c0 : c0 + max_rows]
                rows_idx = torch.tensor([r for r, _ in chunk])
                coef = torch.tensor([trial[2] for _, trial in chunk])
                deltas = -(coef[:, None] * unit.flatten()[None, :])
                logits = branch_logits(model, site, batch, state, rows_idx, t, t + score_offset,
                                       write_addition_hook(site.head, 0, deltas), positions=[t + score_offset])
                logp = F.log_softmax(logits[:, 0].double(), dim=-1).cpu()
                base = base_logp[rows_idx, t + score_offset].cpu()
                delta = logp - base
                for i, (row, trial) in enumerate(chunk):
                    if target == "promoted":
                        read = unit.T @ seen["hook_q"][row, t].float().cpu()  # C^T q_t per unit coefficient
                        token = int((read @ readout).argmax())
                    elif target == "most_affected":
                        token = int(delta[i].abs().argmax())
                    else:
                        token = int(target)
                    rows.append(dict(
                        prompt=trial[0], position=t, layer=site.layer, head=site.head, atom=atom, condition=trial[3],
                        coefficient=float(trial[2]), token=token, delta_logp=float(delta[i, token]),
                        base_logp=float(base[i, token]),
                    ))
                bar.update(len(chunk))
    bar.close()
    summary = summarize_erasure(rows, seed=seed)
    summary["config"] = dict(layer=site.layer, head=site.head, atom=atom, control_scale=control_scale,
                             target=target, score_offset=score_offset, mean_firing_contribution=mean_contrib)
    return rows, summary


def summarize_erasure(rows: Sequence[Mapping[str, Any]], seed: int = 0) -> dict[str, Any]:
    """Per condition: n, median ``delta_logp`` with a bootstrap 95% CI, and the Wilcoxon p against 0."""
    out: dict[str, Any] = {}
    for condition in ("firing", "control"):
        x = np.array([r["delta_logp"] for r in rows if r["condition"] == condition])
        if x.size == 0:
            continue
        out[condition] = dict(
            n=int(x.size),
            median_delta_logp=float(np.median(x)),
            median_ci=bootstrap_ci(x, np.median, seed=seed),
            wilcoxon_p=signed_rank_test(x, np.zeros_like(x))["p_value"],
            fraction_negative=float((x < 0).mean()),
        )
    return out


__all__ = ["run_erasure", "summarize_erasure"]
