"""Tidy results: JSONL rows, optional pandas frames, and paper-style text tables.

Results of the intervention toolkit are lists of flat dictionaries (one row per firing / trial).
:func:`append_jsonl` / :func:`read_jsonl` stream them to disk, :func:`to_dataframe` hands them to
pandas when it is installed, and the ``format_*`` functions print the summaries next to the
paper's numbers (:data:`PAPER_SUBSTITUTION`, :data:`PAPER_LOGIT_SHIFT`, ...).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

#: Paper headline: Qwen3.5-0.8B, L1/L9/L17 head 4 pooled (section 3.2, Table 2, App. F.2).
PAPER_SUBSTITUTION: dict[str, Any] = {
    "label": "paper: Qwen3.5-0.8B L1/L9/L17 H4",
    "n": 4851,
    "win_rate": 0.924,
    "win_ci": (0.916, 0.931),
    "chain_rate": 0.895,
    "ratio_of_medians": {"atom": 1.0, "delete": 2.70, "random": 4.90},
    "ratio_note": "L9 only; about 1 : 1.4 : 1.7 at L1, L17",
    "paired_cliffs_delta": 0.825,  # at L9: 2 * 0.9125 - 1
    "cliffs_note": "L9",
    "wilcoxon_p": "< 1e-200",
    "population": {"n_atoms": 87, "mean_win_rate": 0.898, "ci": (0.881, 0.913)},
    "per_layer": {1: 0.939, 9: 0.912, 17: 0.923},
}

#: Paper: Mamba-2-370M L24 H0 (section 3.3).
PAPER_SUBSTITUTION_MAMBA2: dict[str, Any] = {
    "label": "paper: Mamba-2-370M L24 H0",
    "n": 2500,
    "win_rate": 0.8808,
    "win_ci": (0.868, 0.893),
    "population": {"n_atoms": 100},
    "per_layer": {24: 0.8808},
}

#: Paper: closed-form logit shift audit (App. A): 50 atoms x 4 eps, three-factor (fitted) form.
PAPER_LOGIT_SHIFT: dict[str, Any] = {
    "label": "paper: Qwen3.5-0.8B L9 H4",
    "form": "fitted",
    "median_cell_r2": 0.983,
    "cell_r2_iqr": (0.977, 0.990),
    "eps": (0.1, 0.3, 1.0, 3.0),
}

#: Paper: register/bundle partition at Qwen3.5-0.8B L9 H4 (section 3.1).
PAPER_PARTITION: dict[str, Any] = {
    "label": "paper: Qwen3.5-0.8B L9 H4",
    "n_atoms": 2048,
    "alive": 316,
    "registers": 222,
    "bundles": 94,
    "delta_bic": -296.0,
    "register_mean_cos": 0.26,
}

# ---------------------------------------------------------------- rows on disk
def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return _jsonable(value.item())
    return value


# The first line of a results file made by writesae_lens.run_record: ``{"_run": {...}}``, not a row.
RUN_RECORD_KEY = "_run"


def append_jsonl(path: str | Path, rows: Iterable[Mapping[str, Any]]) -> None:
    """Append ``rows`` to ``path`` (one JSON object per line), each line with one ``write`` call on
    a file opened for appending, so a killed run leaves whole rows, never half of one."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        for row in rows:
            line = (json.dumps(_jsonable(row)) + "\n").encode("utf-8")
            if os.write(fd, line) != len(line):
                raise OSError(f"Short write to {path} (disk full?).")
    finally:
        os.close(fd)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file; a truncated last line (an interrupted write) is ignored."""
    rows = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                break
            if RUN_RECORD_KEY not in row:  # the run record heads the file; it is not a row
                rows.append(row)
    return rows


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as JSON under a temporary name, then rename it into place (never half a file)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(_jsonable(obj), indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def to_dataframe(rows: Sequence[Mapping[str, Any]]) -> Any:
    """The rows as a ``pandas.DataFrame`` (pandas is optional: raises ImportError if absent)."""
    import pandas as pd

    return pd.DataFrame(list(rows))


# ---------------------------------------------------------------- formatting
def _pct(x: Any) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def _ci(ci: Any) -> str:
    if not ci or any(v is None or (isinstance(v, float) and math.isnan(v)) for v in ci):
        return "-"
    return f"[{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def _num(x: Any, fmt: str = ".3g") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return x if isinstance(x, str) else format(x, fmt)


def render_table(header: Sequence[str], rows: Sequence[Sequence[str]], title: str | None = None) -> str:
    """A plain-text table with aligned columns."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join("-" * w for w in widths)
    fmt = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    out = [title] if title else []
    out += [fmt(header), line, *(fmt(r) for r in rows)]
    return "\n".join(out)


def _variant(cfg: Mapping[str, Any]) -> str:
    """The options a substitution run used, as its header states them."""
    direction = "KL(p_patched || p_base)" if cfg.get("kl_direction", "patched_base") == "patched_base" else "KL(p_base || p_patched)"
    score = cfg.get("score", "last")
    score_text = {"last": "KL at the window's last position (t+1 reported beside it)", "next": "KL at t+1",
                  "mean_after": "mean KL over t+1..end", "current": "KL at t"}.get(score, score)
    horizon = cfg.get("horizon")
    return (f"variant: scale={cfg.get('scale_mode', '?')}, atoms={cfg.get('selection', '?')} "
            f"(features with >= {cfg.get('min_firings_per_atom', '?')} firings, <= {cfg.get('max_per_atom', '?')} each), "
            f"random control={cfg.get('random_control', '?')}, {direction}, {score_text}"
            + (f", window t..t+{horizon}" if horizon else ", window t..end of prompt"))


def format_summary_table(summary: Mapping[str, Any], paper: Mapping[str, Any] | None = PAPER_SUBSTITUTION,
                         title: str | None = None) -> str:
    """The substitution summary (``summarize_substitution``) as a text table: each statistic named
    as the paper defines it, this run's value, and the paper's value with the model and layer it
    belongs to (``paper=None`` omits that column). The header names both models and the variant."""
    p = paper or {}
    cfg = summary.get("config", {})
    ratio, p_ratio = summary.get("ratio_of_medians", {}), p.get("ratio_of_medians", {})
    med, se = summary.get("median_kl", {}), summary.get("median_kl_se", {})
    pop, p_pop = summary.get("population", {}), p.get("population", {})
    wil = summary.get("wilcoxon", {})
    nxt = summary.get("next_position", {})

    def ratio_str(r: Mapping[str, Any]) -> str:
        return " : ".join(_num(r.get(c), ".2f") for c in ("atom", "delete", "random")) if r else "-"

    def note(value: str, key: str) -> str:
        return f"{value} ({p[key]})" if value != "-" and key in p else value

    wil_text = "-"
    if wil:
        wil_text = f"p={_num(wil.get('p_value'), '.2g')} (R+={_num(wil.get('statistic'), '.6g')}, {wil.get('method')}, n={wil.get('n')})"
    rows = [
        ["firings (n)", str(summary.get("n", "-")), str(p.get("n", "-"))],
        ["win rate P(KL_atom < KL_delete)", _pct(summary.get("win_rate")), _pct(p.get("win_rate"))],
        ["  Wilson 95% CI", _ci(summary.get("win_ci")), _ci(p.get("win_ci"))],
        ["  95% CI, bootstrap over prompts", _ci(summary.get("win_ci_prompt_bootstrap")), "-"],
        ["  win rate at t+1 [Wilson 95% CI]", f"{_pct(nxt.get('win_rate'))} {_ci(nxt.get('win_ci'))}" if nxt else "-", "-"],
        ["strict chain KL_atom < KL_delete < KL_random", _pct(summary.get("chain_rate")), _pct(p.get("chain_rate"))],
        ["median KL atom +- MAD/sqrt(n)", f"{_num(med.get('atom'))} +- {_num(se.get('atom'), '.2g')}", "-"],
        ["median KL delete +- MAD/sqrt(n)", f"{_num(med.get('delete'))} +- {_num(se.get('delete'), '.2g')}", "-"],
        ["median KL random +- MAD/sqrt(n)", f"{_num(med.get('random'))} +- {_num(se.get('random'), '.2g')}", "-"],
        ["ratio of medians atom : delete : random", ratio_str(ratio), note(ratio_str(p_ratio), "ratio_note")],
        ["Wilcoxon signed-rank, one-sided, H1: KL_atom < KL_delete", wil_text,
         f"p {p['wilcoxon_p']}" if "wilcoxon_p" in p else "-"],
        ["paired Cliff's delta P(atom<delete) - P(atom>delete)", _num(summary.get("paired_cliffs_delta"), "+.3f"),
         note(_num(p.get("paired_cliffs_delta"), "+.3f"), "cliffs_note")],
        [f"population: features with >= {pop.get('min_firings_per_atom', '?')} firings "
         f"(<= {pop.get('max_firings_per_atom', '?')} each)", str(pop.get("n_atoms", "-")), str(p_pop.get("n_atoms", "-"))],
        ["population: mean per-feature win rate", _pct(pop.get("mean_win_rate")), _pct(p_pop.get("mean_win_rate"))],
        ["  95% bootstrap CI over features", _ci(pop.get("ci")), _ci(p_pop.get("ci"))],
    ]
    p_layers = p.get("per_layer", {})
    paper_layers = ", ".join(f"L{layer} {_pct(rate)}" for layer, rate in sorted(p_layers.items()))
    for i, (layer, stats) in enumerate(sorted(summary.get("per_layer", {}).items(), key=lambda kv: int(kv[0]))):
        rows.append([f"win rate at this run's L{layer} (n={stats['n']})", f"{_pct(stats['win_rate'])} {_ci(stats['win_ci'])}",
                     f"per layer: {paper_layers}" if i == 0 and paper_layers else ""])
    model = cfg.get("model", "this run")
    where = f"L{cfg['layer']} H{cfg['head']} hook_{cfg.get('site', 'write')}" if "layer" in cfg else \
        ", ".join(f"L{l} H{h}" for l, h in cfg.get("sites", []))
    header = ["statistic (as the paper defines it)", f"{model} {where}".strip()]
    if paper:
        header.append(p.get("label", "paper"))
    else:
        rows = [r[:2] for r in rows]
    lines = [title or "Substitution test", f"this run: {model} {where}" + (f"; {p.get('label')}" if paper else ""),
             _variant(cfg)]
    return render_table(header, rows, "\n".join(lines))


_FORM_NAMES = {
    "gate": "gate: eps G (u.q_t) <W_O w, W_U[:, tok]>, nothing fitted",
    "jvp": "jvp: exact first-order term (forward-mode)",
    "fitted": "fitted: gate x one least-squares G per (prompt, atom, token)",
    "fitted_null": "  null baseline: the same fit on noise x eps",
}


def format_logit_shift_table(summary: Mapping[str, Any], paper: Mapping[str, Any] | None = PAPER_LOGIT_SHIFT,
                             title: str | None = None) -> str:
    """R^2 of each closed-form variant (``summarize_logit_shift``): the median over (atom, eps)
    cells of each cell's R^2 (the paper's unit), gate and jvp first, the fitted form beside its
    null baseline, and the paper's value (its fitted form) on the fitted row."""
    cfg = summary.get("config", {})
    header = ["form", "median cell R^2 [IQR]", "cells", "pooled R^2", "pooled r"]
    if paper:
        header.append(f"{paper.get('label', 'paper')} (median cell R^2 [IQR])")
    rows = []
    for form in ("gate", "jvp", "fitted", "fitted_null"):
        stats = summary.get("forms", {}).get(form)
        if stats is None:
            continue
        iqr = stats.get("cell_r2_iqr")
        row = [_FORM_NAMES[form],
               f"{_num(stats.get('median_cell_r2'), '.4f')} " + ("-" if not iqr else f"[{_num(iqr[0], '.3f')}, {_num(iqr[1], '.3f')}]"),
               str(stats.get("n_cells", "-")), _num(stats.get("pooled_r2"), ".4f"), _num(stats.get("pearson_r"), ".3f")]
        if paper:
            piqr = paper.get("cell_r2_iqr")
            row.append(f"{_num(paper.get('median_cell_r2'), '.3f')} [{piqr[0]:.3f}, {piqr[1]:.3f}]"
                       if form == paper.get("form") and piqr else "-")
        rows.append(row)
    model = cfg.get("model", "this run")
    where = f"L{cfg.get('layer', '?')} H{cfg.get('head', '?')}"
    lines = [title or f"Closed-form logit shift ({summary.get('n', 0)} measured shifts)",
             f"this run: {model} {where}, eps={cfg.get('eps')} x {cfg.get('eps_unit', '?')}, "
             f"t0={cfg.get('t0')}, horizon {cfg.get('horizon')}, token ranks {cfg.get('token_ranks')}"
             + (f"; {paper.get('label')}: 50 atoms x eps (0.1, 0.3, 1, 3), top-1 token" if paper else "")]
    return render_table(header, rows, "\n".join(lines))


def format_partition_table(summary: Mapping[str, Any], paper: Mapping[str, Any] | None = PAPER_PARTITION, title: str | None = None) -> str:
    p = paper or {}
    keys = [("atoms", "n_atoms"), ("alive", "alive"), ("registers", "registers"), ("bundles", "bundles"),
            ("delta BIC (2 vs 1 comp.)", "delta_bic"), ("register mean cosine", "register_mean_cos"),
            ("bundle mean cosine", "bundle_mean_cos")]
    rows = [[label, _num(summary.get(key), ".4g"), _num(p.get(key), ".4g")] for label, key in keys]
    where = f"L{summary.get('layer', '?')} H{summary.get('head', '?')}"
    header = ["", f"{summary.get('model', 'this run')} {where}", p.get("label", "paper")]
    if not paper:
        rows, header = [r[:2] for r in rows], header[:2]
    return render_table(header, rows, title or "Register / bundle partition (2- vs 1-component Gaussian mixture, BIC)")


__all__ = [
    "PAPER_SUBSTITUTION",
    "PAPER_SUBSTITUTION_MAMBA2",
    "PAPER_LOGIT_SHIFT",
    "PAPER_PARTITION",
    "append_jsonl",
    "read_jsonl",
    "write_json",
    "to_dataframe",
    "render_table",
    "format_summary_table",
    "format_logit_shift_table",
    "format_partition_table",
]
