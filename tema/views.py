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


PRIMARY_PROTOCOL = "full"  # ranking among all items of the domain: the unbiased view, shown first


def protocols_of(values) -> list[str]:
    """Distinct protocols, full ranking first, then the others in order of first appearance."""
    seen = ordered(values)
    return sorted(seen, key=lambda p: (p != PRIMARY_PROTOCOL, seen.index(p)))


def model_colors(n: int) -> list:
    """n distinct colours: matplotlib's tab10, or tab20 for more than 10 lines (no colour repeats up to 20)."""
    cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


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

CURVE_COLUMNS = ("valid_score", "loss")


def curve_frame(dataset: str, models: list[str], seeds) -> pd.DataFrame:
    """Per model and epoch, the validation score (mean full-ranking MRR of the domains) and the training loss: the
    mean, min and max over the seeds still training at that epoch (<column>, <column>_min, <column>_max), and how many
    seeds that is (`seeds`). What plot_curves draws; the evaluate stage keeps it for the result pages."""
    frames = []
    for model in models:
        by_epoch = artifacts.load_histories(dataset, model, seeds).groupby("epoch")
        frame = by_epoch[list(CURVE_COLUMNS)].mean()
        for column in CURVE_COLUMNS:
            frame[f"{column}_min"], frame[f"{column}_max"] = by_epoch[column].min(), by_epoch[column].max()
        frame["seeds"] = by_epoch["seed"].nunique()
        frames.append(frame.reset_index().assign(model=model))
    columns = ["model", "epoch", *CURVE_COLUMNS, *(f"{c}_{b}" for c in CURVE_COLUMNS for b in ("min", "max")), "seeds"]
    return pd.concat(frames, ignore_index=True)[columns]


def plot_curves(curves: pd.DataFrame, labels: dict[str, str] | None = None, title: str = "") -> Figure:
    """Validation score and training loss per epoch (curve_frame): one line per model, the mean over its seeds, with
    the seeds' range shaded; the legend sits beside the panels, so that no line hides under it."""
    fig, axes = new_figure(1, 2, size=(11, 3.6))
    ax_score, ax_loss = axes[0]
    models = ordered(curves["model"])
    for model, color in zip(models, model_colors(len(models)), strict=True):
        rows = curves[curves["model"] == model].sort_values("epoch")
        label = (labels or {}).get(model, model)
        for ax, column in ((ax_score, "valid_score"), (ax_loss, "loss")):
            if not rows[column].notna().any():
                continue
            marker = "o" if len(rows) == 1 else None
            ax.plot(rows["epoch"], rows[column], color=color, label=label if ax is ax_score else None, marker=marker, lw=1.5)
            if len(rows) > 1 and rows["seeds"].max() > 1:
                ax.fill_between(rows["epoch"], rows[f"{column}_min"], rows[f"{column}_max"], color=color, alpha=0.15, lw=0)
    name = f"{title}: " if title else ""
    ax_score.set(xlabel="epoch", ylabel="valid MRR (full, mean of domains)", title=f"{name}validation")
    ax_loss.set(xlabel="epoch", ylabel="training loss", title=f"{name}training loss")
    n_seeds = int(curves["seeds"].max()) if len(curves) else 0
    fig.legend(loc="center left", bbox_to_anchor=(0.80, 0.5), fontsize=8, frameon=False,
               title=f"mean of {n_seeds} seed(s)" + (", range shaded" if n_seeds > 1 else ""), title_fontsize=8)
    fig.tight_layout(rect=(0, 0, 0.80, 1))
    return fig


def history_table(dataset: str, model: str, seeds) -> pd.DataFrame:
    """The epoch log of every seed (the train stage's history.csv without its timings, which differ from run to
    run): epoch rows, (seed, loss / valid score) columns; the epoch each seed's checkpoint was taken from is marked."""
    hist = artifacts.load_histories(dataset, model, seeds)
    parts = {}
    for seed, rows in hist.groupby("seed"):
        rows = rows.set_index("epoch")
        best = rows["valid_score"].idxmax()
        parts[f"seed {seed}"] = pd.DataFrame({
            "loss": rows["loss"].map(lambda v: "" if pd.isna(v) else f"{v:.4f}"),
            "valid score": [f"{v:.4f}" + (" (kept)" if e == best else "") for e, v in rows["valid_score"].items()],
        })
    return pd.concat(parts, axis=1).fillna("")


def run_table(runs: pd.DataFrame) -> pd.DataFrame:
    """The train stage's per-seed summaries (tema.train.run) as a table: seed, best epoch, its validation score,
    epochs run."""
    table = runs.set_index("seed")[["best_epoch", "best_valid_score", "epochs_run"]].copy()
    table["best_valid_score"] = table["best_valid_score"].map(lambda v: f"{v:.4f}")
    table.columns = ["checkpoint epoch", "valid score", "epochs run"]
    return table


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


def plot_results(summary: pd.DataFrame, metric: str = "MRR", labels: dict[str, str] | None = None,
                 marks: dict[tuple[str, str, str], str] | None = None, reference: str | None = None) -> Figure:
    """Horizontal bars of a test metric per model (seed std as error bars), one panel per protocol and domain, full
    ranking first. `marks` maps (model, protocol, domain) to a significance mark drawn after the bar (* / ** against
    `reference`, whose bar is drawn darker)."""
    panels = [(p, d) for p in protocols_of(summary["protocol"]) for d in sorted(set(summary["domain"]))]
    n_models = summary["model"].nunique()
    fig, axes = new_figure(1, len(panels), size=(3.1 * len(panels) + 1.2, 0.9 + 0.28 * n_models))
    for i, (ax, (protocol, domain)) in enumerate(zip(axes[0], panels, strict=True)):
        rows = summary[(summary["protocol"] == protocol) & (summary["domain"] == domain)].iloc[::-1]  # first model on top
        names = [(labels or {}).get(m, m) for m in rows["model"]]
        means, stds = rows[f"mean_{metric}"].to_numpy(), rows[f"std_{metric}"].to_numpy()
        colors = ["#1f3d7a" if m == reference else "#7a9cd6" for m in rows["model"]]
        ax.barh(names, means, xerr=stds, capsize=2, color=colors)
        for y, (model, mean, std) in enumerate(zip(rows["model"], means, stds, strict=True)):
            mark = (marks or {}).get((model, protocol, domain), "")
            if mark:
                ax.text(mean + std, y, f" {mark}", va="center", fontsize=9)
        ax.set_title(f"{protocol}, domain {domain}", fontsize=9)
        ax.tick_params(axis="y", labelsize=8, labelleft=i == 0)
        ax.tick_params(axis="x", labelsize=7)
        ax.set_xlabel(f"test {metric}", fontsize=8)
        ax.margins(x=0.15)
    fig.tight_layout()
    return fig


def significance_mark(p: float, p_holm: float) -> str:
    return "**" if p_holm < 0.05 else "*" if p < 0.05 else ""


def significance_table(sig: pd.DataFrame, models: list[str], labels: dict[str, str] | None = None) -> pd.DataFrame:
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
        best_row = {(r.protocol, r.domain, r.metric): f"{(labels or {}).get(r.model, r.model)}: {r.cell}" for r in best.itertuples()}
        wide.loc["best baseline"] = [best_row.get(c, "") for c in wide.columns]
    wide.columns = [f"{p} {d} {m}" for p, d, m in wide.columns]
    return wide


# -- findings ------------------------------------------------------------------------------------------

def verdict(difference: float, p_value: float, p_holm: float) -> str:
    """'above' / 'below' where a difference is significant (p < 0.05), with '(Holm)' where it survives Holm's
    correction; 'tied' where it is not significant."""
    if p_value >= 0.05:
        return "tied"
    return ("above" if difference > 0 else "below") + (" (Holm)" if p_holm < 0.05 else "")


def best_opponents(sig: pd.DataFrame, group: str = "baseline") -> pd.DataFrame:
    """Per (protocol, domain, metric) of a significance table (tema.evaluate.significance), the model of `group`
    with the highest mean test metric, with the reference's mean, the difference, the p-values and the verdict;
    full ranking first. Empty when the table has no model of that group."""
    rows = sig[sig["group"] == group] if len(sig) else sig
    if not len(rows):
        return pd.DataFrame()
    best = rows.loc[rows.groupby(["protocol", "domain", "metric"], sort=False)["model_mean"].idxmax()].copy()
    best["verdict"] = [verdict(r.difference, r.p_value, r.p_holm) for r in best.itertuples()]
    order = {p: i for i, p in enumerate(protocols_of(best["protocol"]))}
    return best.sort_values(["protocol", "domain", "metric"], key=lambda c: c.map(order) if c.name == "protocol" else c,
                            kind="stable").reset_index(drop=True)


def against(sig: pd.DataFrame, model: str) -> pd.DataFrame:
    """The reference against one model (e.g. TEMA against TEMA without tags), every cell, with its verdict."""
    rows = sig[sig["model"] == model].copy() if len(sig) else pd.DataFrame()
    if len(rows):
        rows["verdict"] = [verdict(r.difference, r.p_value, r.p_holm) for r in rows.itertuples()]
    return rows.reset_index(drop=True)


def count_verdicts(rows: pd.DataFrame) -> dict[str, int]:
    """How many cells the reference is significantly above, below, or tied with its opponent(s)."""
    words = rows["verdict"].str.split(" ").str[0] if len(rows) else pd.Series(dtype=str)
    return {"cells": len(rows), "above": int((words == "above").sum()), "below": int((words == "below").sum()),
            "tied": int((words == "tied").sum())}


def headline(summary: pd.DataFrame, sig: pd.DataFrame, reference: str | None) -> dict[str, float]:
    """The few numbers `dvc metrics show` lists per table (reports/<table>/headline.json): the reference model's
    full-ranking MRR and NDCG@10 per domain, and its rival's MRR per domain (rival: the best other model, the best baseline where the
    table has baselines). Keys are short so that the table of every table fits a terminal."""
    full = summary[summary["protocol"] == PRIMARY_PROTOCOL]
    out: dict[str, float] = {}
    if reference is None or reference not in set(full["model"]):
        return out
    for domain in sorted(set(full["domain"])):
        rows = full[full["domain"] == domain].set_index("model")
        for metric in ("MRR", "NDCG@10"):
            out[f"{metric}_{domain}"] = round(float(rows.loc[reference, f"mean_{metric}"]), 4)
    group = "baseline" if len(sig) and (sig["group"] == "baseline").any() else "ablation"
    best = best_opponents(sig, group) if len(sig) else pd.DataFrame()
    for r in best[(best["protocol"] == PRIMARY_PROTOCOL) & (best["metric"] == "MRR")].itertuples() if len(best) else []:
        out[f"rival_MRR_{r.domain}"] = round(float(r.model_mean), 4)
    return out


def provenance_table(provenance: dict[str, Any]) -> pd.DataFrame:
    """A nested provenance record (tags stage, features stage) as a two-column table: dotted key, value."""
    rows = []

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            text = ", ".join(map(str, value)) if isinstance(value, list) else str(value)
            rows.append({"key": prefix, "value": text if len(text) <= 200 else text[:197] + "..."})

    walk("", provenance)
    return pd.DataFrame(rows).set_index("key")
