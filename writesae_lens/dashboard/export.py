"""The dashboard data in the batch layout SAEDashboard's Neuronpedia runner writes and Neuronpedia
imports (``{"model_id", "layer", "sae_set", "features": [...]}``, one feature per alive atom), so
write atoms can be uploaded beside residual features.

What maps onto their fields: ``feature_index`` = atom; ``pos_str`` / ``pos_values`` and
``neg_str`` / ``neg_values`` = the closed-form logit effect of ``w`` at unit read (their "logits
table" is the decoder direction through the unembedding; ours goes through the head's ``W_O[h]``
first); ``frac_nonzero`` = firing density; ``freq_hist_data_*`` = the activation histogram (bar
centres, counts); ``logits_hist_data_*`` = the histogram of that logit effect over the vocabulary;
``activations`` = the top-activating snippets (``bin_min = -1``, ``bin_max`` = max activation,
``bin_contains = -1``: SAEDashboard's "top activations" group). What their layout cannot hold (the
read contexts, ``u``'s nearest tokens, write positions, the register / bundle class, substitution
results) stays in the site's ``data.json``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from writesae_lens.dashboard.data import DashboardData, json_safe


def _centres(edges: Sequence[float]) -> list[float]:
    return [round((lo + hi) / 2, 6) for lo, hi in zip(edges[:-1], edges[1:])]


def neuronpedia_feature(atom: Mapping[str, Any], vocab: Mapping[str, str], meta: Mapping[str, Any], dataset: str) -> dict[str, Any]:
    """One atom as a Neuronpedia dashboard feature."""

    def strings(items: Sequence[Mapping[str, Any]]) -> list[str]:
        return [vocab.get(str(i["token"]), "") for i in items]

    return dict(
        feature_index=atom["atom"],
        neuron_alignment_indices=[], neuron_alignment_values=[], neuron_alignment_l1=[],
        correlated_neurons_indices=[], correlated_neurons_l1=[], correlated_neurons_pearson=[],
        correlated_features_indices=[], correlated_features_l1=[], correlated_features_pearson=[],
        neg_str=strings(atom["suppressed"]), neg_values=[i["logit"] for i in atom["suppressed"]],
        pos_str=strings(atom["promoted"]), pos_values=[i["logit"] for i in atom["promoted"]],
        frac_nonzero=atom["density"],
        freq_hist_data_bar_values=_centres(atom["histogram"]["edges"]),
        freq_hist_data_bar_heights=atom["histogram"]["counts"],
        logits_hist_data_bar_values=_centres(atom["logit_histogram"]["edges"]),
        logits_hist_data_bar_heights=atom["logit_histogram"]["counts"],
        n_prompts_total=meta["n_windows"], n_tokens_in_prompt=meta["context_size"], dataset=dataset,
        decoder_weights_dist=[],
        activations=[
            dict(bin_min=-1, bin_max=atom["max_act"], bin_contains=-1,
                 tokens=[vocab.get(str(t), "") for t in c["tokens"]], values=c["act"])
            for c in atom["top_contexts"]
        ],
    )


def export_neuronpedia(
    data: DashboardData, out_dir: str | Path, model_id: str | None = None, sae_set: str | None = None,
    dataset: str = "", features_per_batch: int = 128,
) -> list[Path]:
    """Write ``batch-<n>.json`` files (``features_per_batch`` atoms each) into ``out_dir``.

    ``model_id`` defaults to the model name, ``sae_set`` to ``<site>-h<head>`` (e.g. ``write-h0``:
    Neuronpedia names a source ``<layer>-<sae_set>``)."""
    meta = data["meta"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    features = [neuronpedia_feature(a, data["vocab"], meta, dataset) for a in data["atoms"]]
    paths = []
    for n, start in enumerate(range(0, max(len(features), 1), features_per_batch)):
        batch = dict(model_id=model_id or meta["model"], layer=meta["layer"],
                     sae_set=sae_set or f"{meta['site']}-h{meta['head']}", features=features[start : start + features_per_batch])
        path = out / f"batch-{n}.json"
        staged = path.with_name(f".{path.name}.tmp")
        staged.write_text(json.dumps(json_safe(batch), allow_nan=False), encoding="utf-8")
        staged.replace(path)
        paths.append(path)
    return paths


__all__ = ["export_neuronpedia", "neuronpedia_feature"]
