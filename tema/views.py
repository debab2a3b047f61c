"""Tables and figures of the stages' outputs, for the stage notebooks and the report pages.

Nothing here trains or loads a model (no torch): a notebook that only shows a table imports this module,
not the stage that made it. Figures are matplotlib `Figure` objects made without pyplot, so importing
this module changes no global backend: a notebook shows a returned figure inline, and `figure_png`
renders it to PNG bytes without library versions in them (identical inputs, identical files).
What is shown follows the tables themselves (their protocols, domains and metrics columns).
"""

from __future__ import annotations

import base64
import html
import io
from typing import Any

import matplotlib
import pandas as pd
from matplotlib.figure import Figure

from tema import artifacts

PNG_METADATA = {"Software": None}
METRIC_PREFIX = "mean_"


class ShownFigure(Figure):
    """A Figure that a notebook shows as PNG when it is a cell's value, whatever matplotlib backend is active."""

    def _repr_png_(self) -> bytes:
        return figure_png(self)


def new_figure(*shape: int, size: tuple[float, float]) -> tuple[Figure, Any]:
    """A figure with a grid of axes (rows, columns), independent of pyplot's state."""
    fig = ShownFigure(figsize=size)
    return fig, fig.subplots(*shape, squeeze=False) if shape else fig.subplots()


def figure_png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, metadata=PNG_METADATA)
    return buf.getvalue()


def img_tag(png: bytes, alt: str) -> str:
    return f'<p><img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}"></p>'


def ordered(values) -> list:
    """Distinct values in order of first appearance."""
    return list(dict.fromkeys(values))


def metrics_of(summary: pd.DataFrame) -> list[str]:
    return [c.removeprefix(METRIC_PREFIX) for c in summary.columns if c.startswith(METRIC_PREFIX)]


# -- prepare -------------------------------------------------------------------------------------------

def stats_tables(stats: dict[str, Any]) -> pd.DataFrame:
    """One row per split of the prepare stage's stats.json: examples, interactions, overlap, history lengths."""
    rows = []
    for split, s in stats["splits"].items():
        rows.append({
            "split": split, "examples": s["examples"],
            "interactions A": s["interactions"]["A"], "interactions B": s["interactions"]["B"],
            "targets A": s["targets"]["A"], "targets B": s["targets"]["B"],
            "overlap (both domains)": s["overlap_examples"], "only A": s["only_A"], "only B": s["only_B"],
            "history length min/median/mean/max": "{min}/{median}/{mean}/{max}".format(**s["history_length"]),
        })
    return pd.DataFrame(rows).set_index("split")


# -- train ---------------------------------------------------------------------------------------------

def plot_curves(dataset: str, models: list[str], seeds, labels: dict[str, str] | None = None) -> Figure:
    """Validation score (mean full-ranking MRR of the domains) and training loss per epoch, per seed."""
    fig, axes = new_figure(1, 2, size=(10, 3.5))
    ax_score, ax_loss = axes[0]
    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, model in enumerate(models):
        hist = artifacts.load_histories(dataset, model, seeds)
        for j, (_, rows) in enumerate(hist.groupby("seed")):
            label = (labels or {}).get(model, model) if j == 0 else None
            marker = "o" if len(rows) == 1 else None
            ax_score.plot(rows["epoch"], rows["valid_score"], color=colors[i % len(colors)], alpha=0.8, label=label, marker=marker)
            if rows["loss"].notna().any():
                ax_loss.plot(rows["epoch"], rows["loss"], color=colors[i % len(colors)], alpha=0.8, label=label)
    ax_score.set(xlabel="epoch", ylabel="valid MRR (full ranking, mean of domains)", title=f"{dataset}: validation")
    ax_loss.set(xlabel="epoch", ylabel="training loss", title=f"{dataset}: training loss")
    ax_score.legend()
    ax_loss.legend()
    fig.tight_layout()
    return fig


# -- evaluate ------------------------------------------------------------------------------------------

def format_table(summary: pd.DataFrame, metrics=None) -> pd.DataFrame:
    """Models x (protocol, domain, metric) with 'mean ± std' cells, from an evaluate stage's results table."""
    metrics = list(metrics or metrics_of(summary))
    cells = summary.copy()
    for m in metrics:
        cells[m] = [f"{a:.4f} ± {b:.4f}" for a, b in zip(cells[f"mean_{m}"], cells[f"std_{m}"], strict=True)]
    wide = cells.pivot(index="model", columns=["protocol", "domain"], values=metrics)
    wide = wide.reorder_levels([1, 2, 0], axis=1)
    columns = [(p, d, m) for p in ordered(summary["protocol"]) for d in sorted(set(summary["domain"])) for m in metrics]
    return wide.loc[ordered(summary["model"]), [c for c in columns if c in wide.columns]]


def plot_results(summary: pd.DataFrame, metric: str = "MRR", labels: dict[str, str] | None = None) -> Figure:
    """Bars of a test metric per model, one panel per protocol and domain, with seed std as error bars."""
    panels = [(p, d) for p in ordered(summary["protocol"]) for d in sorted(set(summary["domain"]))]
    fig, axes = new_figure(1, len(panels), size=(12, 3.2))
    for ax, (protocol, domain) in zip(axes[0], panels, strict=True):
        rows = summary[(summary["protocol"] == protocol) & (summary["domain"] == domain)]
        names = [(labels or {}).get(m, m) for m in rows["model"]]
        ax.bar(names, rows[f"mean_{metric}"], yerr=rows[f"std_{metric}"], capsize=3, color="#4c72b0")
        ax.set_title(f"{protocol}, domain {domain}", fontsize=9)
        ax.tick_params(axis="x", rotation=45, labelsize=8)
    axes[0][0].set_ylabel(f"test {metric}")
    fig.tight_layout()
    return fig


def significance_mark(p: float, p_holm: float) -> str:
    return "**" if p_holm < 0.05 else "*" if p < 0.05 else ""


def significance_table(sig: pd.DataFrame, models: list[str]) -> pd.DataFrame:
    """Models (and a 'best baseline' row) x (protocol, domain, metric): 'difference (p, Holm p) marks' cells."""

    def cell(r) -> str:
        mark = significance_mark(r.p_value, r.p_holm)
        return f"{r.difference:+.4f} (p={r.p_value:.2g}, Holm {r.p_holm:.2g}){' ' + mark if mark else ''}"

    sig = sig.assign(cell=[cell(r) for r in sig.itertuples()])
    columns = [(p, d, m) for p in ordered(sig["protocol"]) for d in sorted(set(sig["domain"])) for m in sorted(set(sig["metric"]))]
    wide = sig.pivot(index="model", columns=["protocol", "domain", "metric"], values="cell")
    wide = wide[[c for c in columns if c in wide.columns]].loc[models]
    baselines = sig[sig["group"] == "baseline"]
    if len(baselines):
        best = baselines.loc[baselines.groupby(["protocol", "domain", "metric"])["model_mean"].idxmax()]
        best_row = {(r.protocol, r.domain, r.metric): f"{r.model}: {r.cell}" for r in best.itertuples()}
        wide.loc["best baseline"] = [best_row.get(c, "") for c in wide.columns]
    wide.columns = [f"{p} {d} {m}" for p, d, m in wide.columns]
    return wide
