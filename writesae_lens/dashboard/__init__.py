"""Atom dashboards: what each write atom stores, when it is written and when it is read.

``build_dashboard(model, sae, texts, out_dir, substitution_rows=None)`` computes each alive atom's
contexts, statistics and factor views in one streaming pass (:mod:`.data`, cached), renders a
static site that opens from disk (:mod:`.render`) and exports Neuronpedia batch files
(:mod:`.export`); ``writesae dashboard`` is the command (:mod:`.cli`).
"""

from writesae_lens.dashboard.build import build_dashboard
from writesae_lens.dashboard.data import DashboardConfig, DashboardData, compute_dashboard_data
from writesae_lens.dashboard.export import export_neuronpedia
from writesae_lens.dashboard.measured import load_substitution_rows, substitution_by_atom
from writesae_lens.dashboard.render import context_text, render_site

__all__ = [
    "build_dashboard",
    "compute_dashboard_data",
    "DashboardConfig",
    "DashboardData",
    "render_site",
    "context_text",
    "export_neuronpedia",
    "load_substitution_rows",
    "substitution_by_atom",
]
