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
