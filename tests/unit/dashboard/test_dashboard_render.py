"""Page pieces of the dashboard: figures are valid Plotly figures, token text is escaped and marked."""

import re

import plotly.graph_objects as go

from writesae_lens.dashboard.render import (
    context_text,
    display_token,
    histogram_figure,
    logit_figure,
    overview_figure,
    render_context,
    render_site,
    substitution_figure,
)

VOCAB = {"1": "<script>", "2": " a\nb", "3": "&"}
CONTEXT = dict(window=0, position=7, focus=1, score=0.5, tokens=[1, 2, 3], act=[0.0, 0.5, 0.1],
               write=[0.01, 0.2, 0.05], read=[0.1, -0.3, 0.2], in_state=[False, True, True])
ATOM = dict(atom=4, cls="register", n_firings=9, density=0.1, mean_act=0.3, max_act=0.5, median_cos=None, p_register=0.9,
            histogram=dict(edges=[0.0, 0.25, 0.5], counts=[4, 5]), logit_histogram=dict(edges=[-1.0, 0.0, 1.0], counts=[2, 2]),
            top_contexts=[CONTEXT], read_contexts=[CONTEXT], key_tokens=[dict(token=2, cos=0.8, count=3)],
            promoted=[dict(token=1, logit=0.2)], suppressed=[dict(token=3, logit=-0.1)])


def test_figures_pass_plotly_validation():
    # go.Figure validates every property: the dicts written to the pages are real Plotly figures.
    go.Figure(overview_figure([ATOM, dict(ATOM, atom=5, cls="bundle", median_cos=0.1)]))
    go.Figure(histogram_figure(ATOM["histogram"]))
    go.Figure(logit_figure(ATOM, lambda t: VOCAB[str(t)]))
    go.Figure(substitution_figure(dict(kl=dict(atom=[1e-8, 0.0], delete=[2e-8]))))


def test_context_rendering_escapes_and_marks_tokens():
    html = str(render_context(CONTEXT, "read", VOCAB))
    assert "<script>" not in html and "&lt;script&gt;" in html and "&amp;" in html
    classes = re.findall(r'class="([^"]*)"', html)
    assert classes == ["tok out", "tok focus wr", "tok"]  # first: not in the state; second: ranked, a write
    assert display_token(" a\nb") == " a⏎b"
    assert context_text(CONTEXT, VOCAB) == "<script>[« a⏎b»]&"


def test_render_site_removes_pages_of_atoms_no_longer_listed(tmp_path):
    data = dict(meta=dict(model="m", hook_name="blocks.0.mixer.hook_write", layer=0, head=0, site="write", d_sae=8,
                          d_k=2, d_v=2, architecture="writesae", n_windows=1, context_size=8, n_tokens=7,
                          n_alive=1, config=dict(min_firings=1, presence=0.5, min_key_count=2)),
                partition=dict(registers=1, bundles=0, delta_bic=None), vocab=VOCAB, atoms=[ATOM])
    (tmp_path / "atoms").mkdir()
    (tmp_path / "atoms" / "7.html").write_text("old")
    index = render_site(data, tmp_path, progress=False)
    assert sorted(p.name for p in (tmp_path / "atoms").iterdir()) == ["4.html"]
    assert index.read_text().count('href="atoms/') == 1 and "–" in (tmp_path / "atoms" / "4.html").read_text()
