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

#: Paper headline: Qwen3.5-0.8B L1/L9/L17 H4 substitution test (section 3.2, App. F.2).
PAPER_SUBSTITUTION: dict[str, Any] = {
    "label": "paper (Qwen3.5-0.8B L1/L9/L17 H4)",
    "n": 4851,
    "win_rate": 0.924,
    "win_ci": (0.916, 0.931),
    "chain_rate": 0.895,
    "ratio_of_medians": {"atom": 1.0, "delete": 2.70, "random": 4.90},
    "cliffs_delta": 0.825,  # at L9
    "wilcoxon_p": "< 1e-200",
    "population": {"n_atoms": 87, "mean_win_rate": 0.898, "ci": (0.881, 0.913)},
    "per_layer": {1: 0.939, 9: 0.912, 17: 0.923},
}

#: Paper: Mamba-2-370M L24 H0 (section 3.3).
PAPER_SUBSTITUTION_MAMBA2: dict[str, Any] = {
    "label": "paper (Mamba-2-370M L24 H0)",
    "n": 2500,
    "win_rate": 0.8808,
    "win_ci": (0.868, 0.893),
    "population": {"n_atoms": 100},
}

#: Paper: closed-form logit shift audit (App. A): 50 atoms x 4 eps, three-factor (fitted) form.
PAPER_LOGIT_SHIFT: dict[str, Any] = {
    "label": "paper (Qwen3.5-0.8B L9 H4, fitted G)",
    "median_atom_r2": 0.983,
    "atom_r2_iqr": (0.977, 0.990),
    "eps": (0.1, 0.3, 1.0, 3.0),
}

#: Paper: register/bundle partition at Qwen3.5-0.8B L9 H4 (section 3.1).
PAPER_PARTITION: dict[str, Any] = {
    "label": "paper (Qwen3.5-0.8B L9 H4)",
    "n_atoms": 2048,
    "alive": 316,
    "registers": 222,
    "bundles": 94,
    "delta_bic": -296.0,
    "register_mean_cos": 0.26,
}

#: Paper: sustained installs (section 4, App. I.6), mid-rank (100-1000) targets.
PAPER_STEERING: dict[str, Any] = {
    "label": "paper (Qwen3.5-0.8B, greedy, 20 tokens)",
    "mid_rank_inclusion": {"base": 0.333, 1.5: 0.667, 3.0: 1.0},
    "pooled_inclusion": {"base": 0.083, 3.0: 0.25},
    "first_step_logprob_lift": 1.27,
    "sign_accuracy": 0.846,
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


def format_summary_table(summary: Mapping[str, Any], paper: Mapping[str, Any] | None = PAPER_SUBSTITUTION, title: str | None = None) -> str:
    """The substitution summary (from ``summarize_substitution``) as a text table, with a column
    of the paper's numbers when ``paper`` is given (``None`` to omit it)."""
    p = paper or {}
    ratio = summary.get("ratio_of_medians", {})
    p_ratio = p.get("ratio_of_medians", {})
    med = summary.get("median_kl", {})
    se = summary.get("median_kl_se", {})
    pop = summary.get("population", {})
    p_pop = p.get("population", {})
    wil = summary.get("wilcoxon", {})

    def ratio_str(r: Mapping[str, Any]) -> str:
        if not r:
            return "-"
        return " : ".join(_num(r.get(c), ".2f") for c in ("atom", "delete", "random"))

    rows = [
        ["firings (n)", str(summary.get("n", "-")), str(p.get("n", "-"))],
        ["atom beats delete", _pct(summary.get("win_rate")), _pct(p.get("win_rate"))],
        ["  Wilson 95% CI", _ci(summary.get("win_ci")), _ci(p.get("win_ci"))],
        ["  cluster bootstrap CI (by atom)", _ci(summary.get("win_ci_cluster")), "-"],
        ["strict chain atom < delete < random", _pct(summary.get("chain_rate")), _pct(p.get("chain_rate"))],
        ["median KL atom", f"{_num(med.get('atom'))} +- {_num(se.get('atom'), '.2g')}", "-"],
        ["median KL delete", f"{_num(med.get('delete'))} +- {_num(se.get('delete'), '.2g')}", "-"],
        ["median KL random", f"{_num(med.get('random'))} +- {_num(se.get('random'), '.2g')}", "-"],
        ["ratio of medians atom : delete : random", ratio_str(ratio), ratio_str(p_ratio)],
        ["paired Wilcoxon p (atom vs delete)", _num(wil.get("p_value"), ".2g"), _num(p.get("wilcoxon_p"))],
        ["Cliff's delta (delete vs atom)", _num(summary.get("cliffs_delta"), "+.3f"), _num(p.get("cliffs_delta"), "+.3f")],
        ["population: alive atoms", str(pop.get("n_atoms", "-")), str(p_pop.get("n_atoms", "-"))],
        ["population: mean win rate", _pct(pop.get("mean_win_rate")), _pct(p_pop.get("mean_win_rate"))],
        ["  95% CI over atoms", _ci(pop.get("ci")), _ci(p_pop.get("ci"))],
    ]
    p_layers = p.get("per_layer", {})
    for layer, stats in sorted(summary.get("per_layer", {}).items(), key=lambda kv: int(kv[0])):
        rows.append([f"layer {layer}: win rate (n={stats['n']})", f"{_pct(stats['win_rate'])} {_ci(stats['win_ci'])}",
                     _pct(p_layers.get(int(layer)))])
    header = ["metric", "this run", p.get("label", "paper")] if paper else ["metric", "this run"]
    if not paper:
        rows = [r[:2] for r in rows]
    cfg = summary.get("config", {})
    default_title = "Substitution test" + (f" ({', '.join(f'{k}={v}' for k, v in cfg.items())})" if cfg else "")
    return render_table(header, rows, title or default_title)


def format_logit_shift_table(summary: Mapping[str, Any], paper: Mapping[str, Any] | None = PAPER_LOGIT_SHIFT, title: str | None = None) -> str:
    """R^2 of each closed-form variant (from ``summarize_logit_shift``), with the paper's number."""
    header = ["form", "pooled R^2", "median atom R^2", "atom R^2 IQR", "pooled r", "n atoms"]
    rows = []
    for form, stats in summary.get("forms", {}).items():
        iqr = stats.get("atom_r2_iqr")
        rows.append([form, _num(stats.get("pooled_r2"), ".4f"), _num(stats.get("median_atom_r2"), ".4f"),
                     "-" if not iqr else f"[{_num(iqr[0], '.3f')}, {_num(iqr[1], '.3f')}]",
                     _num(stats.get("pearson_r"), ".3f"), str(stats.get("n_atoms", "-"))])
        for eps, by_eps in sorted(stats.get("by_eps", {}).items(), key=lambda kv: float(kv[0])):
            rows.append([f"  eps={eps}", _num(by_eps.get("pooled_r2"), ".4f"), _num(by_eps.get("median_atom_r2"), ".4f"),
                         "-", "", ""])
    if paper:
        iqr = paper.get("atom_r2_iqr")
        rows.append([paper.get("label", "paper"), "-", _num(paper.get("median_atom_r2"), ".3f"),
                     "-" if not iqr else f"[{iqr[0]:.3f}, {iqr[1]:.3f}]", "-", "50"])
    return render_table(header, rows, title or f"Closed-form logit shift ({summary.get('n', 0)} measured shifts)")


def format_partition_table(summary: Mapping[str, Any], paper: Mapping[str, Any] | None = PAPER_PARTITION, title: str | None = None) -> str:
    p = paper or {}
    keys = [("atoms", "n_atoms"), ("alive", "alive"), ("registers", "registers"), ("bundles", "bundles"),
            ("delta BIC (2 vs 1 comp.)", "delta_bic"), ("register mean cosine", "register_mean_cos"),
            ("bundle mean cosine", "bundle_mean_cos")]
    rows = [[label, _num(summary.get(key), ".4g"), _num(p.get(key), ".4g")] for label, key in keys]
    header = ["", "this run", p.get("label", "paper")]
    if not paper:
        rows, header = [r[:2] for r in rows], header[:2]
    return render_table(header, rows, title or "Register / bundle partition")


def format_steering_table(summary: Mapping[str, Any], title: str | None = None) -> str:
    """Target inclusion per stratum and multiplier (from ``summarize_installs``)."""
    header = ["stratum", "m", "n", "base incl.", "install incl.", "first-step lift (nats)", "rank improved"]
    rows = []
    strata = summary.get("strata", {})
    for stratum, by_m in sorted(strata.items(), key=lambda kv: kv[0] == "pooled"):
        for m, s in sorted(by_m.items(), key=lambda kv: float(kv[0])):
            rows.append([stratum, str(m), str(s["n"]), _pct(s["base_inclusion"]), _pct(s["install_inclusion"]),
                         _num(s["median_logprob_lift"], "+.3f"), _pct(s["rank_improved"])])
    return render_table(header, rows, title or "Sustained installs (greedy decoding)")


__all__ = [
    "PAPER_SUBSTITUTION",
    "PAPER_SUBSTITUTION_MAMBA2",
    "PAPER_LOGIT_SHIFT",
    "PAPER_PARTITION",
    "PAPER_STEERING",
    "append_jsonl",
    "read_jsonl",
    "write_json",
    "to_dataframe",
    "render_table",
    "format_summary_table",
    "format_logit_shift_table",
    "format_partition_table",
    "format_steering_table",
]
