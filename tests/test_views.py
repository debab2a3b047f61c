"""What the notebooks and the report show: tables and figures without torch, explanations rendered from saved JSON."""

from __future__ import annotations

import subprocess
import sys

import pandas as pd

from tema import views


def test_the_notebook_helpers_load_neither_torch_nor_pyplot():
    code = "import sys, tema.views; print(sorted(m for m in ('torch', 'matplotlib.pyplot', 'tema.models') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def summary() -> pd.DataFrame:
    rows = []
    for protocol in ("sampled-999", "full"):  # the evaluate stage's order, not alphabetical
        for domain in ("A", "B"):
            for model, base in (("m1", 0.1), ("m2", 0.2)):
                rows.append({"model": model, "protocol": protocol, "domain": domain, "seeds": 2,
                             "mean_MRR": base, "std_MRR": 0.01, "mean_HR@10": 2 * base, "std_HR@10": 0.02})
    return pd.DataFrame(rows)


def test_tables_follow_the_results_they_show():
    table = views.format_table(summary())
    assert list(table.index) == ["m1", "m2"]
    assert [c[0] for c in table.columns][:4] == ["sampled-999"] * 4 and table.columns[0] == ("sampled-999", "A", "MRR")
    assert table.loc["m2", ("full", "B", "HR@10")] == "0.4000 ± 0.0200"
    fig = views.plot_results(summary(), labels={"m1": "Model one"})
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["Model one", "m2"]
    png = fig._repr_png_()  # a notebook shows the figure from this, whatever backend is active
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png == views.figure_png(fig)  # and renders it the same twice


def test_the_report_renders_saved_explanations_without_a_model():
    from tema import report

    item = lambda i, tags, domain="A": {"item": i, "domain": domain, "title": f"item {i}", "tags": tags}  # noqa: E731
    history = [{**item(1, ["tea", "green"]), "self_attention": 0.75, "tag_attention": 0.5, "cross_attention": None},
               {**item(7, ["mug"], "B"), "self_attention": 0.25, "tag_attention": 0.5, "cross_attention": None}]
    saved = {"model": "tema", "seed": 1, "top": 2, "users": [
        {"user": "u1", "target_domain": "B", "target": item(9, ["mug"], "B"), "history": history,
         "recommended": [item(9, ["mug", "steel"], "B"), item(8, ["pan"], "B")]}]}
    page = report.explanations_section(saved)
    assert "<h3>Explanations (TEMA, seed 1)</h3>" in page and "top 2 items" in page
    assert "<b>mug</b>, steel" in page and "item 9 (the target)" in page and "item 8</td>" in page
    assert page.count("0.75") == 1 and report.explanations_section(None) == ""
