"""Stage `evaluate`: the trained runs of one table's models (params `evaluations`) under both protocols, on valid and test.

A table is a dataset and the models it compares; by default one per dataset, named after it (config.evaluations).
Outputs: data/eval/<table>/per_user.parquet (rank and metrics of every example, model, seed, split and protocol:
the input of paired tests), reports/<table>/metrics.json (test mean and std over seeds, for `dvc metrics show`)
with the same numbers in reports/<table>/results.csv, and reports/<table>/significance.csv.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pandas as pd

from tema import config, data, schema
from tema.prepare import load_candidates
from tema.protocols import METRICS, PROTOCOLS, evaluate_split
from tema.train import model_params
from tema.training import TrainConfig, load_run


def evaluate_all(dataset_name: str, params: dict[str, Any], models: list[str]) -> pd.DataFrame:
    cfg = TrainConfig.from_params(params)
    prepared = config.dataset_dir("prepared", dataset_name)
    dataset = data.load(dataset_name, prepared)
    space_ranges = {d: dataset.domain_range(d) for d in data.DOMAINS}
    splits = {s: (dataset.split(s), load_candidates(prepared, s, dataset.split(s))) for s in ("valid", "test")}
    frames = []
    for model in models:
        for seed in cfg.seeds:
            run_dir = config.dataset_dir("runs", dataset_name) / model / f"seed{seed}"
            recommender = load_run(dataset, model, model_params(params, model), cfg, run_dir)
            for split, (examples, candidates) in splits.items():
                per_user = evaluate_split(recommender.score, examples, space_ranges, candidates, cfg.eval_batch_size, PROTOCOLS)
                frames.append(per_user.assign(model=model, seed=seed, split=split))
    columns = ["model", "seed", "split", "protocol", "domain", "user", "rank", *METRICS]
    return pd.concat(frames, ignore_index=True)[columns]


def summarize_seeds(per_user: pd.DataFrame, split: str = "test") -> pd.DataFrame:
    """Mean and std over seeds of each metric's per-seed mean: one row per model, protocol, domain."""
    rows = per_user[per_user["split"] == split]
    per_seed = rows.groupby(["model", "protocol", "domain", "seed"], sort=False)[list(METRICS)].mean()
    grouped = per_seed.groupby(level=["model", "protocol", "domain"], sort=False)
    mean, count = grouped.mean(), grouped.size()
    std = grouped.std(ddof=1).fillna(0.0)  # one seed: no spread
    table = pd.concat({"mean": mean, "std": std}, axis=1).reset_index()
    table.columns = ["_".join(c).strip("_") if isinstance(c, tuple) else c for c in table.columns]
    table.insert(3, "seeds", count.to_numpy())
    return table


SIGNIFICANCE_METRICS = ("MRR", "NDCG@10")


def significance(per_user: pd.DataFrame, reference: str, split: str = "test", metrics=SIGNIFICANCE_METRICS) -> pd.DataFrame:
    """Paired two-sided Wilcoxon signed-rank tests of `reference` against every other model.

    Pairs are users (examples) of one protocol and target domain; each user's metric is first averaged
    over seeds. Returns one row per (protocol, domain, model, metric): the model's group (`ablation` for
    TEMA's ablations, else `baseline`), both means, their difference, the number of pairs, the p-value (1.0
    when every pair is tied) and `p_holm`, the p-value after Holm's step-down correction over all tests of
    the same group in the table (every protocol, domain, metric and model of the group), so that "TEMA is
    better in some cells" can be read at a family-wise 5% level.
    """
    from scipy.stats import wilcoxon

    rows = per_user[per_user["split"] == split]
    if reference not in set(rows["model"]):
        raise config.ParamsError(f"params.yaml: 'evaluate.reference' is {reference!r}, which is not among the evaluated models")
    by_user = rows.groupby(["protocol", "domain", "model", "user"], sort=False)[list(metrics)].mean()
    out = []
    for (protocol, domain), block in by_user.groupby(level=["protocol", "domain"], sort=False):
        ref = block.xs(reference, level="model")
        for model in dict.fromkeys(block.index.get_level_values("model")):
            if model == reference:
                continue
            other = block.xs(model, level="model").reindex(ref.index)
            for metric in metrics:
                a, b = ref[metric].droplevel([0, 1]), other[metric].droplevel([0, 1])
                diff = (a - b).to_numpy()
                p = 1.0 if not diff.any() else float(wilcoxon(a.to_numpy(), b.to_numpy(), zero_method="wilcox").pvalue)
                out.append({"protocol": protocol, "domain": domain, "reference": reference, "model": model, "metric": metric,
                            "reference_mean": float(a.mean()), "model_mean": float(b.mean()), "difference": float(diff.mean()),
                            "pairs": len(diff), "p_value": p})
    return with_holm(pd.DataFrame(out))


def with_holm(table: pd.DataFrame) -> pd.DataFrame:
    """A significance table with its `group` column (baseline or ablation) and `p_holm` (Holm within each group)."""
    from tema.models.tema import ABLATIONS

    if not len(table):
        return table
    table = table.drop(columns=["group", "p_holm"], errors="ignore")
    table.insert(4, "group", ["ablation" if m in ABLATIONS else "baseline" for m in table["model"]])
    table["p_holm"] = table.groupby("group", sort=False)["p_value"].transform(holm)
    return table


def holm(p_values: pd.Series) -> pd.Series:
    """Holm's step-down adjusted p-values: the k-th smallest of m is multiplied by m - k + 1, made monotone, capped at 1."""
    p = p_values.to_numpy(dtype=float)
    order = np.argsort(p, kind="stable")
    scaled = p[order] * (len(p) - np.arange(len(p)))
    adjusted = np.empty_like(p)
    adjusted[order] = np.minimum(np.maximum.accumulate(scaled), 1.0)
    return pd.Series(adjusted, index=p_values.index)


def metrics_json(summary: pd.DataFrame) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for r in summary.to_dict("records"):
        node = out.setdefault(r["model"], {}).setdefault(r["protocol"], {}).setdefault(r["domain"], {})
        for metric in METRICS:
            key = metric.replace("@", "_")
            node[key] = round(float(r[f"mean_{metric}"]), 6)
            node[f"{key}_std"] = round(float(r[f"std_{metric}"]), 6)
    return out


def table_spec(params: dict[str, Any], table: str) -> dict[str, Any]:
    tables = config.evaluations(params)
    if table not in tables:
        raise config.ParamsError(f"params.yaml: no evaluation table {table!r} under 'evaluations'; tables: {sorted(tables)}")
    return tables[table]


def run(table: str, params: dict[str, Any]) -> pd.DataFrame:
    """Evaluate one table (a name of config.evaluations; by default a dataset) and write its outputs."""
    schema.check(params)
    spec = table_spec(params, table)
    per_user = evaluate_all(spec["dataset"], params, spec["models"])
    eval_dir = config.dataset_dir("eval", table)
    eval_dir.mkdir(parents=True, exist_ok=True)
    per_user.to_parquet(eval_dir / "per_user.parquet", index=False)
    summary = summarize_seeds(per_user)
    order = {m: i for i, m in enumerate(spec["models"])}
    summary = summary.sort_values(["protocol", "domain", "model"], key=lambda c: c.map(order) if c.name == "model" else c)
    report_dir = config.repo_root() / "reports" / table
    report_dir.mkdir(parents=True, exist_ok=True)
    summary.to_csv(report_dir / "results.csv", index=False, float_format="%.6f")
    (report_dir / "metrics.json").write_text(json.dumps(metrics_json(summary), indent=2) + "\n")
    reference = config.get(params, "evaluate.reference", (str, type(None)))
    sig = significance(per_user, reference) if reference else pd.DataFrame()
    sig.to_csv(report_dir / "significance.csv", index=False, float_format="%.6g")
    return summary


def format_table(summary: pd.DataFrame, metrics=METRICS) -> pd.DataFrame:
    """Models x (protocol, domain, metric) with 'mean ± std' cells, for reports."""
    cells = summary.copy()
    for m in metrics:
        cells[m] = [f"{a:.4f} ± {b:.4f}" for a, b in zip(cells[f"mean_{m}"], cells[f"std_{m}"])]
    wide = cells.pivot(index="model", columns=["protocol", "domain"], values=list(metrics))
    wide = wide.reorder_levels([1, 2, 0], axis=1)
    ordered = [(p, d, m) for p in PROTOCOLS for d in data.DOMAINS for m in metrics if (p, d, m) in wide.columns]
    models = list(dict.fromkeys(summary["model"]))
    return wide.loc[models, ordered]

