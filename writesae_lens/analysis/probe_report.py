"""Text tables of the cache-intervention probes (paper section 4, App. I.4-I.6): erasure, sign
prediction, sustained installs, amplification.

Every table names each statistic as the paper defines it and prints the paper's value beside this
run's; the title says which model each column belongs to (this run: ``model``; the paper's column:
its label, e.g. Qwen3.5-0.8B L9 H4) and the next line states the variant (the protocol's options).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from writesae_lens.analysis.report import _ci, _num, _pct, render_table
from writesae_lens.interventions.amplification import PAPER_AMPLIFICATION
from writesae_lens.interventions.erasure import PAPER_ERASURE
from writesae_lens.interventions.installs import PAPER_INSTALLS
from writesae_lens.interventions.sign_prediction import PAPER_SIGN_PREDICTION


def _title(what: str, model: str, summary: Mapping[str, Any], paper: Mapping[str, Any] | None) -> str:
    cfg = summary.get("config", {})
    site = f"L{cfg.get('layer', '?')} H{cfg.get('head', '?')}"
    against = f" vs {paper['label']}" if paper else ""
    return f"{what}: this run = {model} {site}{against}\nvariant: {summary.get('variant', '-')}"


def _table(rows: list[list[str]], paper: Mapping[str, Any] | None, title: str) -> str:
    header = ["statistic", "this run", str(paper["label"]) if paper else ""]
    return render_table(header if paper else header[:2], rows if paper else [r[:2] for r in rows], title)


def _nats(x: Any) -> str:
    return _num(x, "+.4g")


def _nats_ci(ci: Any) -> str:
    return "-" if not ci else f"[{_nats(ci[0])}, {_nats(ci[1])}]"


def format_erasure_table(summary: Mapping[str, Any], model: str = "this model",
                         paper: Mapping[str, Any] | None = PAPER_ERASURE) -> str:
    """Tables 18-19 of the paper: erasure at firings, the control at non-firing positions, the dose sweep."""
    p = paper or {}
    cfg, det = summary.get("config", {}), summary.get("detection", {})
    pf, pc = p.get("firing", {}), p.get("control", {})
    f = summary.get("firing", {})
    wil = f.get("wilcoxon", {})
    rows = [
        ["preferred token (feature detection, summed nats)", f"id {cfg.get('target')} ({_num(det.get('summed_nats'))})",
         f"id 98818 ({_num(p.get('detection', {}).get('preferred_token_summed_nats'))})" if p else "-"],
        ["median natural activation a*", _num(cfg.get("a_star")), _num(p.get("detection", {}).get("median_activation"))],
        ["erasure at firings: n", str(f.get("n", "-")), str(pf.get("n", "-"))],
        ["  median delta log p (preferred token)", _nats(f.get("median_delta_logp")), _nats(pf.get("median_delta_logp"))],
        ["  95% bootstrap CI of the median", _nats_ci(f.get("median_ci")), _nats_ci(pf.get("median_ci"))],
        ["  mean delta log p", _nats(f.get("mean_delta_logp")), _nats(pf.get("mean_delta_logp"))],
        [f"  paired Wilcoxon signed-rank p ({wil.get('alternative', '-')})", _num(wil.get("p_value"), ".3g"),
         _num(pf.get("wilcoxon_p"), ".3g")],
        ["  median rank native -> erased", f"{_num(f.get('native_median_rank'), '.6g')} -> {_num(f.get('patched_median_rank'), '.6g')}",
         f"{pf['native_median_rank']} -> {pf['patched_median_rank']}" if pf else "-"],
    ]
    for dose, c in summary.get("control", {}).items():
        pd = pc.get(float(dose), {})
        rows.append([f"write m a* at non-firing positions, m={_num(float(dose), 'g')}: median delta log p (n={c['n']})",
                     f"{_nats(c['median_delta_logp'])} (p={_num(c['wilcoxon']['p_value'], '.2g')})",
                     f"{_nats(pd['median_delta_logp'])} (p={_num(pd['wilcoxon_p'], '.2g')})" if pd else "-"])
    sweep = summary.get("dose_sweep")
    if sweep:
        fit = sweep.get("linregress") or {}
        medians = ", ".join(f"{_num(m, 'g')}x: {_nats(v)}" for m, v in sweep["median_by_dose"].items())
        rows.append([f"dose sweep, n={sweep['n_positions']} x {len(sweep['median_by_dose'])} magnitudes: medians", medians,
                     "weakly monotone" if p else "-"])
        rows.append(["  least-squares slope of delta log p on m (p)", f"{_num(fit.get('slope'))} (p={_num(fit.get('p_value'), '.2g')})",
                     str(p.get("dose_sweep", {}).get("linear_fit", "-"))])
    return _table(rows, paper, _title(f"Cache-slot erasure of feature {cfg.get('feature')}", model, summary, paper))


def format_sign_table(summary: Mapping[str, Any], model: str = "this model",
                      paper: Mapping[str, Any] | None = PAPER_SIGN_PREDICTION) -> str:
    """App. I.5: single-position sign prediction."""
    p = paper or {}
    rows = [
        ["trials (feature, position, target)", str(summary.get("n", "-")), str(p.get("n", "-"))],
        ["sign agreement of predicted and measured logit change", _pct(summary.get("sign_accuracy")), _pct(p.get("sign_accuracy"))],
        ["  Wilson 95% CI", _ci(summary.get("sign_ci")), _ci(p.get("sign_ci"))],
        ["Pearson r (predicted, measured)", f"{_num(summary.get('pearson_r'))} (p={_num(summary.get('pearson_p'), '.2g')})",
         f"{_num(p.get('pearson_r'))} (p={_num(p.get('pearson_p'), '.2g')})" if p else "-"],
        ["pooled R^2 of the unfitted prediction", _num(summary.get("pooled_r2")), _num(p.get("pooled_r2"))],
        ["median measured / predicted", _num(summary.get("median_ratio")), _num(p.get("median_ratio"))],
        ["features", str(len(summary.get("per_feature", {}))), "-"],
    ]
    return _table(rows, paper, _title("Single-position sign prediction", model, summary, paper))


def format_installs_table(summary: Mapping[str, Any], model: str = "this model",
                          paper: Mapping[str, Any] | None = PAPER_INSTALLS) -> str:
    """Table 3 and App. I.6 Tables 20-21: target inclusion in the greedy continuation by stratum
    and magnitude, with the native rate, rank shift and first-step lift."""
    p = paper or {}
    at3 = p.get("at_m3", {})
    pooled_paper = p.get("pooled_inclusion", {})
    cfg = summary.get("config", {})
    rows = []
    for stratum, by_m in sorted(summary.get("strata", {}).items(), key=lambda kv: (kv[0] == "pooled", kv[0])):
        for m, s in sorted(by_m.items(), key=lambda kv: float(kv[0])):
            if stratum == "pooled":
                ref = (f"{_pct(pooled_paper.get(float(m)))} (native {_pct(p.get('native_pooled_inclusion'))}, n={p.get('pooled_n')})"
                       if float(m) in pooled_paper else "-")
            else:
                q = at3.get(stratum, {}) if float(m) == 3.0 else {}
                ref = (f"{_pct(q['edited'])} (native {_pct(q['native'])}, rank shift {q['median_rank_shift']}, "
                       f"n={p.get('per_stratum_n')})" if q else "-")
            rows.append([f"{stratum}, m={_num(float(m), 'g')}: target in continuation (n={s['n']})",
                         f"{_pct(s['inclusion'])} {_ci(s['inclusion_ci'])} (native {_pct(s['native_inclusion'])}, "
                         f"lift {s['lift_pp']:+.1f} pt, rank shift {_num(s['median_rank_shift'], 'g')}, "
                         f"rank improved {_pct(s['rank_improved'])}, first-step lift {_nats(s['median_logp_lift'])} nats)", ref])
    rows.append(["pooled inclusion non-monotone in m (best m)",
                 f"{summary.get('non_monotone')} ({_num(summary.get('best_multiplier'), 'g')})",
                 "True (3)" if p else "-"])
    m3 = summary.get("strata", {}).get("pooled", {}).get(3.0)
    if m3:
        rows.append(["pooled, m=3: rank improved / first-step log p lift", f"{_pct(m3['rank_improved'])} / {_nats(m3['median_logp_lift'])} nats",
                     f"{_pct(p.get('rank_improved_m3'))} / {_nats(p.get('first_step_logp_lift_m3'))} nats" if p else "-"])
    sizes = (f"{cfg.get('n_contexts', '?')} contexts x {len(cfg.get('starts', []))} starts x "
             f"{cfg.get('targets_per_stratum', '?')} targets per stratum (paper: 30 x 5 x 2 = 300); "
             f"rank thresholds {cfg.get('thresholds', {})}")
    return _table(rows, paper, _title("Sustained installs (greedy decoding)", model, summary, paper) + f"\nsizes: {sizes}")


def format_amplification_table(summary: Mapping[str, Any], model: str = "this model",
                               paper: Mapping[str, Any] | None = PAPER_AMPLIFICATION) -> str:
    """Table 4: newlines (paired t-test against the baseline, Bonferroni over the amplified doses),
    paragraphs and word length per condition."""
    p = (paper or {}).get("conditions", {})
    cfg = summary.get("config", {})
    rows = []
    for name, c in summary.get("conditions", {}).items():
        test = (f"; t-test vs baseline p={_num(c.get('p_raw'), '.2g')}"
                + (f", Bonferroni p={_num(c['p_bonferroni'], '.2g')}" if "p_bonferroni" in c else "")
                + f", d_z={_num(c.get('cohens_d'), '.2f')}") if "p_raw" in c else ""
        ours = (f"newlines {_num(c['newlines'], '.3g')} [{_num(c['newlines_ci'][0], '.3g')}, {_num(c['newlines_ci'][1], '.3g')}], "
                f"paragraphs {_num(c['paragraphs'], '.3g')}, word length {_num(c['word_length'], '.3g')}{test}")
        q = p.get(name)
        ref = (f"newlines {q['newlines']} [{q['newlines_ci'][0]}, {q['newlines_ci'][1]}], paragraphs {q['paragraphs']}, "
               f"word length {q['word_length']}" + (f"; p={q['p_raw']}" if "p_raw" in q else "")) if q else "-"
        rows.append([f"{name} (n={c['n']} prompts)", ours, ref])
    sizes = (f"{cfg.get('n_prompts', '?')} prompts x {cfg.get('max_new_tokens', '?')} tokens at temperature "
             f"{cfg.get('temperature', '?')} (paper: 40 x 400 at 0.7); features {cfg.get('features')}, "
             f"random control {cfg.get('random_features')}")
    return _table(rows, paper, _title("Boundary-feature amplification", model, summary, paper) + f"\nsizes: {sizes}")


__all__ = ["format_erasure_table", "format_sign_table", "format_installs_table", "format_amplification_table"]
