"""Stage `report`: the result pages (params `pages`; reports/index.html, the page a reader opens first, by default
the only one), rendered from what the stages below saved: no model is loaded or run here.

A page holds, per evaluation table: the statistics of the prepared data (once per dataset), the test results
(models x protocols x domains x metrics, mean ± std over seeds), significance, the training curves, and links to
every stage's executed notebook as HTML. Figures are embedded as PNG so the page is one self-contained file.
Tables and figures come from tema.views; model names, groups and deviations from the model registry; everything
else from the evaluate stage's summary of each table (reports/tables/<table>.json: statistics, results,
significance, curves, run times, explanations of sample users), so a page renders without data/runs or data/eval.
"""

from __future__ import annotations

import html
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pandas as pd

from tema import artifacts, config, schema
from tema.models import registry
from tema.views import (
    PRIMARY_PROTOCOL,
    against,
    best_opponents,
    count_verdicts,
    figure_png,
    format_table,
    img_tag,
    metrics_of,
    ordered,
    plot_curves,
    plot_results,
    protocols_of,
    significance_mark,
    significance_table,
    stats_tables,
)


def html_table(table: pd.DataFrame, escape: bool = True) -> str:
    """A table as HTML, its index's name in the header's first cell (pandas would give it a row of its own)."""
    shown = table.copy()
    if not isinstance(shown.columns, pd.MultiIndex) and shown.index.name:
        shown.columns.name, shown.index.name = shown.index.name, None
    return f'<div class="wide">{shown.to_html(escape=escape, classes="table")}</div>'


def display(model: str) -> str:
    return registry.info(model).display if model in registry.MODELS else model

ABLATION_METRICS = ("MRR", "NDCG@10")  # the metrics the significance tests cover


def seeds_of(params: dict[str, Any]) -> list[int]:
    return list(config.get(params, "train.seeds", list))


def inputs_of(name: str) -> dict[str, Any]:
    """The evaluate stage's summary of table `name` (artifacts.load_table_inputs)."""
    return artifacts.load_table_inputs(name)


def frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """JSON rows as a table (null as NaN in numeric columns, as the CSV files they were read from gave them)."""
    return pd.DataFrame(rows) if rows else pd.DataFrame()


def results_of(name: str) -> pd.DataFrame:
    return frame(inputs_of(name)["results"])


def significance_of(name: str) -> pd.DataFrame:
    return frame(inputs_of(name)["significance"])


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
    summary = results_of(name)
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
        for protocol in protocols_of(summary["protocol"]):
            rows = summary[(summary["protocol"] == protocol) & summary["model"].isin(group)]
            if len(rows):
                cells = marked_results(rows, list(metrics or metrics_of(summary)), p_of)
                parts.append(f"<h4>{title}, {protocol}</h4>" + html_table(cells, escape=False))
    labels = {m: registry.info(m).display for m in models}
    marks = {(m, p, d): significance_mark(*p_of[(m, p, d, "MRR")]) for (m, p, d, metric) in p_of if metric == "MRR"}
    ref_model = sig["reference"].iloc[0] if len(sig) else None
    parts.append(img_tag(figure_png(plot_results(summary, labels=labels, marks=marks, reference=ref_model)), f"{name} test MRR"))
    if reference:
        parts.append(f"<p>Bars: test MRR, mean over seeds with the seeds' std; {html.escape(reference)} darker; * and ** "
                     "as in the tables.</p>")
    if len(sig):
        wide = significance_table(sig, [m for m in models if m in set(sig["model"])], labels)
        wide.index = [display(m) for m in wide.index]
        wide = wide[[c for p in protocols_of(sig["protocol"]) for c in wide.columns if c.startswith(f"{p} ")]]
        parts.append(SIGNIFICANCE_NOTE.format(reference=html.escape(reference)) + html_table(wide))
    return "\n".join(parts)


def dataset_section(name: str, params: dict[str, Any], first_of_dataset: bool = True) -> str:
    """The section of one evaluation table (config.evaluations): its results, significance, curves and stage reports.

    The first table of a dataset also shows the dataset's statistics and the explanations of sample users.
    """
    spec = config.evaluations(params)[name]
    dataset, models = spec["dataset"], spec["models"]
    seeds = seeds_of(params)
    inputs = inputs_of(name)
    stats = inputs["stats"]
    heading = dataset if name == dataset else f"{name} ({dataset})"
    parts = [f'<h2 id="{html.escape(name)}">{html.escape(heading)}</h2>']
    domains = ", ".join(f"{d} = {html.escape(n)} ({stats['items'][d]:,} items)" for d, n in stats["domains"].items())
    shown = ", ".join(html.escape(registry.info(m).display) for m in models)
    parts.append(f"<p>Domains: {domains}. Models compared: {shown}.</p>")
    if first_of_dataset:
        parts.append("<h3>Dataset statistics</h3>" + html_table(stats_tables(stats)))
    parts.append(results_html(name, models, seeds))
    labels = {m: registry.info(m).display for m in models}
    curves = plot_curves(frame(inputs["curves"]), labels, title=dataset)
    parts.append("<h3>Training curves</h3>" + img_tag(figure_png(curves), f"{name} curves"))
    if first_of_dataset:
        parts.append(explanations_section(inputs["explanations"]))
        parts.append(tuning_section(params, dataset, models))
    links = [("prepare", f"{dataset}/prepare.html"), ("tags", f"{dataset}/tags.html"),
             ("features", f"{dataset}/features.html")]
    links += [(f"train {registry.info(m).display}", f"{dataset}/train-{m}.html") for m in models]
    links += [("evaluate", f"{name}/evaluate.html")]
    items = "".join(f'<li><a href="{href}">{html.escape(label)}</a></li>' for label, href in links)
    parts.append(f"<h3>Stage reports</h3><ul>{items}</ul>")
    return "\n".join(parts)


def tuning_section(params: dict[str, Any], dataset: str, models: list[str]) -> str:
    """The validation search behind the settings (`tema tune`, reports/tuning/<dataset>.csv): every trial of the shown
    models with what it changed and its validation MRR (seed tune.seed), the one each model runs with in this
    profile marked, and the joint score where `tema tune-joint` chose across datasets (reports/tuning/joint.csv);
    '' when the dataset was not tuned."""
    path = artifacts.tuning_dir() / f"{dataset}.csv"
    if not path.is_file():
        return ""
    table = pd.read_csv(path, dtype={"fingerprint": str})
    table = table[table["model"].isin(models)]
    if table.empty:
        return ""
    runs = {m: registry.effective(m, registry.hyper(params, m)) for m in dict.fromkeys(table["model"])}
    joint_path = artifacts.tuning_dir() / "joint.csv"
    joint = pd.read_csv(joint_path) if joint_path.is_file() else None
    scores = {}
    if joint is not None and f"trial ({dataset})" in joint.columns:
        scores = {(row["model"], int(row[f"trial ({dataset})"])): row["joint_score"] for _, row in joint.iterrows()}

    def changed(tuned: str) -> str:
        values = json.loads(tuned)
        return ", ".join(f"{k}={setting(v)}" for k, v in values.items()) or "(as configured)"

    shown = pd.DataFrame({
        "model": [registry.info(m).display for m in table["model"]], "trial": table["trial"],
        "settings tried": [changed(t) for t in table["tuned"]], "valid MRR": table["valid_MRR"].map(lambda v: f"{v:.4f}"),
        "best epoch": table["best_epoch"], "epochs run": table["epochs_run"],
        "best here": ["yes" if b else "" for b in table["best"]],
        "runs in this profile": ["yes" if registry.effective(m, json.loads(p)) == runs[m] else ""
                                 for m, p in zip(table["model"], table["params"])],
    })
    text = ("<h3>Validation search</h3><p>Every trial of <code>tema tune</code> (one seed, the train stage's settings, "
            "early stopping on validation): what it changed from the configured model, its validation MRR, whether it "
            "was the best trial on this dataset, and whether it is the configuration this profile runs. ")
    if scores:
        shown.insert(6, "joint score", [f"{scores[k]:.4f}" if k in scores else "" for k in zip(table["model"], table["trial"])])
        text += ("The joint score (<code>tema tune-joint</code>) is the mean over the searched datasets of the trial's "
                 "validation MRR relative to the model's best there; the study runs each model's best joint score. ")
    text += "The test split is read only for the configurations the profiles run.</p>"
    return text + html_table(shown.set_index(["model", "trial"]))


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
            rows = [{"setting": k, "paper": setting(paper[k]), "this study": setting(ours[k]),
                     "why": info.why_different.get(k, "") if ours[k] != paper[k] else ""} for k in paper]
            parts.append(html_table(pd.DataFrame(rows).set_index("setting")))
        if notes:
            parts.append("<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>")
    if not parts:
        return ""
    return "<h2 id=\"deviations\">Deviations from the published models</h2>\n" + "\n".join(parts)


def setting(value: Any) -> str:
    """A hyper-parameter as it is written (256, 0.2, 1e-05), not in a column's common float format."""
    return f"{value:g}" if isinstance(value, float) else str(value)


def attention_bar(weight: float | None) -> str:
    if weight is None:
        return ""
    return f'<span style="display:inline-block;background:#4c72b0;height:8px;width:{int(round(weight * 80))}px"></span> {weight:.2f}'


def short_title(item: dict[str, Any]) -> str:
    text = item["title"]
    return html.escape(text if len(text) <= 70 else text[:67] + "...")


def explanations_section(explained: dict[str, Any] | None) -> str:
    """The evaluate stage's explanations (tema.evaluate.explain_users, in the table's summary): for a few sampled test users, the history
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
            "<div class='wide'><table class='table'><tr><th>domain</th><th>history item (oldest first)</th><th>tags</th>"
            "<th>self-attention</th><th>tag attention</th><th>cross-domain attention</th></tr>" + "".join(rows) + "</table></div>"
            "<div class='wide'><table class='table'><tr><th>rank</th><th>recommended</th><th>tags (shared with the history in bold)</th></tr>"
            + "".join(recs) + "</table></div>"
        )
    return "\n".join(parts)


STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1280px; box-sizing: border-box; margin: 2em auto; padding: 0 1em; color: #222; }
table.table { border-collapse: collapse; font-size: 12px; margin: 0.5em 0 1.5em; }
table.table th, table.table td { border: 1px solid #ccc; padding: 3px 6px; text-align: right; white-space: nowrap; }
div.wide { overflow-x: auto; }
img { max-width: 100%; }
nav.pages { font-size: 14px; margin: 0.3em 0 1em; }
nav.pages a, nav.pages b { margin-right: 1.2em; }
p.provenance { font-size: 12px; color: #555; margin-top: 0; }
div.findings { border: 2px solid #4c72b0; background: #f3f6fb; padding: 0.6em 1.2em; margin: 1em 0 1.5em; }
div.findings h2 { margin: 0.2em 0 0.4em; font-size: 1.25em; }
div.findings p { margin: 0.4em 0; }
td.above { background: #dcefdc; } td.below { background: #f6dcdc; } td.tied { background: #f2f2f2; }
"""

VERDICT_WORDS = {"above": "significantly above", "below": "significantly below", "tied": "no significant difference"}


def fmt_p(p: float) -> str:
    return f"{p:.2g}"


def holm_note(verdict: str) -> str:
    """A significant verdict says whether it survives Holm's correction (p and Holm p stand beside it)."""
    if verdict == "tied":
        return ""
    return " (after Holm)" if verdict.endswith("(Holm)") else " (not after Holm)"


def counted(rows: pd.DataFrame) -> dict[str, int]:
    """views.count_verdicts, plus how many of the significant cells survive Holm's correction (above_holm,
    below_holm): the findings box says so where not all do."""
    counts = count_verdicts(rows)
    holm = rows["verdict"].str.endswith("(Holm)") if len(rows) else pd.Series(dtype=bool)
    for word in ("above", "below"):
        counts[f"{word}_holm"] = int((holm & rows["verdict"].str.startswith(word)).sum()) if len(rows) else 0
    return counts


def tally(counts: dict[str, int], opponent: str) -> str:
    """The verdicts of a set of cells in one clause: 'significantly above the best baseline in 1 of 4 cells, below
    in none' or 'not significantly different from ... in any of the 4 cells'."""
    n, above, below = counts["cells"], counts["above"], counts["below"]
    if not above and not below:
        return f"not significantly different from {opponent} in any of the {n} cells"

    def holm(key: str) -> str:  # how many of them survive Holm's correction, where that is not all
        kept = counts.get(f"{key}_holm", counts[key])
        return "" if kept == counts[key] else f" ({kept} after Holm)"

    parts = []
    if above:
        parts.append(f"significantly above {opponent} in {above} of {n} cells{holm('above')}")
    if below:
        parts.append(f"significantly below {opponent} in {below} of {n} cells{holm('below')}" if not above
                     else f"below in {below}{holm('below')}")
    if not below:
        parts.append("below in none")
    return ", ".join(parts)


def findings_section(shown: list[str], params: dict[str, Any]) -> str:
    """The box a reader sees first: per table of the page, its reference model (TEMA) against the best baseline of
    each domain under full ranking (the unbiased protocol), and against TEMA without tags where the table has it,
    generated from the evaluate stage's significance tests (paired Wilcoxon over test users, Holm within a group)."""
    parts = []
    for name in shown:
        sig = significance_of(name)
        if not len(sig):
            continue
        reference = display(sig["reference"].iloc[0])
        if sig["reference"].iloc[0] != "tema":
            # a table built around another model (art-office-tag-noise: TEMA without tags against TEMA with real and
            # with random tags) has no baselines to beat: the reference against each model, every cell
            lines = [f"<p><b>{html.escape(name)}</b>, both protocols, MRR and NDCG@10: {html.escape(reference)} is "
                     f"{tally(counted(against(sig, m)), html.escape(display(m)))}.</p>"
                     for m in dict.fromkeys(sig["model"])]
            parts.append("\n".join(lines))
            continue
        domains = inputs_of(name)["stats"]["domains"]
        best = best_opponents(sig)
        full = best[best["protocol"] == PRIMARY_PROTOCOL] if len(best) else best
        lines = []
        if len(full):
            lines.append(f"<p><b>{html.escape(name)}</b>, full ranking, per domain and metric: {html.escape(reference)} is "
                         f"{tally(counted(full), 'the best baseline')}.</p>")
            rows = [f"<tr><th>domain</th><th>metric</th><th>{html.escape(reference)}</th><th>best baseline</th>"
                    "<th>difference</th><th>p</th><th>Holm p</th><th>verdict</th></tr>"]
            for r in full.itertuples():
                word = r.verdict.split(" ")[0]
                rows.append(
                    f"<tr><td>{r.domain} ({html.escape(domains.get(r.domain, r.domain))})</td><td>{r.metric}</td>"
                    f"<td>{r.reference_mean:.4f}</td><td>{html.escape(display(r.model))} {r.model_mean:.4f}</td>"
                    f"<td>{r.difference:+.4f}</td><td>{fmt_p(r.p_value)}</td><td>{fmt_p(r.p_holm)}</td>"
                    f'<td class="{word}">{VERDICT_WORDS[word]}{holm_note(r.verdict)}</td></tr>')
            lines.append('<div class="wide"><table class="table">' + "".join(rows) + "</table></div>")
        no_tags = against(sig, "tema-no-tags") if sig["reference"].iloc[0] == "tema" else pd.DataFrame()
        if len(no_tags):
            lines.append(f"<p><b>{html.escape(name)}</b>, both protocols, MRR and NDCG@10: {html.escape(reference)} is "
                         f"{tally(counted(no_tags), 'TEMA without tags')}.</p>")
        if lines:
            parts.append("\n".join(lines))
    if not parts:
        return ""
    return ('<div class="findings"><h2>Findings</h2>' + "\n".join(parts) +
            "<p><small>Best baseline: per cell, the baseline with the highest mean test metric. Significance: paired "
            "two-sided Wilcoxon signed-rank test over test users (each user's metric averaged over seeds), p &lt; 0.05; "
            "Holm p: after Holm's correction over the table's tests against its baselines. Details per table below."
            "</small></p></div>")


def git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=config.repo_root(), capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def profile_name() -> str | None:
    """The profile params.yaml was written from (its header, written by `tema profile`)."""
    path = config.repo_root() / "params.yaml"
    head = path.read_text(encoding="utf-8")[:400] if path.is_file() else ""
    found = re.search(r"tema profile ([\w.-]+)", head)
    return found.group(1) if found else None


def hours(seconds: float) -> str:
    minutes = int(round(seconds / 60))
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min"


def provenance_line(shown: list[str], params: dict[str, Any]) -> str:
    """Commit, profile, seeds and the training time behind the page, in one line (no clock time: a page rendered
    again from the same runs is the same file)."""
    tables = config.evaluations(params)
    runs = {(tables[t]["dataset"], r["model"], r["seed"]): r for t in shown for r in inputs_of(t)["runs"]}
    seeds = seeds_of(params)
    seconds = sum(float(r["train_seconds"]) for r in runs.values())
    devices, n_runs = {str(r["device"]) for r in runs.values()}, len(runs)
    commit = git("rev-parse", "--short=10", "HEAD")
    when = git("log", "-1", "--format=%cs") if commit else None
    changed = git("status", "--porcelain", "--", "tema", "notebooks", "dvc.yaml", "profiles") if commit else None
    code = f"code at commit <code>{commit}</code> ({when})" if commit else "code outside a git checkout"
    if changed:
        code += " with local changes to the code"
    profile = profile_name()
    items = [code, f"profile <code>{html.escape(profile)}</code>" if profile else "params.yaml not written by a profile",
             f"seeds {', '.join(map(str, seeds))}",
             f"training time {hours(seconds)} summed over {n_runs} runs ({', '.join(sorted(devices)) or '-'})"]
    return f'<p class="provenance">{" · ".join(items)}</p>'


TEST_PROFILES = ("smoke",)  # its pages are the tests' small stand-ins, not results to link to


def pages_nav(page: str, params: dict[str, Any]) -> str:
    """Links to every result page that some profile writes (profiles/*.yaml), each with the command that makes it;
    the pages of the current profile first."""
    from tema import profiles

    pages: dict[str, str | None] = {p: None for p in config.pages(params)}
    for name in (n for n in profiles.known() if n not in TEST_PROFILES):
        for p in config.pages(profiles.profile_params(name)):
            pages.setdefault(p, name)
    links = []
    for p, profile in pages.items():
        label = "results" if p == "index" else p
        if p == page:
            links.append(f"<b>{html.escape(label)}</b>")
        else:
            hint = f' title="written by: tema profile {html.escape(profile)} &amp;&amp; dvc repro"' if profile else ""
            links.append(f'<a href="{html.escape(p)}.html"{hint}>{html.escape(label)}</a>')
    return ('<nav class="pages">Pages: ' + " ".join(links) + " <small>(a page of another profile is written by "
            "<code>tema profile &lt;name&gt; &amp;&amp; dvc repro</code>; hover a link for its name)</small></nav>")


def leaderboard_section(shown: list[str], params: dict[str, Any]) -> str:
    """For a page of several datasets: each main model's full-ranking test MRR per dataset and domain (mean over
    seeds), the best of each column in bold."""
    tables = config.evaluations(params)
    mains = [t for t in shown if any(registry.info(m).group != "ablation" for m in tables[t]["models"])]
    if len({tables[t]["dataset"] for t in mains}) < 2:
        return ""
    columns: dict[str, dict[str, float]] = {}
    for t in mains:
        summary = results_of(t)
        full = summary[(summary["protocol"] == PRIMARY_PROTOCOL) & summary["model"].map(lambda m: registry.info(m).group != "ablation")]
        for domain in sorted(set(full["domain"])):
            column = columns.setdefault(f"{tables[t]['dataset']} {domain}", {})
            # a dataset's further tables (ablations, taggers) add the models its first table lacks, and replace none:
            # a model is the same runs in every table of its dataset
            for model, mrr in full[full["domain"] == domain].set_index("model")["mean_MRR"].items():
                column.setdefault(model, mrr)
    board = pd.DataFrame(columns)
    cells = board.map(lambda v: "" if pd.isna(v) else f"{v:.4f}")
    for col in board.columns:
        best = board[col].idxmax()
        cells.loc[best, col] = f"<b>{cells.loc[best, col]}</b>"
    cells.index = [display(m) for m in cells.index]
    cells.index.name = "model"
    return ("<h2 id=\"leaderboard\">Leaderboard</h2><p>Test MRR under full ranking, mean over seeds, per dataset and "
            "domain; best per column in bold. Significance is per table, below.</p>" + html_table(cells, escape=False))


def build_page(page: str, params: dict[str, Any]) -> Path:
    """reports/<page>.html: links to the other pages, the provenance, the findings, then the sections of the page's
    evaluation tables (config.pages) and the deviations."""
    schema.check(params)
    shown = config.pages(params).get(page)
    if shown is None:
        raise config.ParamsError(f"params.yaml: no page {page!r} under 'pages'; pages: {sorted(config.pages(params))}")
    tables = config.evaluations(params)
    models = list(dict.fromkeys(m for t in shown for m in tables[t]["models"]))
    board = leaderboard_section(shown, params)
    toc = '<li><a href="#leaderboard">Leaderboard</a></li>' if board else ""
    toc += "".join(f'<li><a href="#{html.escape(t)}">{html.escape(t)}</a></li>' for t in shown)
    toc += '<li><a href="#deviations">Deviations from the published models</a></li>'
    seen: set[str] = set()
    sections = []
    for t in shown:
        sections.append(dataset_section(t, params, first_of_dataset=tables[t]["dataset"] not in seen))
        seen.add(tables[t]["dataset"])
    body = board + "\n" + "\n".join(sections) + "\n" + deviations_section(params, models)
    title = "TEMA study: results" + ("" if page == "index" else f" ({page})")
    text = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{STYLE}</style></head>
<body>
<h1>{html.escape(title)}</h1>
{pages_nav(page, params)}
{provenance_line(shown, params)}
{findings_section(shown, params)}
<p>Cross-domain sequential recommendation: each model predicts a user's next item in each of two domains from the
merged history. Models: {", ".join(html.escape(display(m)) for m in models)}. Reproduced by <code>dvc repro</code>
(README.md); the notebook behind this page: <a href="report-{html.escape(page)}.html">report-{html.escape(page)}.html</a>.</p>
<ul>{toc}</ul>
{body}
</body></html>
"""
    out = artifacts.reports_dir() / f"{page}.html"
    out.write_text(text, encoding="utf-8")
    return out
