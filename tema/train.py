"""Stage `train`: one model on one dataset, one run per seed (tema.training), plus its training curves.

Outputs: data/runs/<dataset>/<model>/seed<k>/{model.pt, history.csv, run.json} and
reports/<dataset>/curves-<model>.csv (per-epoch mean over seeds, for `dvc plots`).
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from tema import config, data
from tema.training import TrainConfig, data_fingerprint, train_run


def model_params(params: dict[str, Any], model: str) -> dict[str, Any]:
    hyper = config.get(params, f"model_params.{model}", (dict, type(None)))
    return dict(hyper or {})


def run(dataset_name: str, model: str, params: dict[str, Any]) -> pd.DataFrame:
    """Train every seed of `model` (skipping finished ones); returns the per-seed run summaries."""
    cfg = TrainConfig.from_params(params)
    hyper = model_params(params, model)
    prepared = config.dataset_dir("prepared", dataset_name)
    dataset = data.load(dataset_name, prepared)
    data_hash = data_fingerprint(prepared)
    out = config.dataset_dir("runs", dataset_name) / model
    results = [train_run(dataset, model, hyper, cfg, seed, out / f"seed{seed}", data_hash) for seed in cfg.seeds]
    curves = load_histories(dataset_name, model, cfg.seeds)
    numeric = curves.drop(columns=["seed"]).groupby("epoch").mean().reset_index()
    curves_path = config.repo_root() / "reports" / dataset_name / f"curves-{model}.csv"
    curves_path.parent.mkdir(parents=True, exist_ok=True)
    numeric.drop(columns=["seconds", "sequences"]).to_csv(curves_path, index=False, float_format="%.6f")
    return pd.DataFrame(results).drop(columns=["fingerprint", "train_seconds", "device"])


def load_histories(dataset_name: str, model: str, seeds) -> pd.DataFrame:
    out = config.dataset_dir("runs", dataset_name) / model
    frames = [pd.read_csv(out / f"seed{s}" / "history.csv").assign(seed=s) for s in seeds]
    return pd.concat(frames, ignore_index=True)
