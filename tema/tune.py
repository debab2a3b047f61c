"""Hyper-parameter search on the validation split, with the same budget for every model (`tema tune`).

For the claim "TEMA beats strong baselines" to be honest, the baselines get the same tuning as TEMA:

- every model gets up to `tune.trials` trials (fewer only if its grid is smaller); trial 0 is its
  configuration in params.yaml, the others are drawn without replacement, with the fixed seed
  `tune.seed`, from the grid of `tune.space` (only the keys the model's configuration already has:
  learning rate, dropout, ...) and `tune.model_space.<model>` (its own knobs, such as TEMA's aux_weight
  or C2DSR's lambda); TEMA's ablations are not tuned apart: they inherit TEMA's settings, tuned ones included;
- a design search (`tune.designs.<model>`: a list of variants, each the settings it changes, such as
  TEMA's side_info or gate) replaces the draw with those variants, within the same number of trials;
- every trial is one training run of tema.training.train_run with the study's `train` settings (the same
  epoch limit, patience and early stopping) and the seed `tune.seed`; it is scored by the validation MRR
  of its selected epoch. The test split is never read;
- runs land in data/tuning/<dataset>/<model>/trial<k>/ and are reused on a re-run like the train stage's
  (fingerprinted), so an interrupted search resumes;
- with `train.workers` > 1, that many trials (of any model) train at once, one process each with
  `train.num_threads` threads, as the train stage trains its seeds; a failing trial does not stop the others.

Outputs: reports/tuning/<dataset>.csv (one row per trial: the tuned values, validation MRR, epochs,
seconds, the run's fingerprint) and reports/tuning/<dataset>-params.yaml, a profile fragment with each
model's best trial. A search over some models replaces only their rows: the rows of the other models are
kept when their trial runs are still in data/tuning/ with the same fingerprints, so models can be tuned
one session at a time and the table and fragment cover them all. To
report test numbers for the tuned models, copy it into profiles/ (for example profiles/tuned.yaml), run
`tema profile tuned && dvc repro`: three seeds, test split, significance tests, as for any profile.
"""

from __future__ import annotations

import inspect
import itertools
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from tema import artifacts, config, data, schema
from tema.models import registry
from tema.train import model_params, train_parallel
from tema.training import TrainConfig, data_fingerprint, train_run

MAX_GRID = 100_000


def accepted_keys(model: str) -> set[str]:
    if model not in registry.MODELS:
        raise config.ParamsError(f"params.yaml: unknown model {model!r}; registered: {sorted(registry.MODELS)}")
    return set(inspect.signature(registry.MODELS[model].__init__).parameters) - {"self", "space", "max_len"} | registry.TRAINING_KEYS


def model_spaces(params: dict[str, Any]) -> dict[str, Any]:
    """tune.model_space (optional): model name -> {key: [values]}."""
    own = config.get(params, "tune", dict).get("model_space") or {}
    if not isinstance(own, dict):
        raise config.ParamsError(f"params.yaml: 'tune.model_space' must be a mapping of model: {{key: [values]}}, got {own!r}")
    return own


def search_space(params: dict[str, Any], model: str, base: dict[str, Any]) -> dict[str, list]:
    """The grid of one model: the shared keys its configuration has, plus its own keys."""
    shared = config.get(params, "tune.space", dict)
    own = model_spaces(params).get(model) or {}
    if not isinstance(own, dict):
        raise config.ParamsError(f"params.yaml: 'tune.model_space.{model}' must be a mapping of key: [values], got {own!r}")
    accepted = accepted_keys(model)
    for key in own:
        if key not in accepted:
            raise config.ParamsError(f"params.yaml: 'tune.model_space.{model}.{key}' is not a parameter of {model}; "
                                     f"expected one of {sorted(accepted)}")
    space = {k: v for k, v in shared.items() if k in base}
    space.update(own)
    defaults = registry.defaults(model)
    for key, values in space.items():
        where = f"tune.model_space.{model}.{key}" if key in own else f"tune.space.{key}"
        if not isinstance(values, list) or not values:
            raise config.ParamsError(f"params.yaml: '{where}' must be a non-empty list of values, got {values!r}")
        reference = base.get(key, defaults.get(key))
        for value in values:
            if reference is not None and not same_kind(value, reference):
                raise config.ParamsError(f"params.yaml: '{where}' holds {value!r} ({type(value).__name__}); expected values "
                                         f"like {reference!r} ({type(reference).__name__}). YAML reads 1e-5 as text: write 1.0e-5")
    return dict(sorted(space.items()))


def same_kind(value: Any, reference: Any) -> bool:
    """Whether a grid value can stand where the configured value stands (an int may stand for a float)."""
    if isinstance(reference, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(reference, bool)
    if isinstance(reference, float):
        return isinstance(value, (int, float))
    if isinstance(reference, int):
        return isinstance(value, int)
    return isinstance(value, type(reference))


def check_tune_params(params: dict[str, Any], models: list[str]) -> None:
    """Names in `tune` that nothing uses are typos: say which, before any training starts."""
    shared = config.get(params, "tune.space", dict)
    own = model_spaces(params)
    for name in own:
        if name not in registry.MODELS:
            raise config.ParamsError(f"params.yaml: 'tune.model_space.{name}' names no registered model; "
                                     f"registered: {sorted(registry.MODELS)}")
    for key in shared:
        if not any(key in accepted_keys(m) for m in registry.MODELS):
            raise config.ParamsError(f"params.yaml: 'tune.space.{key}' is a parameter of no model")
    designs = config.get(params, "tune", dict).get("designs") or {}
    if not isinstance(designs, dict):
        raise config.ParamsError(f"params.yaml: 'tune.designs' must be a mapping of model: [variants], got {designs!r}")
    for name in designs:
        if name not in registry.MODELS:
            raise config.ParamsError(f"params.yaml: 'tune.designs.{name}' names no registered model; registered: {sorted(registry.MODELS)}")
        designs_of(params, name)


def designs_of(params: dict[str, Any], model: str) -> list[dict[str, Any]] | None:
    """tune.designs.<model> (optional): a list of named variants, each a mapping of the settings it changes."""
    designs = (config.get(params, "tune", dict).get("designs") or {}).get(model)
    if designs is None:
        return None
    where = f"params.yaml: 'tune.designs.{model}'"
    if not isinstance(designs, list) or not all(isinstance(d, dict) and d for d in designs):
        raise config.ParamsError(f"{where} must be a list of non-empty mappings of key: value, got {designs!r}")
    accepted = accepted_keys(model)
    for i, design in enumerate(designs):
        for key in design:
            if key not in accepted:
                raise config.ParamsError(f"{where}[{i}].{key} is not a parameter of {model}; expected one of {sorted(accepted)}")
    return designs


def trial_configs(params: dict[str, Any], model: str, base: dict[str, Any], trials: int, seed: int) -> list[dict[str, Any]]:
    """Trial 0 = base; then up to trials-1 distinct grid points, drawn with `seed` (the same draw on every machine).

    A model with `tune.designs.<model>` is searched over those variants instead of the grid: trial k is the base
    with design k's settings, for the first trials-1 designs (the same budget: a design search replaces the draw)."""
    if trials < 1:
        raise config.ParamsError(f"the number of trials (tune.trials or --trials) must be >= 1, got {trials}")
    designs = designs_of(params, model)
    if designs is not None:
        return [dict(base)] + [{**base, **d} for d in designs[: trials - 1]]
    space = search_space(params, model, base)
    size = int(np.prod([len(v) for v in space.values()])) if space else 0
    if size > MAX_GRID:
        raise config.ParamsError(f"params.yaml: the tuning grid of {model} has {size} points (more than {MAX_GRID}); "
                                 "shorten the lists in 'tune.space' / 'tune.model_space'")
    configs = [dict(base)]
    if space:
        defaults = {k: v for k, v in registry.defaults(model).items() if k in space}
        seen = [{**defaults, **base}]  # what each trial runs with: a grid point equal to it is no new trial
        grid = [dict(zip(space, values)) for values in itertools.product(*space.values())]
        for index in np.random.default_rng(seed).permutation(len(grid)):
            if len(configs) >= trials:
                break
            candidate = {**base, **grid[index]}
            if {**defaults, **candidate} not in seen:
                configs.append(candidate)
                seen.append({**defaults, **candidate})
    return configs


def tune_model(dataset: data.Dataset, model: str, configs: list[dict[str, Any]], cfg: TrainConfig, seed: int,
               out_dir: Path, data_hash: str) -> pd.DataFrame:
    """Train every trial of one model (reusing finished ones); one row per trial, scored on validation."""
    tuned = sorted({k for c in configs for k in c if any(c.get(k) != o.get(k) for o in configs)})
    rows = []
    for trial, hyper in enumerate(configs):
        result = train_run(dataset, model, hyper, cfg, seed, out_dir / model / f"trial{trial}", data_hash)
        rows.append({
            "model": model, "trial": trial, "tuned": json.dumps({k: hyper.get(k) for k in tuned}, sort_keys=True),
            "valid_MRR": result["best_valid_score"], "best_epoch": result["best_epoch"],
            "epochs_run": result["epochs_run"], "train_seconds": round(result["train_seconds"], 1),
            "params": json.dumps(hyper, sort_keys=True),
            "fingerprint": result["fingerprint"],
        })
    table = pd.DataFrame(rows)
    table["best"] = table["valid_MRR"] == table["valid_MRR"].max()  # ties: every tied trial is marked
    return table


def train_trials(dataset_name: str, prepared: Path, plans: dict[str, list[dict[str, Any]]], cfg: TrainConfig, seed: int,
                 out_dir: Path, data_hash: str) -> None:
    """Train every unfinished trial of every model, `cfg.workers` at once (tema.train's seed workers). Finished trials
    are kept when one fails; the failures are raised together once the others are done. tune_model then reads the
    finished runs."""
    jobs = {
        (model, trial): (dataset_name, prepared, model, hyper, cfg, seed, out_dir / model / f"trial{trial}", data_hash)
        for model, configs in plans.items() for trial, hyper in enumerate(configs)
    }
    _, errors = train_parallel(jobs, cfg.workers)
    if errors:
        raise RuntimeError(f"tuning on {dataset_name}: {len(errors)} trial(s) failed (finished trials are kept; a re-run "
                           "resumes): " + "; ".join(f"{m} trial {t}: {errors[m, t]}" for m, t in sorted(errors)))


def kept_rows(path: Path, out_dir: Path, models: list[str]) -> pd.DataFrame | None:
    """The rows of an earlier search table for models other than `models` that still stand: a search over some models
    keeps what was found for the others. A row stands while its trial is the finished run in `out_dir` with the same
    fingerprint, or while that run is not on this machine at all (data/tuning does not travel with the repository:
    a committed table is not thrown away on a fresh clone). Rows whose run was re-trained since (another dataset size,
    other code: another fingerprint) are dropped, with a message."""
    if not path.exists():
        return None
    old = pd.read_csv(path, dtype={"fingerprint": str})
    old = old[~old["model"].isin(models)]
    if old.empty:
        return None

    def current(row) -> bool:
        run_json = out_dir / row.model / f"trial{row.trial}" / "run.json"
        if "fingerprint" not in old.columns:
            return False
        if not run_json.exists():
            return not (out_dir / row.model).exists()  # a model never tuned on this machine: its rows stand as recorded
        return json.loads(run_json.read_text(encoding="utf-8")).get("fingerprint") == row.fingerprint

    keep = np.array([current(row) for row in old.itertuples(index=False)], dtype=bool)
    dropped = sorted(set(old.loc[~keep, "model"]))
    if dropped:
        print(f"{path}: dropping the earlier rows of {dropped}: their trial runs in {out_dir} were re-trained since "
              "or are missing (tune them again to list them)", file=sys.stderr)
    return old[keep] if keep.any() else None


def best_params(table: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """Each model's best trial (the lowest-numbered one on a tie, so the params.yaml config wins ties)."""
    best = table.sort_values(["model", "valid_MRR", "trial"], ascending=[True, False, True]).groupby("model").head(1)
    return {row.model: json.loads(row.params) for row in best.itertuples(index=False)}


def run(dataset_name: str, params: dict[str, Any], models: list[str] | None = None, trials: int | None = None) -> pd.DataFrame:
    """The search for `models` (default: params' models but the ablations) on one dataset; writes the reports."""
    schema.check(params)
    ablations = set(registry.names("ablation"))
    if models and ablations & set(models):
        asked = [m for m in models if m in ablations]
        bases = ", ".join(f"`{b}`" for b in dict.fromkeys(registry.info(m).base for m in asked))
        raise config.ParamsError(f"{asked}: an ablation is its base model with switches fixed and inherits the base's "
                                 f"settings; tune {bases} and the ablations run with its tuned settings")
    models = models or [m for m in config.get(params, "models", list) if m not in ablations]
    trials = trials if trials is not None else config.get(params, "tune.trials", int)
    seed = config.get(params, "tune.seed", int)
    check_tune_params(params, models)
    cfg = TrainConfig.from_params(params)
    prepared = config.dataset_dir("prepared", dataset_name)
    dataset = data.load(dataset_name, prepared)
    data_hash = data_fingerprint(prepared)
    plans = {m: trial_configs(params, m, model_params(params, m), trials, seed) for m in models}  # all errors first
    out_dir = config.dataset_dir("tuning", dataset_name)
    if cfg.workers > 1 and sum(len(c) for c in plans.values()) > 1:
        train_trials(dataset_name, prepared, plans, cfg, seed, out_dir, data_hash)
    table = pd.concat([tune_model(dataset, m, plans[m], cfg, seed, out_dir, data_hash) for m in models], ignore_index=True)
    reports = artifacts.tuning_dir()
    reports.mkdir(parents=True, exist_ok=True)
    earlier = kept_rows(reports / f"{dataset_name}.csv", out_dir, models)
    if earlier is not None:
        table = pd.concat([earlier, table], ignore_index=True)
    table.to_csv(reports / f"{dataset_name}.csv", index=False, float_format="%.6f")
    header = (f"# Best validation trial per model from `tema tune {dataset_name}` (up to {trials} trials each, seed {seed},\n"
              f"# the same train settings for every model; an ablation inherits its base model's). A profile overlays\n"
              f"# profiles/default.yaml: copy this into profiles/ and add what else the search ran with.\n")
    body = yaml.safe_dump({"model_params": best_params(table)}, sort_keys=False)
    (reports / f"{dataset_name}-params.yaml").write_text(header + body, encoding="utf-8")
    return table


def joint_table(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """One configuration per model across several datasets' searches (`tema tune-joint`).

    Each dataset's search tried up to `tune.trials` configurations per model on its own validation split. For a
    model, the configurations tried on every dataset (compared with defaults filled in) are scored by the mean, over
    the datasets, of their validation MRR divided by the best validation MRR of that model on that dataset (1.0: the
    best on each). The ratio puts datasets whose MRR levels differ on one scale. The best score wins; a tie goes to
    the configuration listed first by the first dataset. One row per (model, configuration tried on all datasets).
    The test split is not read: the search tables hold validation scores only."""
    names = list(tables)
    if len(names) < 2:
        raise config.ParamsError(f"a joint selection needs the searches of two datasets or more, got {names}")
    rows = []
    models = [m for m in dict.fromkeys(tables[names[0]]["model"]) if all(m in set(tables[n]["model"]) for n in names)]
    missing = sorted({m for n in names for m in tables[n]["model"]} - set(models))
    if missing:
        print(f"tune-joint: {missing} were not searched on every one of {names}; they are left out", file=sys.stderr)
    for model in models:
        per = {}
        for name in names:
            own = tables[name][tables[name]["model"] == model]
            best = float(own["valid_MRR"].max())
            per[name] = {
                registry.effective(model, json.loads(row.params)):
                    (row.trial, float(row.valid_MRR), float(row.valid_MRR) / best if best > 0 else 0.0, row.params)
                for row in own.itertuples(index=False)
            }
        common = [key for key in per[names[0]] if all(key in per[n] for n in names)]
        if not common:
            raise config.ParamsError(f"tune-joint: no configuration of {model} was tried on every one of {names}; "
                                     "run `tema tune` with the same params.yaml on each")
        for order, key in enumerate(common):
            row = {"model": model, "order": order, "params": per[names[0]][key][3]}
            for name in names:
                trial, valid, ratio, _ = per[name][key]
                row[f"trial ({name})"] = trial
                row[f"valid_MRR ({name})"] = round(valid, 6)
                row[f"ratio ({name})"] = round(ratio, 4)
            row["joint_score"] = round(float(np.mean([per[n][key][2] for n in names])), 4)
            rows.append(row)
    table = pd.DataFrame(rows)
    top = table.sort_values(["model", "joint_score", "order"], ascending=[True, False, True]).groupby("model").head(1)
    table["best"] = table.index.isin(top.index)
    return table.drop(columns=["order"])


def run_joint(dataset_names: list[str]) -> pd.DataFrame:
    """Read reports/tuning/<dataset>.csv of each dataset; write reports/tuning/joint.csv and joint-params.yaml (each
    model's configuration of the best joint score, as a profile fragment)."""
    reports = artifacts.tuning_dir()
    tables = {}
    for name in dict.fromkeys(dataset_names):
        path = reports / f"{name}.csv"
        if not path.exists():
            raise config.ParamsError(f"{path.relative_to(config.repo_root())}: not found; run `tema tune {name}` first")
        tables[name] = pd.read_csv(path, dtype={"fingerprint": str})
    table = joint_table(tables)
    table.to_csv(reports / "joint.csv", index=False)
    best = {row.model: json.loads(row.params) for row in table[table["best"]].itertuples(index=False)}
    header = (f"# One configuration per model for {', '.join(tables)}, from `tema tune-joint`: among the configurations\n"
              "# searched on every dataset, the best mean of validation MRR / the model's best validation MRR there.\n"
              "# A profile overlays profiles/default.yaml: copy this into profiles/ and add what else the study runs with.\n")
    (reports / "joint-params.yaml").write_text(header + yaml.safe_dump({"model_params": best}, sort_keys=False), encoding="utf-8")
    return table
