"""Training throughput of registered models on a full benchmark, side by side, on this machine.

For each model: sequences/s, seconds per epoch, validation time (full ranking) and the validation MRR
after each epoch, then a summary table with each model's time per epoch relative to the first model.
Reads the vendored raw data directly; models that read frozen features (TEMA, its ablations, SASRec-text)
need the features stage's output first (dvc repro features@<dataset>). Each measurement is the study's training
loop (tema.training.fit) with seed 0 and no early stopping, on train.device. Peak RSS is for the whole process.

    python benchmarks/train_throughput.py --models sasrec c2dsr --epochs 1
    python benchmarks/train_throughput.py --models sasrec sasrec-text tema --epochs 2
    python benchmarks/train_throughput.py --models tema --epochs 1 --parallel 3 --threads 1

--parallel N runs N copies of each measurement at once, one process each (as `train.workers` trains the
seeds of a model), and reports their combined sequences/s: compare it with --parallel 1 to choose
train.workers and train.num_threads for a machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import resource
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tema import config, datasets  # noqa: E402
from tema.train import model_params  # noqa: E402
from tema.training import TrainConfig, build_model, fit, resolve_device, seed_everything  # noqa: E402


def measure(name: str, dataset, params: dict, cfg: TrainConfig, epochs: int) -> dict:
    """`epochs` epochs of the training loop (tema.training.fit, seed 0, no early stop) on train.device."""
    hyper = model_params(params, name)
    cfg = dataclasses.replace(cfg, max_epochs=epochs, patience=epochs)
    seed_everything(0)
    device = resolve_device(cfg.device)
    train, valid = dataset.split("train"), dataset.split("valid")
    model = build_model(dataset, name, hyper, cfg, train).to(device)
    if not model.trainable:
        raise SystemExit(f"{name}: not trained by gradient steps, so there are no epochs to time")
    print(f"{name}: {len(train)} training sequences, max_len {model.max_len}, {cfg.num_threads} threads, {device}, "
          f"loss={cfg.loss}, {sum(p.numel() for p in model.parameters()):,} parameters")
    fitted = fit(model, train, valid, cfg, hyper, 0, device, name)
    for row, valid_seconds in zip(fitted.history, fitted.validation_seconds, strict=True):
        print(f"  epoch {row['epoch']}: {row['seconds']:.1f} s, {row['sequences'] / row['seconds']:.0f} sequences/s; "
              f"validation ({len(valid)} users, full ranking) {valid_seconds:.2f} s, MRR {row['valid_score']:.4f}")
    seconds = float(np.mean([row["seconds"] for row in fitted.history]))
    return {"model": name, "seconds_per_epoch": seconds, "sequences_per_s": len(train) / seconds,
            "eval_seconds": float(np.mean(fitted.validation_seconds)), "valid_score": fitted.history[-1]["valid_score"]}


def measure_in_process(args: tuple) -> dict:
    name, dataset_name, params, epochs = args
    cfg = TrainConfig.from_params(params)
    torch.set_num_threads(cfg.num_threads)
    dataset = datasets.read_raw(dataset_name, ROOT / "data" / "raw")
    return measure(name, dataset, params, cfg, epochs)


def measure_parallel(name: str, dataset_name: str, params: dict, epochs: int, copies: int) -> dict:
    """`copies` runs of the same measurement at once: their combined throughput (each ends when it ends)."""
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(copies) as pool:
        rows = pool.map(measure_in_process, [(name, dataset_name, params, epochs)] * copies)
    slowest = max(r["seconds_per_epoch"] for r in rows)
    return {"model": name, "seconds_per_epoch": slowest,
            "sequences_per_s": sum(r["sequences_per_s"] * r["seconds_per_epoch"] for r in rows) / slowest,
            "eval_seconds": max(r["eval_seconds"] for r in rows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="food-kitchen")
    parser.add_argument("--models", nargs="+", default=["sasrec"])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--params", default=str(ROOT / "profiles" / "default.yaml"))
    parser.add_argument("--parallel", type=int, default=1, help="copies of each run at once (default 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per run (default: train.num_threads)")
    args = parser.parse_args()

    params = config.load_params(args.params)
    if args.threads is not None:
        params["train"]["num_threads"] = args.threads
    cfg = TrainConfig.from_params(params)
    torch.set_num_threads(cfg.num_threads)
    if args.parallel > 1:
        rows = [measure_parallel(name, args.dataset, params, args.epochs, args.parallel) for name in args.models]
    else:
        dataset = datasets.read_raw(args.dataset, ROOT / "data" / "raw")
        rows = [measure(name, dataset, params, cfg, args.epochs) for name in args.models]
    base = rows[0]["seconds_per_epoch"]
    print(f"\n{args.dataset}, {args.epochs} epoch(s) each, {args.parallel} run(s) at once with "
          f"{cfg.num_threads} thread(s) each (seq/s: all runs together; s/epoch: the slowest run)")
    print(f"{'model':<12}{'s/epoch':>10}{'seq/s':>10}{'valid s':>10}{'x ' + rows[0]['model']:>14}")
    for r in rows:
        print(f"{r['model']:<12}{r['seconds_per_epoch']:>10.1f}{r['sequences_per_s']:>10.0f}{r['eval_seconds']:>10.2f}"
              f"{r['seconds_per_epoch'] / base:>14.2f}")
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
