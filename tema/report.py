"""Stage `report`: the result pages (params `pages`; reports/index.html, the page a reader opens first, by default
the only one), rendered from what the stages below saved: no model is loaded or run here.

A page holds, per evaluation table: the statistics of the prepared data (once per dataset), the test results
(models x protocols x domains x metrics, mean ± std over seeds), significance, the training curves, and links to
every stage's executed notebook as HTML. Figures are embedded as PNG so the page is one self-contained file.
Tables and figures come from tema.views; model names, groups and deviations from the model registry; the
explanations of sample users from the evaluate stage (data/eval/<table>/explanations.json).
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import pandas as pd

from tema import artifacts, config, schema
from tema.models import registry
from tema.views import (
    figure_png,
    format_table,
    img_tag,
    metrics_of,
    ordered,
    plot_curves,
    plot_results,
    significance_mark,
    significance_table,
    stats_tables,
)

ABLATION_METRICS = ("MRR", "NDCG@10")  # the metrics the significance tests cover


def seeds_of(params: dict[str, Any]) -> list[int]:
    return list(config.get(params, "train.seeds", list))


def significance_of(name: str) -> pd.DataFrame:
    path = artifacts.reports_dir(name) / "significance.csv"
    return pd.read_csv(path) if path.is_file() and path.stat().st_size > 1 else pd.DataFrame()


def result_groups(models: list[str]) -> list[tuple[str, list[str], tuple[str, ...] | None]]:
    """(title, models, metrics) of a table's result blocks: the main comparison, then each base model with its
    ablations (a table of a model and its ablations alone shows the ablation block only)."""
    main = [m for m in models if registry.info(m).group != "ablation"]
    bases = ordered(registry.info(m).base for m in models if registry.info(m).group == "ablation")
    groups = [("Ablations", [b for b in bases if b in models] + [m for m in models if registry.info(m).base == b], ABLATION_METRICS)
              for b in bases]
    if main and main != [b for b in bases if b in models]:
        groups.insert(0, ("Main results", main, None))
    return groups


def marked_results(rows: pd.DataFrame, metrics: list[str], p_of: dict) -> pd.DataFrame:
    """format_table's cells with significance marks and the best mean per column in bold."""
    protocol = rows["protocol"].iloc[0]
    cells = format_table(rows, metrics)
    cells.columns = [f"{d} {m}" for _, d, m in cells.columns]
    for d in ordered(rows["domain"]):
        for m in metrics:
            col = f"{d} {m}"
            for model in cells.index:
                p, p_holm = p_of.get((model, protocol, d, m), (None, None))
                if p is not None and p < 0.05:
                    cells.loc[model, col] = f"{cells.loc[model, col]} {significance_mark(p, p_holm)}"
            best = rows[rows["domain"] == d].set_index("model")[f"mean_{m}"]
            cells.loc[best.idxmax(), col] = f"<b>{cells.loc[best.idxmax(), col]}</b>"
    cells.index = [registry.info(m).display for m in cells.index]
    return cells


MARKS_NOTE = (
    "<p>Marks: * the model differs from {reference} with p &lt; 0.05 (paired two-sided Wilcoxon signed-rank test over test "
    "users, each user's metric averaged over seeds; MRR and NDCG@10 are tested); ** it still does after Holm's correction "
    "over all tests against the models of its group (baselines, or ablations). The p-values are in the significance "
    "table below.</p>"
)
SIGNIFICANCE_NOTE = (
    "<h4>Significance: {reference} against each model</h4><p>Difference of the mean test metric ({reference} minus the "
    "model), the p-value of a paired two-sided Wilcoxon signed-rank test over test users (each user's metric averaged "
    "over seeds) and, after it, the Holm-corrected p-value (over all tests against the models of the same group: the "
    "baselines, or the ablations). * marks p &lt; 0.05, ** a Holm-corrected p &lt; 0.05. <i>best baseline</i>: in each "
    "column, the baseline with the highest mean test metric, the strongest opponent in that cell.</p>"
)


def results_html(name: str, models: list[str], seeds: list[int]) -> str:
    """The test results of one table: a block per group and protocol, then the significance table."""
    summary = pd.read_csv(artifacts.reports_dir(name) / "results.csv")
    sig = significance_of(name)
    p_of = {(r.model, r.protocol, r.domain, r.metric): (r.p_value, r.p_holm) for r in sig.itertuples()} if len(sig) else {}
    parts = [
        f"<h3>Test results</h3><p>Mean ± std over {len(seeds)} seed(s) {seeds}; each run's checkpoint chosen on "
        "validation (mean full-ranking MRR of the two domains). <b>full</b>: the target ranked among all items of its "
        "domain; <b>sampled-999</b>: among 999 seeded random items of its domain. Ties count against the target. "
        "Best mean per column in bold.</p>"
    ]
    reference = registry.info(sig["reference"].iloc[0]).display if len(sig) else None
    if reference:
        parts.append(MARKS_NOTE.format(reference=html.escape(reference)))
    for title, group, metrics in result_groups(models):
        for protocol in ordered(summary["protocol"]):
            rows = summary[(summary["protocol"] == protocol) & summary["model"].isin(group)]
            if len(rows):
                cells = marked_results(rows, list(metrics or metrics_of(summary)), p_of)
                parts.append(f"<h4>{title}, {protocol}</h4>" + cells.to_html(escape=False, classes="table"))
    if len(sig):
        wide = significance_table(sig, [m for m in models if m in set(sig["model"])])
        wide.index = [registry.info(m).display if m in registry.MODELS else m for m in wide.index]
        parts.append(SIGNIFICANCE_NOTE.format(reference=html.escape(reference)) + wide.to_html(classes="table"))
    labels = {m: registry.info(m).display for m in models}
    parts.append(img_tag(figure_png(plot_results(summary, labels=labels)), f"{name} test MRR"))
    return "\n".join(parts)


def dataset_section(name: str, params: dict[str, Any], first_of_dataset: bool = True) -> str:
    """The section of one evaluation table (config.evaluations): its results, significance, curves and stage reports.

    The first table of a dataset also shows the dataset's statistics and the explanations of sample users.
    """
    spec = config.evaluations(params)[name]
    dataset, models = spec["dataset"], spec["models"]
    seeds = seeds_of(params)
    stats = artifacts.load_stats(dataset)
    heading = dataset if name == dataset else f"{name} ({dataset})"
    parts = [f'<h2 id="{html.escape(name)}">{html.escape(heading)}</h2>']
    domains = ", ".join(f"{d} = {html.escape(n)} ({stats['items'][d]:,} items)" for d, n in stats["domains"].items())
    shown = ", ".join(html.escape(registry.info(m).display) for m in models)
    parts.append(f"<p>Domains: {domains}. Models compared: {shown}.</p>")
    if first_of_dataset:
        parts.append("<h3>Dataset statistics</h3>" + stats_tables(stats).to_html(classes="table"))
    parts.append(results_html(name, models, seeds))
    labels = {m: registry.info(m).display for m in models}
    parts.append("<h3>Training curves</h3>" + img_tag(figure_png(plot_curves(dataset, models, seeds, labels)), f"{name} curves"))
    if first_of_dataset:
        parts.append(explanations_section(artifacts.load_explanations(name)))
    links = [("prepare", f"{dataset}/prepare.html")]
    links += [(f"train {registry.info(m).display}", f"{dataset}/train-{m}.html") for m in models]
    links += [("evaluate", f"{name}/evaluate.html")]
    items = "".join(f'<li><a href="{href}">{html.escape(label)}</a></li>' for label, href in links)
    parts.append(f"<h3>Stage reports</h3><ul>{items}</ul>")
    return "\n".join(parts)


def deviations_section(params: dict[str, Any], models: list[str]) -> str:
    """Per model family: the published settings next to ours, and how our implementation departs from the paper's code."""
    parts = []
    families: dict[tuple, list[str]] = {}
    for name in models:
        info = registry.info(name)
        families.setdefault((tuple(info.deviations), tuple(sorted(info.paper_hyper.items()))), []).append(name)
    for (notes, paper_items), names in families.items():
        paper, info = dict(paper_items), registry.info(names[0])
        if not paper and not notes:
            continue
        parts.append(f"<h3>{html.escape(', '.join(registry.info(n).display for n in names))}</h3>")
        if paper:
            own = registry.hyper(params, names[0])
            ours = {**paper, **own}
            if "max_len" not in own:
                ours["max_len"] = config.get(params, "train.max_len", int)
            rows = [{"setting": k, "paper": paper[k], "this study": ours[k],
                     "why": info.why_different.get(k, "") if ours[k] != paper[k] else ""} for k in paper]
            parts.append(pd.DataFrame(rows).set_index("setting").to_html(classes="table"))
        if notes:
            parts.append("<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>")
    if not parts:
        return ""
    return "<h2 id=\"deviations\">Deviations from the published models</h2>\n" + "\n".join(parts)


def attention_bar(weight: float | None) -> str:
    if weight is None:
        return ""
    return f'<span style="display:inline-block;background:#4c72b0;height:8px;width:{int(round(weight * 80))}px"></span> {weight:.2f}'


def short_title(item: dict[str, Any]) -> str:
    text = item["title"]
    return html.escape(text if len(text) <= 70 else text[:67] + "...")


def explanations_section(explained: dict[str, Any] | None) -> str:
    """The evaluate stage's explanations (artifacts.load_explanations): for a few sampled test users, the history
    with each item's tags and the attention of the last step over it, then the top recommendations with the tags
    they share with the history in bold."""
    if not explained or not explained["users"]:
        return ""
    model = registry.info(explained["model"]).display
    parts = [
        f"<h3>Explanations ({html.escape(model)}, seed {explained['seed']})</h3><p>Sampled test users (seeded) whose history "
        "holds both domains. For the user's history window: each item's tags, and the attention of the last step over the "
        "history in the merged stream's last self-attention block, in its tag attention, and in the target domain's "
        f"cross-domain attention. Then the top {explained['top']} items the model recommends in the target's domain, with "
        "the tags they share with the history in bold.</p>"
    ]
    for user in explained["users"]:
        history_tags = {t for item in user["history"] for t in item["tags"]}
        rows = [
            f"<tr><td>{item['domain']}</td><td style='text-align:left'>{short_title(item)}</td>"
            f"<td style='text-align:left'>{html.escape(', '.join(item['tags']))}</td>"
            + "".join(f"<td style='text-align:left'>{attention_bar(item[k])}</td>" for k in ("self_attention", "tag_attention", "cross_attention"))
            + "</tr>"
            for item in user["history"]
        ]
        recs = []
        for rank, item in enumerate(user["recommended"], 1):
            tags = ", ".join(f"<b>{html.escape(t)}</b>" if t in history_tags else html.escape(t) for t in item["tags"])
            hit = " (the target)" if item["item"] == user["target"]["item"] else ""
            recs.append(f"<tr><td>{rank}</td><td style='text-align:left'>{short_title(item)}{hit}</td><td style='text-align:left'>{tags}</td></tr>")
        parts.append(
            f"<h4>User {html.escape(user['user'])}: next item in {user['target_domain']} (target: {short_title(user['target'])})</h4>"
            "<table class='table'><tr><th>domain</th><th>history item (oldest first)</th><th>tags</th><th>self-attention</th>"
            "<th>tag attention</th><th>cross-domain attention</th></tr>" + "".join(rows) + "</table>"
            "<table class='table'><tr><th>rank</th><th>recommended</th><th>tags (shared with the history in bold)</th></tr>"
            + "".join(recs) + "</table>"
        )
    return "\n".join(parts)


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
(see README.md). Models: {", ".join(html.escape(registry.info(m).display) for m in models)}.
The full notebook of this page: <a href="report-{html.escape(page)}.html">report-{html.escape(page)}.html</a>.</p>
<ul>{toc}</ul>
{body}
</body></html>
"""
    out = artifacts.reports_dir() / f"{page}.html"
    out.write_text(text, encoding="utf-8")
    return out
