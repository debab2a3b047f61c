"""Stage `report`: reports/index.html, the page a reader opens first, and the figures the notebooks share.

The index holds, per dataset: the statistics of the prepared data, the test results (models x
protocols x domains x metrics, mean ± std over seeds), the training curves, and links to every stage's
executed notebook as HTML. Figures are embedded as PNG so the page is one self-contained file.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd

from tema import config, data
from tema.evaluate import format_table
from tema.protocols import METRICS, PROTOCOLS
from tema.train import load_histories
from tema.training import TrainConfig

PNG_METADATA = {"Software": None}  # no library version in the bytes: identical inputs, identical files


def figure_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, metadata=PNG_METADATA)
    plt.close(fig)
    return buf.getvalue()


def plot_curves(dataset: str, models: list[str], seeds) -> plt.Figure:
    """Validation score (mean full-ranking MRR of the domains) and training loss per epoch, per seed."""
    fig, (ax_score, ax_loss) = plt.subplots(1, 2, figsize=(10, 3.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, model in enumerate(models):
        hist = load_histories(dataset, model, seeds)
        for j, (seed, rows) in enumerate(hist.groupby("seed")):
            label = model if j == 0 else None
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


def plot_results(summary: pd.DataFrame, metric: str = "MRR") -> plt.Figure:
    """Bars of a test metric per model, one panel per protocol and domain, with seed std as error bars."""
    fig, axes = plt.subplots(1, len(PROTOCOLS) * 2, figsize=(12, 3.2), squeeze=False)
    for ax, (protocol, domain) in zip(axes[0], [(p, d) for p in PROTOCOLS for d in data.DOMAINS]):
        rows = summary[(summary["protocol"] == protocol) & (summary["domain"] == domain)]
        ax.bar(rows["model"], rows[f"mean_{metric}"], yerr=rows[f"std_{metric}"], capsize=3, color="#4c72b0")
        ax.set_title(f"{protocol}, domain {domain}", fontsize=9)
        ax.tick_params(axis="x", rotation=45, labelsize=8)
    axes[0][0].set_ylabel(f"test {metric}")
    fig.tight_layout()
    return fig


def stats_tables(stats: dict[str, Any]) -> pd.DataFrame:
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


def dataset_section(dataset: str, params: dict[str, Any]) -> str:
    root = config.repo_root()
    models = config.get(params, "models", list)
    cfg = TrainConfig.from_params(params)
    stats = json.loads((config.dataset_dir("prepared", dataset) / "stats.json").read_text())
    summary = pd.read_csv(root / "reports" / dataset / "results.csv")
    parts = [f'<h2 id="{dataset}">{html.escape(dataset)}</h2>']
    domains = ", ".join(f"{d} = {html.escape(n)} ({stats['items'][d]:,} items)" for d, n in stats["domains"].items())
    parts.append(f"<p>Domains: {domains}.</p>")
    parts.append("<h3>Dataset statistics</h3>" + stats_tables(stats).to_html(classes="table"))
    parts.append(
        f"<h3>Test results</h3><p>Mean ± std over {len(cfg.seeds)} seed(s) {list(cfg.seeds)}; each run's checkpoint chosen on "
        "validation (mean full-ranking MRR of the two domains). <b>full</b>: the target ranked among all items of its "
        "domain; <b>sampled-999</b>: among 999 seeded random items of its domain. Ties count against the target. "
        "Best mean per column in bold.</p>"
    )
    for protocol in PROTOCOLS:
        rows = summary[summary["protocol"] == protocol]
        table = format_table(rows)
        table.columns = [f"{d} {m}" for _, d, m in table.columns]
        best = {}
        for d in data.DOMAINS:
            for m in METRICS:
                sub = rows[rows["domain"] == d].set_index("model")[f"mean_{m}"]
                if len(sub):
                    best[f"{d} {m}"] = sub.idxmax()
        cells = table.copy()
        for col, model in best.items():
            cells.loc[model, col] = f"<b>{cells.loc[model, col]}</b>"
        parts.append(f"<h4>{protocol}</h4>" + cells.to_html(escape=False, classes="table"))
    sig_path = root / "reports" / dataset / "significance.csv"
    sig = pd.read_csv(sig_path) if sig_path.is_file() and sig_path.stat().st_size > 1 else pd.DataFrame()
    if len(sig):
        reference = sig["reference"].iloc[0]
        sig["cell"] = [f"{d:+.4f} (p={p:.2g}){' *' if p < 0.05 else ''}" for d, p in zip(sig["difference"], sig["p_value"])]
        wide = sig.pivot(index="model", columns=["protocol", "domain", "metric"], values="cell")
        wide = wide[[c for c in [(p, d, m) for p in PROTOCOLS for d in data.DOMAINS for m in sorted(set(sig["metric"]))] if c in wide.columns]]
        wide.columns = [f"{p} {d} {m}" for p, d, m in wide.columns]
        wide = wide.loc[[m for m in models if m in wide.index]]
        parts.append(
            f"<h4>Significance: {html.escape(reference)} against each model</h4><p>Difference of the mean test metric "
            f"({html.escape(reference)} minus the model) and the p-value of a paired two-sided Wilcoxon signed-rank test over "
            "test users (each user's metric averaged over seeds); * marks p &lt; 0.05.</p>" + wide.to_html(classes="table")
        )
    parts.append(img_tag(figure_png(plot_results(summary)), f"{dataset} test MRR"))
    parts.append("<h3>Training curves</h3>" + img_tag(figure_png(plot_curves(dataset, models, cfg.seeds)), f"{dataset} curves"))
    links = [("prepare", f"{dataset}/prepare.html")]
    links += [(f"train {m}", f"{dataset}/train-{m}.html") for m in models]
    links += [("evaluate", f"{dataset}/evaluate.html")]
    items = "".join(f'<li><a href="{href}">{html.escape(name)}</a></li>' for name, href in links)
    parts.append(f"<h3>Stage reports</h3><ul>{items}</ul>")
    return "\n".join(parts)


def deviations_section(params: dict[str, Any]) -> str:
    """Per model: the published settings next to ours, and how our implementation departs from the paper's code."""
    import inspect

    from tema.models import MODELS

    parts = []
    for name in config.get(params, "models", list):
        module = inspect.getmodule(MODELS[name])
        paper = getattr(module, "PAPER_HYPER", None)
        notes = getattr(module, "DEVIATIONS", [])
        if not paper and not notes:
            continue
        parts.append(f"<h3>{html.escape(name)}</h3>")
        if paper:
            ours = {**paper, **(params.get("model_params", {}).get(name) or {})}
            if "max_len" not in (params.get("model_params", {}).get(name) or {}):
                ours["max_len"] = config.get(params, "train.max_len", int)
            why = getattr(module, "WHY_DIFFERENT", {})
            rows = [{"setting": k, "paper": paper[k], "this study": ours[k],
                     "why": why.get(k, "") if ours[k] != paper[k] else ""} for k in paper]
            parts.append(pd.DataFrame(rows).set_index("setting").to_html(classes="table"))
        if notes:
            parts.append("<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>")
    if not parts:
        return ""
    return "<h2 id=\"deviations\">Deviations from the published models</h2>\n" + "\n".join(parts)


def img_tag(png: bytes, alt: str) -> str:
    return f'<p><img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}"></p>'


STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em; color: #222; }
table.table { border-collapse: collapse; font-size: 12px; margin: 0.5em 0 1.5em; }
table.table th, table.table td { border: 1px solid #ccc; padding: 3px 6px; text-align: right; }
img { max-width: 100%; }
"""


def build_index(params: dict[str, Any]) -> Path:
    datasets = config.get(params, "datasets", list)
    root = config.repo_root()
    toc = "".join(f'<li><a href="#{d}">{html.escape(d)}</a></li>' for d in datasets)
    toc += '<li><a href="#deviations">Deviations from the published models</a></li>'
    body = "\n".join(dataset_section(d, params) for d in datasets) + "\n" + deviations_section(params)
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>TEMA study: results</title><style>{STYLE}</style></head>
<body>
<h1>TEMA study: results</h1>
<p>Cross-domain sequential recommendation on Amazon benchmarks, reproduced by <code>dvc repro</code>
(see README.md). Models: {", ".join(html.escape(m) for m in config.get(params, "models", list))}.
The full notebook of this page: <a href="report.html">report.html</a>.</p>
<ul>{toc}</ul>
{body}
</body></html>
"""
    out = root / "reports" / "index.html"
    out.write_text(page, encoding="utf-8")
    return out
