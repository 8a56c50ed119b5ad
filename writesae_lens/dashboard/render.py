"""The static site: ``index.html`` (sortable table of alive atoms) and ``atoms/<i>.html`` (one page
per atom), rendered with Jinja2 templates and Plotly figures.

Everything opens from disk with no server and no network: CSS and the table-sorting script are
inlined in each page, and Plotly's own bundled ``plotly.min.js`` (shipped inside the ``plotly``
package) is written once to ``assets/`` and loaded by a relative ``<script src>``, which browsers
allow on ``file://`` (inlining it would add ~4.6 MB to every page).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2
import plotly.io as pio
from markupsafe import Markup, escape
from plotly.offline import get_plotlyjs
from tqdm.auto import tqdm

from writesae_lens.dashboard.data import DashboardData

CLASS_COLOURS = {"register": "#2b7bd0", "bundle": "#e0862d", "dead": "#9aa0a6"}
WRITE_MARK = 0.3  # a snippet token is marked as a write position at >= 30% of the snippet's largest write
_PLOT_CONFIG = dict(displayModeBar=False, responsive=True)
Figure = dict[str, Any]  # Plotly's figure JSON: {"data": [...], "layout": {...}}
_INVISIBLE = {"\n": "⏎", "\t": "⇥", "\r": "␍"}


def display_token(text: str) -> str:
    """A token's text with newlines, tabs and carriage returns made visible."""
    for raw, shown in _INVISIBLE.items():
        text = text.replace(raw, shown)
    return text


def _template_text(name: str) -> str:
    return resources.files("writesae_lens.dashboard").joinpath("templates", name).read_text(encoding="utf-8")


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("writesae_lens.dashboard", "templates"),
        autoescape=jinja2.select_autoescape(["j2", "html"]),
        undefined=jinja2.StrictUndefined,
    )
    env.globals["zip"] = zip
    env.filters["fmt"] = lambda value, spec: "–" if value is None else format(value, spec)
    return env


def _figure_html(fig: Figure, div_id: str) -> str:
    return pio.to_html(fig, full_html=False, include_plotlyjs=False, config=_PLOT_CONFIG, div_id=div_id,
                       validate=False)


@functools.cache
def _template() -> dict[str, Any]:
    # Resolved once: Plotly's JavaScript needs the template object, not its name, when the figure
    # dict is not run through plotly.py's validators (which copy the template per figure: ~0.1 s).
    return pio.templates["plotly_white"].to_plotly_json()


def _figure(traces: list[dict[str, Any]], height: int, left: int = 50, **layout: Any) -> Figure:
    """A figure as Plotly's JSON dict (what ``go.Figure(...).to_dict()`` would give)."""
    return dict(data=traces, layout=dict(height=height, margin=dict(l=left, r=10, t=10, b=40), template=_template(), **layout))


# ---------------------------------------------------------------- figures
def overview_figure(atoms: Sequence[Mapping[str, Any]]) -> Figure:
    """Firing density (log) against the median cosine to native writes, one point per alive atom."""
    traces = []
    for cls, colour in CLASS_COLOURS.items():
        group = [a for a in atoms if a["cls"] == cls]
        if group:
            traces.append(dict(
                type="scatter", x=[a["density"] for a in group], y=[a["median_cos"] for a in group], mode="markers",
                name=cls, marker=dict(color=colour, size=7, opacity=0.75), text=[f"atom {a['atom']}" for a in group],
                hovertemplate="%{text}<br>density %{x:.3g}<br>cos %{y:.3f}<extra></extra>",
            ))
    return _figure(traces, 320, xaxis=dict(type="log", title=dict(text="firing density")),
                   yaxis=dict(title=dict(text="median cos(atom, native write)")))


def histogram_figure(histogram: Mapping[str, Sequence[float]]) -> Figure:
    edges, counts = histogram["edges"], histogram["counts"]
    centres = [(lo + hi) / 2 for lo, hi in zip(edges[:-1], edges[1:])]
    widths = [hi - lo for lo, hi in zip(edges[:-1], edges[1:])]
    bar = dict(type="bar", x=centres, y=list(counts), width=widths, marker=dict(color="#e0862d"),
               hovertemplate="act %{x:.3g}<br>%{y} firings<extra></extra>")
    return _figure([bar], 240, xaxis=dict(title=dict(text="activation")), yaxis=dict(title=dict(text="firings")), bargap=0.02)


def logit_figure(atom: Mapping[str, Any], tok: Callable[[int], str]) -> Figure:
    """Horizontal bars: the top promoted and suppressed tokens (labels carry the id: strings repeat)."""
    items = sorted([*atom["suppressed"], *atom["promoted"]], key=lambda item: item["logit"])
    bar = dict(type="bar", orientation="h", x=[i["logit"] for i in items],
               y=[f"{tok(i['token'])!r} #{i['token']}" for i in items],
               marker=dict(color=["#2a9d5c" if i["logit"] > 0 else "#d0473a" for i in items]),
               hovertemplate="%{y}: %{x:+.4f}<extra></extra>")
    return _figure([bar], 40 + 16 * len(items), left=140, xaxis=dict(title=dict(text="logit per unit read")))


def substitution_figure(sub: Mapping[str, Any]) -> Figure:
    colours = {"atom": "#2b7bd0", "delete": "#9aa0a6", "random": "#d0473a"}
    traces = [
        dict(type="box", y=[max(v, 1e-12) for v in values], name=condition, boxpoints="all", jitter=0.4, pointpos=0,
             marker=dict(size=4, color=colours.get(condition)), line=dict(width=1))
        for condition, values in sub["kl"].items()
    ]
    return _figure(traces, 280, yaxis=dict(type="log", exponentformat="power", title=dict(text="KL(patched || base)")),
                   showlegend=False)


# ---------------------------------------------------------------- token rendering
def _colour(value: float, scale: float, channel: str) -> str:
    alpha = 0.0 if scale <= 0 else min(abs(value) / scale, 1.0) * 0.85
    if channel == "act":
        return f"rgba(255,140,0,{alpha:.3f})"
    return f"rgba(40,110,220,{alpha:.3f})" if value >= 0 else f"rgba(220,60,40,{alpha:.3f})"


def render_context(context: Mapping[str, Any], channel: str, vocab: Mapping[str, str], scale: float | None = None) -> Markup:
    """Token spans coloured by ``channel`` (``"act"``: the code, orange; ``"read"``: ``u . q``, blue /
    red, greyed where the atom is not in the state). Write positions are underlined, the ranked
    position boxed; every token's numbers are in its tooltip."""
    values = context[channel]
    shown = [v if (channel == "act" or s) else 0.0 for v, s in zip(values, context["in_state"])]
    scale = scale if scale is not None else max((abs(v) for v in shown), default=0.0)
    top_write = max(context["write"], default=0.0)
    spans = []
    for i, token in enumerate(context["tokens"]):
        classes = ["tok"]
        if i == context["focus"]:
            classes.append("focus")
        if top_write > 0 and context["write"][i] >= WRITE_MARK * top_write:
            classes.append("wr")
        if channel == "read" and not context["in_state"][i]:
            classes.append("out")
        title = (f"act {context['act'][i]:.4g} | write {context['write'][i]:+.4g} | u·q {context['read'][i]:+.4g}"
                 f" | {'in' if context['in_state'][i] else 'not in'} the state")
        text = display_token(vocab.get(str(token), f"<{token}>"))
        spans.append(f'<span class="{" ".join(classes)}" style="background:{_colour(shown[i], scale, channel)}" '
                     f'title="{escape(title)}">{escape(text)}</span>')
    return Markup("".join(spans))


def context_text(context: Mapping[str, Any], vocab: Mapping[str, str]) -> str:
    """A context as plain text (for notebooks and terminals): the ranked token in ``[...]``, write
    positions (as marked on the page) in ``«...»``."""
    top_write = max(context["write"], default=0.0)
    pieces = []
    for i, token in enumerate(context["tokens"]):
        text = display_token(vocab.get(str(token), f"<{token}>"))
        if top_write > 0 and context["write"][i] >= WRITE_MARK * top_write:
            text = f"«{text}»"
        pieces.append(f"[{text}]" if i == context["focus"] else text)
    return "".join(pieces)


def _snippet(atom: Mapping[str, Any], vocab: Mapping[str, str], before: int = 8, after: int = 2) -> str:
    if not atom["top_contexts"]:
        return ""
    c = atom["top_contexts"][0]
    f = c["focus"]
    pieces = [display_token(vocab.get(str(t), "")) for t in c["tokens"][max(0, f - before) : f + after + 1]]
    focus = f - max(0, f - before)
    pieces[focus] = f"[{pieces[focus]}]"
    return "".join(pieces)


# ---------------------------------------------------------------- the site
def render_site(
    data: DashboardData,
    out_dir: str | Path,
    substitution: Mapping[int, Mapping[str, Any]] | None = None,
    progress: bool = True,
) -> Path:
    """Write the site for ``data`` (from :func:`compute_dashboard_data`) into ``out_dir``; returns
    the index path. ``substitution``: per-atom results from :func:`substitution_by_atom`."""
    out = Path(out_dir)
    (out / "atoms").mkdir(parents=True, exist_ok=True)
    (out / "assets").mkdir(exist_ok=True)
    plotly_js = out / "assets" / "plotly.min.js"
    staged = plotly_js.with_suffix(".tmp")
    staged.write_text(get_plotlyjs(), encoding="utf-8")
    staged.replace(plotly_js)

    env = _environment()
    vocab = data["vocab"]
    substitution = {int(k): v for k, v in (substitution or {}).items()}

    def tok(token: int) -> str:
        return display_token(vocab.get(str(token), f"<{token}>"))

    common = dict(meta=data["meta"], css=Markup(_template_text("style.css")), tok=tok)
    atoms = data["atoms"]
    order = [a["atom"] for a in atoms]
    for stale in (out / "atoms").glob("*.html"):  # pages of atoms no longer listed (other settings)
        if stale.stem not in {str(a) for a in order}:
            stale.unlink()
    page = env.get_template("atom.html.j2")
    for n, atom in enumerate(tqdm(atoms, disable=not progress, desc="dashboard pages")):
        sub = substitution.get(atom["atom"])
        html = page.render(
            **common, a=atom, sub=sub, has_rows=bool(substitution),
            prev=order[n - 1] if n > 0 else None, next=order[n + 1] if n + 1 < len(order) else None,
            render_context=lambda c, channel: render_context(c, channel, vocab),
            histogram_plot=Markup(_figure_html(histogram_figure(atom["histogram"]), "histogram")),
            logit_plot=Markup(_figure_html(logit_figure(atom, tok), "logits")),
            substitution_plot=Markup(_figure_html(substitution_figure(sub), "substitution")) if sub else "",
        )
        _write(out / "atoms" / f"{atom['atom']}.html", html)
    index = env.get_template("index.html.j2").render(
        **common, atoms=atoms, partition=_known(data["partition"]), substitution=substitution,
        substitution_n=sum(s["n"] for s in substitution.values()),
        overview_plot=Markup(_figure_html(overview_figure(atoms), "overview")),
        sort_js=Markup(_template_text("sort_table.js")), snippet=lambda a: _snippet(a, vocab),
    )
    _write(out / "index.html", index)
    return out / "index.html"


def _known(summary: Mapping[str, Any]) -> dict[str, Any]:
    """The entries that have a value (``json_safe`` turned NaN into ``None``)."""
    return {k: v for k, v in summary.items() if v is not None}


def _write(path: Path, text: str) -> None:
    staged = path.with_name(f".{path.name}.tmp")
    staged.write_text(text, encoding="utf-8")
    staged.replace(path)  # a reader never sees half a page


__all__ = ["render_site", "render_context", "context_text", "display_token", "overview_figure", "histogram_figure", "logit_figure",
           "substitution_figure"]
