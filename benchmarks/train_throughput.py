"""SASRec (or any registered model) training throughput on a full benchmark, on this machine.

Prints sequences/s, seconds per epoch, evaluation time (validation, both protocols' full scoring)
and peak resident memory. Reads the vendored raw data directly, so no pipeline run is needed.

    python benchmarks/train_throughput.py --model sasrec --epochs 2
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tema import config, data  # noqa: E402
from tema.models import ItemSpace, build  # noqa: E402
from tema.protocols import evaluate_split, selection_score  # noqa: E402
from tema.train import model_params  # noqa: E402
from tema.training import TrainConfig, next_item_loss, seed_everything, training_batches  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="food-kitchen")
    parser.add_argument("--model", default="sasrec")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--params", default=str(ROOT / "profiles" / "default.yaml"))
    args = parser.parse_args()

    params = config.load_params(args.params)
    cfg = TrainConfig.from_params(params)
    hyper = model_params(params, args.model)
    torch.set_num_threads(cfg.num_threads)
    seed_everything(0)
    dataset = data.read_raw(args.dataset, ROOT / "data" / "raw")
    space = ItemSpace.of(dataset)
    model = build(args.model, space, hyper, cfg.max_len)
    train, valid = dataset.split("train"), dataset.split("valid")
    sequences = [h + [t] for h, t in zip(train["history"], train["target"])]
    optimizer = torch.optim.Adam(model.parameters(), lr=float(hyper.get("lr", 1e-3)))
    rng = np.random.default_rng(0)
    print(f"{args.model} on {args.dataset}: {len(sequences)} training sequences, {cfg.num_threads} threads, loss={cfg.loss}")
    epoch_times = []
    for epoch in range(1, args.epochs + 1):
        model.train()
        start = time.perf_counter()
        for inputs, targets in training_batches(sequences, cfg.batch_size, cfg.max_len, rng):
            loss = next_item_loss(model.encode(inputs), targets, model.item_table(), space, cfg.loss, cfg.n_negatives)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        epoch_times.append(time.perf_counter() - start)
        model.eval()
        start = time.perf_counter()
        per_user = evaluate_split(model.score, valid, space.domain_ranges, None, cfg.eval_batch_size, ("full",))
        eval_seconds = time.perf_counter() - start
        print(
            f"epoch {epoch}: {epoch_times[-1]:.1f} s, {len(sequences) / epoch_times[-1]:.0f} sequences/s; "
            f"validation ({len(valid)} examples, full ranking) {eval_seconds:.2f} s, MRR {selection_score(per_user):.4f}"
        )
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"mean seconds/epoch: {np.mean(epoch_times):.1f}  sequences/s: {len(sequences) / np.mean(epoch_times):.0f}  peak RSS: {peak_mib:.0f} MiB")


if __name__ == "__main__":
    main()
