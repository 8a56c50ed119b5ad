"""``build_dashboard``: compute (or load from the cache) the atoms' data, render the site, export
the Neuronpedia batch files."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from writesae_lens.dashboard.data import DashboardConfig, DashboardData, compute_dashboard_data
from writesae_lens.dashboard.export import export_neuronpedia
from writesae_lens.dashboard.measured import load_substitution_rows, substitution_by_atom
from writesae_lens.dashboard.render import render_site


def build_dashboard(
    model: Any,
    sae: Any,
    texts: Iterable[str] | Tensor,
    out_dir: str | Path,
    substitution_rows: str | Path | Iterable[Mapping[str, Any]] | None = None,
    *,
    context_size: int = 128,
    max_windows: int | None = None,
    config: DashboardConfig | None = None,
    cache_dir: str | Path | None = None,
    neuronpedia: bool = True,
    progress: bool = True,
) -> DashboardData:
    """Build the atom dashboard of ``sae`` in ``out_dir`` and return its data: what
    :func:`compute_dashboard_data` returns plus ``substitution`` (``{str(atom): per-atom results}``
    of :func:`substitution_by_atom`, empty without rows).

    Args:
        texts: strings (streamed, cut into ``max_windows`` windows of ``context_size`` tokens) or
            token windows ``[n, pos]``.
        substitution_rows: a substitution run's JSONL (``writesae substitute --out``) or its rows;
            adds each atom's win rate and KLs.
        cache_dir: where computed data is cached (default ``out_dir/.cache``); a second call with
            the same model, SAE, corpus and settings skips the model.
        neuronpedia: also write ``neuronpedia/batch-<n>.json`` (SAEDashboard / Neuronpedia layout).

    Writes ``index.html``, ``atoms/<i>.html``, ``assets/plotly.min.js``, ``data.json`` (everything the
    pages show) and, with ``neuronpedia``, the batch files.
    """
    out = Path(out_dir)
    tokens = texts if isinstance(texts, Tensor) else None
    data = compute_dashboard_data(
        model, sae, tokens, texts=None if tokens is not None else texts, context_size=context_size,
        max_windows=max_windows, config=config, cache_dir=cache_dir if cache_dir is not None else out / ".cache",
        progress=progress,
    )
    substitution = None
    if substitution_rows is not None:
        rows = load_substitution_rows(substitution_rows)
        substitution = substitution_by_atom(rows, data["meta"]["layer"], data["meta"]["head"])
    render_site(data, out, substitution, progress=progress)
    site_data = dict(data, substitution={str(k): v for k, v in (substitution or {}).items()})
    (out / "data.json").write_text(json.dumps(site_data, allow_nan=False), encoding="utf-8")
    if neuronpedia:
        export_neuronpedia(data, out / "neuronpedia")
    return site_data


__all__ = ["build_dashboard"]
