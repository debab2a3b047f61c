"""Stage `evaluate`: the trained runs of one table's models (params `evaluations`) under both protocols, on valid and test.

A table is a dataset and the models it compares; by default one per dataset, named after it (config.evaluations).
Outputs: data/eval/<table>/per_user.parquet (rank and metrics of every example, model, seed, split and protocol:
the input of paired tests), reports/<table>/metrics.json (every test mean and std over seeds) with the same numbers
in reports/<table>/results.csv, reports/<table>/significance.csv, reports/<table>/headline.json (the few numbers
`dvc metrics show` lists: tema.views.headline), reports/curves/<table>.csv (each model's validation curve, mean
over seeds, for `dvc plots show`) and reports/tables/<table>.json (table_inputs: all that a result page shows of the
table, so that the report stage reads neither the runs nor data/eval and a page renders from committed files).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pandas as pd

from tema import artifacts, config, data, schema, tags, views
from tema.artifacts import load_candidates
from tema.models import registry
from tema.protocols import METRICS, PROTOCOLS, evaluate_split
from tema.training import TrainConfig, load_run, model_class, tag_source_of


def evaluate_all(dataset_name: str, params: dict[str, Any], models: list[str]) -> pd.DataFrame:
    cfg = TrainConfig.from_params(params)
    prepared = artifacts.prepared_dir(dataset_name)
    dataset = data.load(dataset_name, prepared)
    space_ranges = {d: dataset.domain_range(d) for d in data.DOMAINS}
    splits = {s: (dataset.split(s), load_candidates(prepared, s, dataset.split(s))) for s in ("valid", "test")}
    frames = []
    for model in models:
        for seed in cfg.seeds:
            recommender = load_run(dataset, model, registry.hyper(params, model), cfg, artifacts.run_dir(dataset_name, model, seed))
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
    the registry's ablations, such as TEMA's, else `baseline`), both means, their difference, the number of pairs, the p-value (1.0
    when every pair is tied) and `p_holm`, the p-value after Holm's step-down correction over all tests of
    the same group in the table (every protocol, domain, metric and model of the group), so that "TEMA is
    better in some cells" can be read at a family-wise 5% level.
    """
    from scipy.stats import wilcoxon

    rows = per_user[per_user["split"] == split]
    if reference not in set(rows["model"]):
        raise config.ParamsError(f"params.yaml: the reference model {reference!r} is not among the evaluated models")
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
    if not len(table):
        return table
    table = table.drop(columns=["group", "p_holm"], errors="ignore")
    ablations = set(registry.names("ablation"))
    table.insert(4, "group", ["ablation" if m in ablations else "baseline" for m in table["model"]])
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
    eval_dir = artifacts.eval_dir(table)
    eval_dir.mkdir(parents=True, exist_ok=True)
    per_user.to_parquet(eval_dir / "per_user.parquet", index=False)
    summary = summarize_seeds(per_user)
    order = {"protocol": {p: i for i, p in enumerate(PROTOCOLS)}, "model": {m: i for i, m in enumerate(spec["models"])}}
    summary = summary.sort_values(["protocol", "domain", "model"], key=lambda c: c.map(order[c.name]) if c.name in order else c)
    report_dir = artifacts.reports_dir(table)
    report_dir.mkdir(parents=True, exist_ok=True)
    summary.to_csv(report_dir / "results.csv", index=False, float_format="%.6f")
    (report_dir / "metrics.json").write_text(json.dumps(metrics_json(summary), indent=2) + "\n")
    reference = config.reference(params, table)
    sig = significance(per_user, reference) if reference else pd.DataFrame()
    sig.to_csv(report_dir / "significance.csv", index=False, float_format="%.6g")
    (report_dir / "headline.json").write_text(json.dumps(views.headline(summary, sig, reference), indent=2) + "\n")
    seeds = TrainConfig.from_params(params).seeds
    curves = views.curve_frame(spec["dataset"], spec["models"], seeds)
    write_curves(table, curves)
    explained = explain_users(spec["dataset"], params, explained_model(reference, spec["models"]))
    artifacts.table_inputs_path(table).parent.mkdir(parents=True, exist_ok=True)
    artifacts.write_json(artifacts.table_inputs_path(table), table_inputs(table, spec, seeds, curves, explained))
    compared = tag_source_comparison(params, spec["dataset"], spec["models"])
    if len(compared):
        compared.to_csv(report_dir / "tag_sources.csv", float_format="%.4f")
    else:
        (report_dir / "tag_sources.csv").unlink(missing_ok=True)
    return summary


def tag_source_comparison(params: dict[str, Any], dataset: str, models: list[str]) -> pd.DataFrame:
    """Where the table's models read other tag sources than the dataset's own (`tags_from`): each of those against
    the dataset's own source, per domain (tags.compare_sources), one column per figure; empty otherwise."""
    others = sorted({s for m in models if (s := tag_source_of(m, registry.hyper(params, m))) is not None}
                    - {config.primary_source_name(params, dataset)})
    if not others:
        return pd.DataFrame()
    primary = config.primary_source_name(params, dataset)
    items = pd.read_parquet(artifacts.prepared_dir(dataset) / "items.parquet", columns=["item_id", "domain"])
    own = artifacts.load_item_tags(artifacts.tags_dir(params, dataset))
    frames = {name: tags.compare_sources(items, own, artifacts.load_item_tags(artifacts.tags_dir(params, dataset, name)),
                                         (primary, name))
              for name in others}
    return pd.concat(frames, names=["source"])


def write_curves(table: str, curves: pd.DataFrame) -> None:
    """reports/curves/<table>.csv: per model (display name) and epoch, the validation score and training loss, mean
    over the seeds still training at that epoch (views.curve_frame); one file per table, so that `dvc plots show`
    draws one figure per table with a line per model (dvc.yaml's top-level plots, template .dvc/plots/models.json)."""
    shown = curves.assign(model=curves["model"].map(lambda m: registry.info(m).display))
    out = artifacts.reports_dir("curves") / f"{table}.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    shown[["model", "epoch", "valid_score", "loss"]].to_csv(out, index=False, float_format="%.6f")


def records(frame: pd.DataFrame, digits: int | None = None) -> list[dict[str, Any]]:
    """A table as JSON rows (NaN as null), floats rounded to `digits` decimals if given."""
    shown = (frame.round(digits) if digits is not None else frame).astype(object)
    return shown.where(shown.notna(), None).to_dict("records")


def table_inputs(table: str, spec: dict[str, Any], seeds, curves: pd.DataFrame, explained: dict[str, Any] | None
                 ) -> dict[str, Any]:
    """reports/tables/<table>.json: what a result page (tema.report) shows of one table, read back from the files
    this stage wrote (results.csv, significance.csv) and from below it (the dataset's statistics, the runs' times
    and curves). The report stage depends on these files alone, so a page renders again from a clone without
    data/runs or data/eval, and a profile's tables can be evaluated on different machines."""
    report_dir = artifacts.reports_dir(table)
    sig_path = report_dir / "significance.csv"
    sig = pd.read_csv(sig_path) if sig_path.stat().st_size > 1 else pd.DataFrame()
    runs = []
    for model in spec["models"]:
        for seed in seeds:
            done = artifacts.load_run_summary(spec["dataset"], model, seed)
            runs.append({"model": model, "seed": int(seed), "best_epoch": int(done.get("best_epoch", 0)),
                         "train_seconds": round(float(done.get("train_seconds", 0.0)), 1), "device": str(done.get("device", "?"))})
    return {
        "table": table, "dataset": spec["dataset"], "models": list(spec["models"]), "seeds": [int(s) for s in seeds],
        "stats": artifacts.load_stats(spec["dataset"]),
        "results": records(pd.read_csv(report_dir / "results.csv")),
        "significance": records(sig),
        "curves": records(curves, 6),
        "runs": runs,
        "explanations": explained,
    }


def explained_model(reference: str | None, models: list[str]) -> str | None:
    """The model whose recommendations the report explains: the table's reference (config.reference) if it can
    explain itself (has an `explain` method), else the table's first model that can; None if none can."""
    able = [m for m in models if hasattr(model_class(m), "explain")]
    return reference if reference in able else next(iter(able), None)


def explain_users(dataset_name: str, params: dict[str, Any], model: str | None, n_users: int = 3, top: int = 5) -> dict[str, Any] | None:
    """For a few test users (seeded sample, histories with both domains): the model's top items in the target's
    domain with their tags, and where the model looked (tema.models.tema.TEMAModel.explain), from the first
    seed's run. JSON-ready: the report renders it without loading a model."""
    if model is None:
        return None
    cfg = TrainConfig.from_params(params)
    dataset = data.load(dataset_name, artifacts.prepared_dir(dataset_name))
    hyper = registry.hyper(params, model)
    recommender = load_run(dataset, model, hyper, cfg, artifacts.run_dir(dataset_name, model, cfg.seeds[0]))
    bank = artifacts.load_features(dataset_name, tag_source_of(model, hyper))  # the tags the model read
    names = list(bank["tags"]["tag"]) if "tags" in bank else []
    tag_ids = bank.get("item_tag_ids")
    titles = dataset.items.set_index("item_id")["title"]
    domain_of = dataset.items.set_index("item_id")["domain"]

    def item(i: int) -> dict[str, Any]:
        tags = [] if tag_ids is None else [names[t] for t in tag_ids[i] if t >= 0]
        return {"item": int(i), "domain": str(domain_of[i]), "title": str(titles.get(i, "")), "tags": tags}

    test = dataset.split("test")
    mixed = test[[len({domain_of[i] for i in h}) == 2 for h in test["history"]]]
    users = []
    for _, row in mixed.sample(min(n_users, len(mixed)), random_state=0).iterrows():
        why = recommender.explain(list(row["history"]), row["target_domain"], top=top)
        history = [item(i) for i in why["history"]]
        for j, entry in enumerate(history):
            for key in ("self_attention", "tag_attention", "cross_attention"):
                entry[key] = why[key][j] if why.get(key) else None
        users.append({"user": str(row["user"]), "target_domain": str(row["target_domain"]), "target": item(int(row["target"])),
                      "history": history, "recommended": [item(i) for i in why["recommended"]]})
    return {"model": model, "seed": int(cfg.seeds[0]), "top": top, "users": users}
