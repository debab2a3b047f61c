"""Stage `train`: one model on one dataset, one run per seed (tema.training), plus its training curves.

Outputs: data/runs/<dataset>/<model>/seed<k>/{model.pt, history.csv, run.json} and
reports/<dataset>/curves-<model>.csv (per-epoch mean over seeds, for `dvc plots`).
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Hashable
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import pandas as pd

from tema import artifacts, config, data, schema
from tema.models import registry
from tema.training import TrainConfig, data_fingerprint, load_run, train_run


def model_params(params: dict[str, Any], model: str) -> dict[str, Any]:
    """The hyper-parameters the model runs with: model_params.<model>, for an ablation merged over its base's
    (tema.models.registry.hyper)."""
    return registry.hyper(params, model)


def run(dataset_name: str, model: str, params: dict[str, Any]) -> pd.DataFrame:
    """Train every seed of `model` (skipping finished ones); returns the per-seed run summaries.

    With `train.workers` > 1 the seeds train at once, each in its own process with `train.num_threads`
    threads: on a few CPU cores that uses them better than one run with more threads. A seed that fails
    does not stop the others; its error is raised once they have finished (finished seeds are kept).
    """
    schema.check(params)
    cfg = TrainConfig.from_params(params)
    hyper = model_params(params, model)
    prepared = config.dataset_dir("prepared", dataset_name)
    data_hash = data_fingerprint(prepared)
    out = config.dataset_dir("runs", dataset_name) / model
    if cfg.workers > 1 and len(cfg.seeds) > 1:
        results = _train_parallel(dataset_name, prepared, model, hyper, cfg, out, data_hash)
    else:
        dataset = data.load(dataset_name, prepared)
        results = [train_run(dataset, model, hyper, cfg, seed, out / f"seed{seed}", data_hash) for seed in cfg.seeds]
    curves = artifacts.load_histories(dataset_name, model, cfg.seeds)
    numeric = curves.drop(columns=["seed"]).groupby("epoch").mean().reset_index()
    curves_path = config.repo_root() / "reports" / dataset_name / f"curves-{model}.csv"
    curves_path.parent.mkdir(parents=True, exist_ok=True)
    numeric.drop(columns=["seconds", "sequences"]).to_csv(curves_path, index=False, float_format="%.6f")
    return pd.DataFrame(results).drop(columns=["fingerprint", "train_seconds", "device"])


def _train_seed(dataset_name: str, prepared: Path, model: str, hyper: dict[str, Any], cfg: TrainConfig,
                seed: int, out_dir: Path, data_hash: str) -> dict[str, Any]:
    """One seed in a worker process (it loads the prepared data itself)."""
    return train_run(data.load(dataset_name, prepared), model, hyper, cfg, seed, out_dir, data_hash)


def _exit_with_parent(parent: int) -> None:
    """Worker initializer: end this worker when the process that started it is gone (a killed notebook
    kernel or `dvc repro` must not leave seeds training as orphans; unfinished seeds leave no run.json)."""
    import threading
    import time

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


def train_parallel(jobs: dict[Hashable, tuple], workers: int) -> tuple[dict[Hashable, dict[str, Any]], dict[Hashable, Exception]]:
    """Run `_train_seed(*args)` for every job, `workers` at once, each in a spawned process that ends with its
    parent. A failing job does not stop the others. Returns (results, errors), both keyed like `jobs`."""
    results: dict[Hashable, dict[str, Any]] = {}
    errors: dict[Hashable, Exception] = {}
    # spawn, not fork: torch's thread pools and a notebook kernel's state do not survive a fork
    with ProcessPoolExecutor(max_workers=max(1, min(workers, len(jobs))), mp_context=multiprocessing.get_context("spawn"),
                             initializer=_exit_with_parent, initargs=(os.getpid(),)) as pool:
        futures = {pool.submit(_train_seed, *args): key for key, args in jobs.items()}
        try:
            for future in as_completed(futures):
                try:
                    results[futures[future]] = future.result()
                except Exception as exc:  # the other jobs go on; the caller reports the failures
                    errors[futures[future]] = exc
        except BaseException:  # an interrupt (a notebook kernel's, Ctrl-C): stop the running jobs too, not only the queued
            running = list((pool._processes or {}).values())  # the executor has no public way to end running jobs
            pool.shutdown(wait=False, cancel_futures=True)  # (and it forgets its processes here)
            for process in running:
                process.terminate()  # an unfinished run leaves no run.json, so it is never mistaken for finished
            raise
    return results, errors


def _train_parallel(dataset_name: str, prepared: Path, model: str, hyper: dict[str, Any], cfg: TrainConfig,
                    out: Path, data_hash: str) -> list[dict[str, Any]]:
    jobs = {seed: (dataset_name, prepared, model, hyper, cfg, seed, out / f"seed{seed}", data_hash) for seed in cfg.seeds}
    results, errors = train_parallel(jobs, cfg.workers)
    if errors:
        failed = sorted(errors)
        raise RuntimeError(f"{model} on {dataset_name}: seed(s) {', '.join(map(str, failed))} failed (finished seeds are kept); "
                           f"seed {failed[0]}: {errors[failed[0]]}") from errors[failed[0]]
    return [results[seed] for seed in cfg.seeds]


def diagnose(dataset_name: str, model: str, params: dict[str, Any], users: int = 2000) -> pd.DataFrame | None:
    """What the tag path of each trained seed does (the model's `diagnostics`: scale of each term of the item vector,
    gates, rank-prior weight, normalised entropy of the tag attention, pair similarity), over the first `users`
    validation examples; one row per seed. None for a model without diagnostics. Reads no test data."""
    if not hasattr(registry.info(model).cls, "diagnostics"):
        return None
    cfg = TrainConfig.from_params(params)
    dataset = data.load(dataset_name, config.dataset_dir("prepared", dataset_name))
    histories = [list(h) for h in dataset.split("valid")["history"][:users]]
    rows = []
    for seed in cfg.seeds:
        found = load_run(dataset, model, model_params(params, model), cfg, artifacts.run_dir(dataset_name, model, seed))
        report = found.diagnostics(histories)
        row: dict[str, Any] = {"seed": seed}
        for group in ("scale", "gates", "similarity", "tag_attention"):
            for key, value in (report.get(group) or {}).items():
                row[f"{group}: {key}"] = value
        row["rank-prior weight"] = report.get("rank_prior_weight")
        rows.append(row)
    return pd.DataFrame(rows).set_index("seed")
