"""Feature amplification (paper section 4 "Newline-rate edit", Table 4, Fig. 6; docs/method.md,
"Cache interventions").

The primitive (:func:`amplified`, :func:`amplified_generate`): add an offset to chosen SAE
coefficients at every position while the model runs or decodes. The SAE is spliced with its error
term on, so the site's activation becomes ``x + decode(z + offset) - decode(z)``: exactly ``x``
plus ``offset`` times the chosen atoms, and nothing else about the model changes.

The paper's protocol (:func:`run_amplification`): score each feature by its mean code on
sentence-boundary tokens minus its mean code on the other tokens, take the top 10, and generate
(400 tokens, temperature 0.7, 40 prompts) with an offset of ``dose`` x each feature's mean
boundary activation added to their codes, at doses 1, 2, 5, 10 (Table 4 prints 2, 5, 10; the
Bonferroni correction runs over the four). The dose-matched control amplifies random features of
the same dictionary (alive ones, outside the selection) with the same offsets at 10x. The primary
readout is newlines per generation; paragraphs and mean word length are surface checks. Conditions
are paired: every condition samples with the same seed from the same prompts.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from jaxtyping import Bool, Int
from sae_lens import SAE
from scipy import stats
from torch import Tensor
from tqdm.auto import tqdm

from hooked_ssm import HookedSSM
from writesae_lens.analysis.stats import bootstrap_ci
from writesae_lens.interventions.engine import prompt_batches
from writesae_lens.interventions.observe import observe_site
from writesae_lens.interventions.protocol import describe_options
from writesae_lens.interventions.sites import resolve_site
from writesae_lens.sae_checks import check_atoms
from writesae_lens.splicing import HookedSAESSM, sae_site_name


@contextmanager
def amplified(model: Any, sae: Any, features: Sequence[int], offset: float | Tensor) -> Iterator[HookedSAESSM]:
    """Within the block, ``model`` runs with ``offset`` added to ``features`` of ``sae``'s code.

    ``model`` is converted in place to a :class:`HookedSAESSM` if it is a plain ``HookedSSM``.
    """
    sae_model = model if isinstance(model, HookedSAESSM) else HookedSAESSM.from_hooked_ssm(model)
    site = sae_site_name(sae.cfg.metadata.hook_name, sae.cfg.metadata.hook_head_index)
    index = torch.as_tensor(check_atoms(sae, features, "features"), dtype=torch.long)

    def add_offset(acts: Tensor, hook: Any) -> Tensor:
        acts = acts.clone()
        acts[..., index.to(acts.device)] += torch.as_tensor(offset, dtype=acts.dtype, device=acts.device)
        return acts

    with sae_model.saes(saes=[sae], use_error_term=True):
        with sae_model.hooks(fwd_hooks=[(f"{site}.hook_sae_acts_post", add_offset)]):
            yield sae_model


def amplified_generate(
    model: Any, sae: Any, features: Sequence[int], offset: float | Tensor, tokens: Tensor, max_new_tokens: int = 20,
    **generate_kwargs: Any,
) -> Tensor:
    """Greedy continuation (by default) of ``tokens`` with the features amplified at every position."""
    kwargs = {"do_sample": False, "verbose": False, "stop_at_eos": False, **generate_kwargs}
    with amplified(model, sae, features, offset) as sae_model:
        return sae_model.generate(tokens, max_new_tokens=max_new_tokens, **kwargs)




# ---------------------------------------------------------------- the paper's dose-response table
#: The paper's numbers (Qwen3.5-4B-Base L9, held out; section 4 Table 4, Fig. 6): means over
#: 40 prompts x 400 tokens at temperature 0.7, 95% bootstrap CIs.
PAPER_AMPLIFICATION: dict[str, object] = {
    "label": "paper (Qwen3.5-4B-Base L9, 40 prompts x 400 tokens)",
    "conditions": {
        "baseline": {"newlines": 16.8, "newlines_ci": (14.8, 18.9), "paragraphs": 7.5, "word_length": 5.54},
        "amplify 2x": {"newlines": 12.7, "newlines_ci": (10.1, 15.5), "paragraphs": 6.3, "word_length": 5.34, "p_raw": 0.015},
        "amplify 5x": {"newlines": 11.2, "newlines_ci": (8.6, 13.9), "paragraphs": 6.2, "word_length": 5.24,
                       "p_raw": 0.001, "p_bonferroni": 0.004, "cohens_d": 0.55},
        "amplify 10x": {"newlines": 13.4, "newlines_ci": (10.1, 16.8), "paragraphs": 7.4, "word_length": 5.29},
        "random 10x": {"newlines": 19.0, "newlines_ci": (17.2, 20.8), "paragraphs": 7.8, "word_length": 5.50},
    },
}


@dataclass(frozen=True)
class AmplificationOptions:
    """The choices the paper leaves open, with this project's defaults (stated in every report)."""

    doses: tuple[float, ...] = (1.0, 2.0, 5.0, 10.0)
    control_dose: float = 10.0
    n_features: int = 10
    boundary_chars: str = ".!?"
    max_new_tokens: int = 400
    temperature: float = 0.7


def boundary_mask(model: HookedSSM, tokens: Int[Tensor, "n pos"], chars: str) -> Bool[Tensor, "n pos"]:
    """Sentence-boundary tokens: those whose text, stripped of whitespace, ends with one of ``chars``."""
    vocab = torch.tensor([bool(s.strip()) and s.strip()[-1] in chars
                          for s in model.to_str_tokens(torch.arange(model.cfg.d_vocab))])
    return vocab[tokens.cpu()]


@torch.no_grad()
def boundary_features(
    model: HookedSSM, sae: SAE, tokens: Int[Tensor, "n pos"], options: AmplificationOptions, batch_size: int = 8
) -> dict[str, Tensor]:
    """The paper's selection: score each feature by its mean code on sentence-boundary tokens minus
    its mean code on the other tokens; the top ``n_features``, each with its mean boundary
    activation (the unit of the dose). Also the pool of alive features (non-zero somewhere)."""
    site = resolve_site(model, sae)
    boundary = boundary_mask(model, tokens, options.boundary_chars)
    if not boundary.any() or boundary.all():
        raise ValueError(f"The text needs both boundary tokens (ending with {options.boundary_chars!r}) and others.")
    on = torch.zeros(sae.cfg.d_sae, dtype=torch.float64)
    off = torch.zeros_like(on)
    alive = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    for ids, batch in prompt_batches(list(tokens), batch_size):
        codes = observe_site(model, batch, site, sae, logits=False)["codes"].double().cpu()
        mask = boundary[ids]
        on += codes[mask].sum(0)
        off += codes[~mask].sum(0)
        alive |= (codes != 0).flatten(0, 1).any(0)
    mean_on, mean_off = on / boundary.sum(), off / (~boundary).sum()
    features = (mean_on - mean_off).topk(options.n_features).indices
    return dict(features=features, boundary_activation=mean_on[features].float(), score=(mean_on - mean_off)[features].float(),
                alive=torch.nonzero(alive).flatten())


def text_metrics(text: str) -> dict[str, float]:
    """The paper's readouts of one generation: newlines, paragraphs (blocks between blank lines) and
    mean word length in characters."""
    words = text.split()
    return dict(newlines=float(text.count("\n")), paragraphs=float(len([b for b in re.split(r"\n\s*\n", text) if b.strip()])),
                word_length=float(np.mean([len(w) for w in words])) if words else float("nan"))


@torch.no_grad()
def run_amplification(
    model: HookedSSM,
    sae: SAE,
    prompts: Int[Tensor, "n pos"],
    *,
    scoring_tokens: Int[Tensor, "m pos"],
    options: AmplificationOptions = AmplificationOptions(),
    seed: int = 0,
    progress: bool = True,
) -> tuple[list[dict], dict]:
    """Generate from ``prompts`` (sampling at ``temperature``, the same seed in every condition so
    the conditions are paired) under: the unmodified model, the boundary features amplified at each
    dose, and ``n_features`` random alive features amplified with the same offsets at
    ``control_dose``. One row per (condition, prompt) with its text metrics."""
    site = resolve_site(model, sae)
    chosen = boundary_features(model, sae, scoring_tokens, options)
    pool = chosen["alive"][~torch.isin(chosen["alive"], chosen["features"])]
    if pool.numel() < options.n_features:
        raise ValueError(f"Only {pool.numel()} alive features outside the selected ones; the random control needs {options.n_features}.")
    generator = torch.Generator().manual_seed(seed)
    random_features = pool[torch.randperm(pool.numel(), generator=generator)[: options.n_features]]
    conditions: list[tuple[str, float, Tensor | None]] = [("baseline", 0.0, None)]
    conditions += [(f"amplify {dose:g}x", dose, chosen["features"]) for dose in options.doses]
    conditions.append((f"random {options.control_dose:g}x", options.control_dose, random_features))
    kwargs = dict(max_new_tokens=options.max_new_tokens, do_sample=True, temperature=options.temperature,
                  stop_at_eos=False, verbose=False, return_type="tokens")
    rows: list[dict] = []
    for name, dose, features in tqdm(conditions, disable=not progress, desc="amplification"):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if features is None:
                tokens = model.generate(prompts, **kwargs)
            else:
                tokens = amplified_generate(model, sae, features.tolist(), dose * chosen["boundary_activation"], prompts, **kwargs)
        for i, text in enumerate(model.to_string(tokens[:, prompts.shape[1]:])):
            rows.append(dict(condition=name, dose=dose, prompt=i, **text_metrics(text)))
    summary = summarize_amplification(rows, seed=seed)
    summary["variant"] = describe_options(options)
    summary["config"] = dict(dataclasses.asdict(options), layer=site.layer, head=site.head, features=chosen["features"].tolist(),
                             boundary_activation=chosen["boundary_activation"].tolist(),
                             random_features=random_features.tolist(), n_prompts=len(prompts))
    return rows, summary


def summarize_amplification(rows: Sequence[Mapping], seed: int = 0) -> dict:
    """Per condition, the mean of each metric over prompts with a 95% bootstrap CI
    (``scipy.stats.bootstrap``); against the baseline, the paired t-test of newlines
    (``scipy.stats.ttest_rel``), Cohen's d_z (= t / sqrt(n)) and the Bonferroni-adjusted p over
    the amplified doses (statsmodels)."""
    from statsmodels.stats.multitest import multipletests

    by_condition: dict[str, list[Mapping]] = {}
    for r in rows:
        by_condition.setdefault(r["condition"], []).append(r)
    base = np.array([r["newlines"] for r in sorted(by_condition.get("baseline", []), key=lambda r: r["prompt"])])
    out: dict[str, dict] = {}
    for name, group in by_condition.items():
        group = sorted(group, key=lambda r: r["prompt"])
        entry: dict[str, object] = {"n": len(group), "dose": group[0]["dose"]}
        for metric in ("newlines", "paragraphs", "word_length"):
            x = np.array([r[metric] for r in group])
            x = x[np.isfinite(x)]
            entry[metric] = float(x.mean()) if x.size else float("nan")
            entry[f"{metric}_ci"] = bootstrap_ci(x, np.mean, seed=seed)
        if name != "baseline" and base.size > 1:
            x = np.array([r["newlines"] for r in group])
            diff = x - base
            if np.any(diff != 0):
                test = stats.ttest_rel(x, base)
                entry.update(t=float(test.statistic), p_raw=float(test.pvalue), cohens_d=float(test.statistic) / np.sqrt(x.size))
            else:
                entry.update(t=0.0, p_raw=1.0, cohens_d=0.0)
        out[name] = entry
    amplified_names = [n for n in out if n.startswith("amplify") and "p_raw" in out[n]]
    if amplified_names:
        adjusted = multipletests([out[n]["p_raw"] for n in amplified_names], method="bonferroni")[1]
        for n, p in zip(amplified_names, adjusted):
            out[n]["p_bonferroni"] = float(p)
    return {"conditions": out}


__all__ = ["amplified", "amplified_generate", "PAPER_AMPLIFICATION", "AmplificationOptions", "boundary_mask",
           "boundary_features", "text_metrics", "run_amplification", "summarize_amplification"]
