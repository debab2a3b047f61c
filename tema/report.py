"""Stage `report`: the result pages (params `pages`; reports/index.html, the page a reader opens first, by default
the only one) and the figures the notebooks share.

A page holds, per evaluation table: the statistics of the prepared data (once per dataset), the test results
(models x protocols x domains x metrics, mean ± std over seeds), significance, the training curves, and links to
every stage's executed notebook as HTML. Figures are embedded as PNG so the page is one self-contained file.
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

from tema import config, data, schema
from tema.evaluate import format_table
from tema.protocols import METRICS, PROTOCOLS
from tema.artifacts import load_histories
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


def dataset_section(name: str, params: dict[str, Any], first_of_dataset: bool = True) -> str:
    """The section of one evaluation table (config.evaluations): its results, significance, curves and stage reports.

    The first table of a dataset also shows the dataset's statistics and the explanations of sample users.
    """
    root = config.repo_root()
    spec = config.evaluations(params)[name]
    dataset, models = spec["dataset"], spec["models"]
    cfg = TrainConfig.from_params(params)
    stats = json.loads((config.dataset_dir("prepared", dataset) / "stats.json").read_text())
    summary = pd.read_csv(root / "reports" / name / "results.csv")
    heading = dataset if name == dataset else f"{name} ({dataset})"
    parts = [f'<h2 id="{html.escape(name)}">{html.escape(heading)}</h2>']
    domains = ", ".join(f"{d} = {html.escape(n)} ({stats['items'][d]:,} items)" for d, n in stats["domains"].items())
    parts.append(f"<p>Domains: {domains}. Models compared: {', '.join(html.escape(m) for m in models)}.</p>")
    if first_of_dataset:
        parts.append("<h3>Dataset statistics</h3>" + stats_tables(stats).to_html(classes="table"))
    parts.append(
        f"<h3>Test results</h3><p>Mean ± std over {len(cfg.seeds)} seed(s) {list(cfg.seeds)}; each run's checkpoint chosen on "
        "validation (mean full-ranking MRR of the two domains). <b>full</b>: the target ranked among all items of its "
        "domain; <b>sampled-999</b>: among 999 seeded random items of its domain. Ties count against the target. "
        "Best mean per column in bold.</p>"
    )
    sig_path = root / "reports" / name / "significance.csv"
    sig = pd.read_csv(sig_path) if sig_path.is_file() and sig_path.stat().st_size > 1 else pd.DataFrame()
    if len(sig) and "p_holm" not in sig.columns:  # a table written before the correction was added
        from tema.evaluate import with_holm

        sig = with_holm(sig)
    p_of = {(r.model, r.protocol, r.domain, r.metric): (r.p_value, r.p_holm) for r in sig.itertuples()} if len(sig) else {}
    reference = sig["reference"].iloc[0] if len(sig) else None
    from tema.models.tema import ABLATIONS

    main = [m for m in models if m not in ABLATIONS]
    ablations = [m for m in models if m in ABLATIONS]
    groups = [("Main results", main, METRICS)] if main != ["tema"] or not ablations else []  # not TEMA alone
    if ablations:
        groups.append(("Ablations", [m for m in models if m == "tema"] + ablations, ("MRR", "NDCG@10")))
    if reference:
        parts.append(
            f"<p>Marks: * the model differs from {html.escape(reference)} with p &lt; 0.05 (paired two-sided Wilcoxon "
            "signed-rank test over test users, each user's metric averaged over seeds; MRR and NDCG@10 are tested); "
            "** it still does after Holm's correction over all tests against the models of its group (baselines, or "
            "ablations). The p-values are in the significance table below.</p>"
        )
    for title, group, metrics in groups:
        for protocol in PROTOCOLS:
            rows = summary[(summary["protocol"] == protocol) & summary["model"].isin(group)]
            if not len(rows):
                continue
            table = format_table(rows, metrics)
            table.columns = [f"{d} {m}" for _, d, m in table.columns]
            cells = table.copy()
            for d in data.DOMAINS:
                for m in metrics:
                    col = f"{d} {m}"
                    if col not in cells.columns:
                        continue
                    for model in cells.index:
                        p, p_holm = p_of.get((model, protocol, d, m), (None, None))
                        if p is not None and p < 0.05:
                            cells.loc[model, col] = f"{cells.loc[model, col]} {significance_mark(p, p_holm)}"
                    best = rows[rows["domain"] == d].set_index("model")[f"mean_{m}"]
                    if len(best):
                        cells.loc[best.idxmax(), col] = f"<b>{cells.loc[best.idxmax(), col]}</b>"
            parts.append(f"<h4>{title}, {protocol}</h4>" + cells.to_html(escape=False, classes="table"))
    if len(sig):
        wide = significance_table(sig, [m for m in models if m in set(sig["model"])])
        parts.append(
            f"<h4>Significance: {html.escape(reference)} against each model</h4><p>Difference of the mean test metric "
            f"({html.escape(reference)} minus the model), the p-value of a paired two-sided Wilcoxon signed-rank test over "
            "test users (each user's metric averaged over seeds) and, after it, the Holm-corrected p-value (over all "
            "tests against the models of the same group: the baselines, or the ablations). * marks p &lt; 0.05, ** a "
            "Holm-corrected p &lt; 0.05. <i>best baseline</i>: in each column, the baseline with the highest mean "
            "test metric, the strongest opponent in that cell.</p>" + wide.to_html(classes="table")
        )
    parts.append(img_tag(figure_png(plot_results(summary)), f"{name} test MRR"))
    parts.append("<h3>Training curves</h3>" + img_tag(figure_png(plot_curves(dataset, models, cfg.seeds)), f"{name} curves"))
    if first_of_dataset and "tema" in models:
        parts.append(explanations_section(dataset, params))
    links = [("prepare", f"{dataset}/prepare.html")]
    links += [(f"train {m}", f"{dataset}/train-{m}.html") for m in models]
    links += [("evaluate", f"{name}/evaluate.html")]
    items = "".join(f'<li><a href="{href}">{html.escape(label)}</a></li>' for label, href in links)
    parts.append(f"<h3>Stage reports</h3><ul>{items}</ul>")
    return "\n".join(parts)


def significance_mark(p: float, p_holm: float) -> str:
    return "**" if p_holm < 0.05 else "*" if p < 0.05 else ""


def significance_table(sig: pd.DataFrame, models: list[str]) -> pd.DataFrame:
    """Models (and a 'best baseline' row) x (protocol, domain, metric): 'difference (p, Holm p) marks' cells."""

    def cell(r) -> str:
        mark = significance_mark(r.p_value, r.p_holm)
        return f"{r.difference:+.4f} (p={r.p_value:.2g}, Holm {r.p_holm:.2g}){' ' + mark if mark else ''}"

    sig = sig.assign(cell=[cell(r) for r in sig.itertuples()])
    columns = [(p, d, m) for p in PROTOCOLS for d in data.DOMAINS for m in sorted(set(sig["metric"]))]
    wide = sig.pivot(index="model", columns=["protocol", "domain", "metric"], values="cell")
    wide = wide[[c for c in columns if c in wide.columns]].loc[models]
    baselines = sig[sig["group"] == "baseline"]
    if len(baselines):
        best = baselines.loc[baselines.groupby(["protocol", "domain", "metric"])["model_mean"].idxmax()]
        best_row = {(r.protocol, r.domain, r.metric): f"{r.model}: {r.cell}" for r in best.itertuples()}
        wide.loc["best baseline"] = [best_row.get(c, "") for c in wide.columns]
    wide.columns = [f"{p} {d} {m}" for p, d, m in wide.columns]
    return wide


def deviations_section(params: dict[str, Any], models: list[str]) -> str:
    """Per model: the published settings next to ours, and how our implementation departs from the paper's code."""
    import inspect

    from tema.models import MODELS

    parts = []
    by_module: dict[Any, list[str]] = {}
    for name in models:
        by_module.setdefault(inspect.getmodule(MODELS[name]), []).append(name)
    for module, names in by_module.items():
        name = names[0]
        paper = getattr(module, "PAPER_HYPER", None)
        notes = getattr(module, "DEVIATIONS", [])
        if not paper and not notes:
            continue
        parts.append(f"<h3>{html.escape(', '.join(names))}</h3>")
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


def explanations_section(dataset: str, params: dict[str, Any], model: str = "tema", n_users: int = 3) -> str:
    """For a few test users (seeded sample, histories with both domains): the model's top recommendations in
    the target's domain, the tags they share with the history, and the attention of the last step over the
    history (merged self-attention, tag attention, the target domain's cross-domain attention)."""
    if model not in config.get(params, "models", list):
        return ""
    from tema import features
    from tema.train import model_params
    from tema.training import load_run

    cfg = TrainConfig.from_params(params)
    ds = data.load(dataset, config.dataset_dir("prepared", dataset))
    run_dir = config.dataset_dir("runs", dataset) / model / f"seed{cfg.seeds[0]}"
    recommender = load_run(ds, model, model_params(params, model), cfg, run_dir)
    bank = features.load(dataset)
    names = list(bank["tags"]["tag"]) if "tags" in bank else []
    tag_ids = bank.get("item_tag_ids")
    titles = ds.items.set_index("item_id")["title"]
    domain_of = ds.items.set_index("item_id")["domain"]

    def tags_of(item: int) -> list[str]:
        return [] if tag_ids is None else [names[t] for t in tag_ids[item] if t >= 0]

    def title(item: int) -> str:
        text = str(titles.get(item, ""))
        return html.escape(text if len(text) <= 70 else text[:67] + "...")

    def bar(weight: float | None) -> str:
        if weight is None:
            return ""
        return f'<span style="display:inline-block;background:#4c72b0;height:8px;width:{int(round(weight * 80))}px"></span> {weight:.2f}'

    test = ds.split("test")
    mixed = test[[len({domain_of[i] for i in h}) == 2 for h in test["history"]]]
    if not len(mixed):
        return ""
    sample = mixed.sample(min(n_users, len(mixed)), random_state=0)
    parts = [
        f"<h3>Explanations ({html.escape(model)}, seed {cfg.seeds[0]})</h3><p>Sampled test users (seeded) whose history holds "
        "both domains. For the user's history window: each item's tags, and the attention of the last step over the "
        "history in the merged stream's last self-attention block, in its tag attention, and in the target domain's "
        "cross-domain attention. Then the top 5 items the model recommends in the target's domain, with the tags they "
        "share with the history in bold.</p>"
    ]
    for _, row in sample.iterrows():
        why = recommender.explain(list(row["history"]), row["target_domain"], top=5)
        history_tags = {t for i in why["history"] for t in tags_of(i)}
        rows = []
        for j, item in enumerate(why["history"]):
            weights = [why[k][j] if why.get(k) else None for k in ("self_attention", "tag_attention", "cross_attention")]
            rows.append(f"<tr><td>{domain_of[item]}</td><td style='text-align:left'>{title(item)}</td>"
                        f"<td style='text-align:left'>{html.escape(', '.join(tags_of(item)))}</td>"
                        + "".join(f"<td style='text-align:left'>{bar(w)}</td>" for w in weights) + "</tr>")
        recs = []
        for rank, item in enumerate(why["recommended"], 1):
            tags = ", ".join(f"<b>{html.escape(t)}</b>" if t in history_tags else html.escape(t) for t in tags_of(item))
            hit = " (the target)" if item == row["target"] else ""
            recs.append(f"<tr><td>{rank}</td><td style='text-align:left'>{title(item)}{hit}</td><td style='text-align:left'>{tags}</td></tr>")
        parts.append(
            f"<h4>User {html.escape(str(row['user']))}: next item in {row['target_domain']} "
            f"(target: {title(row['target'])})</h4>"
            "<table class='table'><tr><th>domain</th><th>history item (oldest first)</th><th>tags</th><th>self-attention</th>"
            "<th>tag attention</th><th>cross-domain attention</th></tr>" + "".join(rows) + "</table>"
            "<table class='table'><tr><th>rank</th><th>recommended</th><th>tags (shared with the history in bold)</th></tr>"
            + "".join(recs) + "</table>"
        )
    return "\n".join(parts)


def img_tag(png: bytes, alt: str) -> str:
    return f'<p><img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}"></p>'


STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em; color: #222; }
table.table { border-collapse: collapse; font-size: 12px; margin: 0.5em 0 1.5em; }
table.table th, table.table td { border: 1px solid #ccc; padding: 3px 6px; text-align: right; }
img { max-width: 100%; }
"""


def build_page(page: str, params: dict[str, Any]) -> Path:
    """reports/<page>.html: the sections of the page's evaluation tables (config.pages), then the deviations."""
    schema.check(params)
    shown = config.pages(params).get(page)
    if shown is None:
        raise config.ParamsError(f"params.yaml: no page {page!r} under 'pages'; pages: {sorted(config.pages(params))}")
    tables = config.evaluations(params)
    models = list(dict.fromkeys(m for t in shown for m in tables[t]["models"]))
    root = config.repo_root()
    toc = "".join(f'<li><a href="#{html.escape(t)}">{html.escape(t)}</a></li>' for t in shown)
    toc += '<li><a href="#deviations">Deviations from the published models</a></li>'
    seen: set[str] = set()
    sections = []
    for t in shown:
        sections.append(dataset_section(t, params, first_of_dataset=tables[t]["dataset"] not in seen))
        seen.add(tables[t]["dataset"])
    body = "\n".join(sections) + "\n" + deviations_section(params, models)
    text = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>TEMA study: results</title><style>{STYLE}</style></head>
<body>
<h1>TEMA study: results</h1>
<p>Cross-domain sequential recommendation on Amazon benchmarks, reproduced by <code>dvc repro</code>
(see README.md). Models: {", ".join(html.escape(m) for m in models)}.
The full notebook of this page: <a href="report-{html.escape(page)}.html">report-{html.escape(page)}.html</a>.</p>
<ul>{toc}</ul>
{body}
</body></html>
"""
    out = root / "reports" / f"{page}.html"
    out.write_text(text, encoding="utf-8")
    return out
