"""One training loop for every model: seeds, next-item loss per domain, early stopping on validation.

A run (model x seed) keeps the state with the best validation score (mean of the two domains'
full-ranking MRR) and never looks at test data. Finished runs are marked by run.json, written last,
with a fingerprint of everything that determines them, so an interrupted stage resumes where it stopped
and a changed parameter retrains exactly what it affects.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from tema import artifacts, config
from tema.data import Dataset
from tema.protocols import evaluate_split, selection_score
from tema.models import ItemSpace, build
from tema.models.base import next_item_loss  # noqa: F401  (re-exported: tests and benchmarks use it here)


@dataclass(frozen=True)
class TrainConfig:
    seeds: tuple[int, ...]
    max_epochs: int
    patience: int
    batch_size: int
    max_len: int
    loss: str
    n_negatives: int
    eval_batch_size: int
    device: str
    num_threads: int
    workers: int = 1  # seeds trained at once, each in its own process (tema.train.run); not part of a run's identity

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> TrainConfig:
        seeds = config.get(params, "train.seeds", list)
        if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
            raise config.ParamsError(f"params.yaml: 'train.seeds' must be a non-empty list of integers, got {seeds!r}")
        loss = config.get(params, "train.loss", str)
        if loss not in ("full", "sampled"):
            raise config.ParamsError(f"params.yaml: 'train.loss' must be 'full' or 'sampled', got {loss!r}")
        cfg = cls(
            seeds=tuple(seeds),
            max_epochs=config.get(params, "train.max_epochs", int),
            patience=config.get(params, "train.patience", int),
            batch_size=config.get(params, "train.batch_size", int),
            max_len=config.get(params, "train.max_len", int),
            loss=loss,
            n_negatives=config.get(params, "train.n_negatives", int),
            eval_batch_size=config.get(params, "evaluate.batch_size", int),
            device=config.get(params, "train.device", str),
            num_threads=config.get(params, "train.num_threads", int),
            workers=config.get(params, "train.workers", int),
        )
        for name in ("max_epochs", "patience", "batch_size", "max_len", "n_negatives", "eval_batch_size", "num_threads",
                     "workers"):
            if getattr(cfg, name) < 1:
                raise config.ParamsError(f"params.yaml: train setting '{name}' must be >= 1, got {getattr(cfg, name)}")
        return cfg


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def training_batches(sequences: list[list[int]], batch_size: int, max_len: int, rng: np.random.Generator):
    """Shuffled batches of (inputs, targets), left-padded model indices; similar lengths share a batch.

    Each sequence is cut to its last max_len + 1 items; position t of inputs predicts targets[t].
    """
    order = rng.permutation(len(sequences))
    chunk = batch_size * 50
    batches = []
    for lo in range(0, len(order), chunk):
        part = sorted(order[lo : lo + chunk], key=lambda i: len(sequences[i]))
        batches += [part[i : i + batch_size] for i in range(0, len(part), batch_size)]
    for b in rng.permutation(len(batches)):
        rows = [sequences[i][-(max_len + 1) :] for i in batches[b]]
        length = max(len(r) for r in rows) - 1
        inputs = torch.zeros(len(rows), length, dtype=torch.long)
        targets = torch.zeros(len(rows), length, dtype=torch.long)
        for j, seq in enumerate(rows):
            s = torch.as_tensor(seq, dtype=torch.long) + 1
            inputs[j, length - len(seq) + 1 :] = s[:-1]
            targets[j, length - len(seq) + 1 :] = s[1:]
        yield inputs, targets


def code_fingerprint(model_name: str) -> str:
    """Hash of the code that determines a trained run: this loop, the shared model code, the model's module."""
    import inspect

    from tema.models import MODELS

    here = Path(__file__).parent
    files = {here / "training.py", here / "protocols.py", here / "data.py", here / "models" / "base.py",
             here / "models" / "registry.py", Path(inspect.getfile(MODELS[model_name]))}
    digest = hashlib.sha256()
    for path in sorted(files):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def fingerprint(model_name: str, hyper: dict[str, Any], cfg: TrainConfig, seed: int, data_hash: str, features_id: str | None = None) -> str:
    """What a finished run is reused by: model, settings, seed, data, code, and the features it reads (if any)."""
    run = {
        "model": model_name, "hyper": hyper,
        "train": {**{k: v for k, v in asdict(cfg).items() if k != "workers"}, "seeds": None, "device": None},
        "seed": seed, "data": data_hash, "code": code_fingerprint(model_name),
    }
    if features_id is not None:
        run["features"] = features_id
    return hashlib.sha256(json.dumps(run, sort_keys=True).encode()).hexdigest()[:16]


def data_fingerprint(prepared_dir: Path) -> str:
    digest = hashlib.sha256()
    for name in ("items.parquet", "sequences.parquet"):
        digest.update((prepared_dir / name).read_bytes())
    return digest.hexdigest()[:16]


def reads_features(model_name: str) -> bool:
    """Whether a registered model reads the features stage's arrays (tema.models.tema.ReadsFeatures)."""
    return bool(getattr(model_class(model_name), "reads_features", False))


def model_class(model_name: str) -> type:
    from tema.models import MODELS  # the package registers every model

    if model_name not in MODELS:
        raise KeyError(f"params.yaml: unknown model {model_name!r} in 'models'; registered: {sorted(MODELS)}")
    return MODELS[model_name]


def model_features(dataset: Dataset, model_name: str) -> dict[str, Any] | None:
    """The features stage's arrays of the dataset, for a model that reads them; None for the others."""
    return artifacts.load_features(dataset.name) if reads_features(model_name) else None


def build_model(dataset: Dataset, model_name: str, hyper: dict[str, Any], cfg: TrainConfig, train: pd.DataFrame,
                features: dict[str, Any] | None = None):
    """The model, set up from the training split only (a model's own max_len, if any, overrides train.max_len);
    a model that reads features gets `features` (by default the dataset's, from the features stage)."""
    max_len = int(hyper.get("max_len", cfg.max_len))
    if max_len < 1:
        raise config.ParamsError(f"params.yaml: 'model_params.{model_name}.max_len' must be >= 1, got {max_len}")
    arch = dict(hyper)
    if reads_features(model_name):
        arch["features"] = features if features is not None else model_features(dataset, model_name)
    model = build(model_name, ItemSpace.of(dataset), arch, max_len)
    model.setup(train)
    return model


def train_run(
    dataset: Dataset,
    model_name: str,
    hyper: dict[str, Any],
    cfg: TrainConfig,
    seed: int,
    out_dir: Path,
    data_hash: str,
) -> dict[str, Any]:
    """Train one model with one seed into out_dir (model.pt, history.csv, run.json); resumes if done."""
    out_dir.mkdir(parents=True, exist_ok=True)
    marker = out_dir / "run.json"
    features = model_features(dataset, model_name)
    fp = fingerprint(model_name, hyper, cfg, seed, data_hash, features["identity"] if features is not None else None)
    if marker.is_file():
        try:
            done = json.loads(marker.read_text())
        except ValueError:
            done = {}  # unreadable: not a finished run
        if done.get("fingerprint") == fp and (out_dir / "model.pt").is_file():
            print(f"{model_name} seed {seed}: already trained (fingerprint {fp}), reusing", file=sys.stderr)
            return done
        # stale (parameters, data or code changed): kept until the new run has finished, so a run that fails
        # (a bad setting, an interrupt) leaves the old one usable when the old settings come back

    torch.set_num_threads(cfg.num_threads)
    seed_everything(seed)
    device = resolve_device(cfg.device)
    space = ItemSpace.of(dataset)
    train = dataset.split("train")
    model = build_model(dataset, model_name, hyper, cfg, train, features).to(device)
    max_len = model.max_len
    valid = dataset.split("valid")
    started = time.perf_counter()
    history: list[dict[str, Any]] = []
    best_state, best_score, best_epoch = None, -1.0, 0

    def validate() -> tuple[float, dict[str, float]]:
        model.eval()
        per_user = evaluate_split(model.score, valid, space.domain_ranges, None, cfg.eval_batch_size, ("full",))
        model.train()
        by_domain = per_user.groupby("domain")["MRR"].mean()
        return selection_score(per_user), {f"valid_MRR_{d}": float(v) for d, v in by_domain.items()}

    if not model.trainable:
        model.fit(train)
        score, by_domain = validate()
        history.append({"epoch": 0, "loss": float("nan"), "valid_score": score, **by_domain, "seconds": 0.0, "sequences": 0})
        best_state, best_score = copy.deepcopy(model.state_dict()), score
    else:
        lr = float(hyper.get("lr", 1e-3))
        optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=float(hyper.get("weight_decay", 0.0)), fused=True)
        sequences = [h + [t] for h, t in zip(train["history"], train["target"])]
        rng = np.random.default_rng(seed)
        n_batches = -(-len(sequences) // cfg.batch_size)
        model.train()
        for epoch in range(1, cfg.max_epochs + 1):
            epoch_start, total, count = time.perf_counter(), 0.0, 0
            bar = tqdm(
                training_batches(sequences, cfg.batch_size, max_len, rng),
                total=n_batches, desc=f"{model_name} seed {seed} epoch {epoch}", unit="batch",
                file=sys.stderr, mininterval=10, leave=False, disable=os.environ.get("TEMA_PROGRESS") == "0",
            )
            for inputs, targets in bar:
                inputs, targets = inputs.to(device), targets.to(device)
                loss = model.training_loss(inputs, targets, cfg.loss, cfg.n_negatives)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += float(loss.detach()) * len(inputs)
                count += len(inputs)
                bar.set_postfix(loss=f"{total / count:.4f}", refresh=False)
            train_seconds = time.perf_counter() - epoch_start
            score, by_domain = validate()
            history.append({
                "epoch": epoch, "loss": total / count, "valid_score": score, **by_domain,
                "seconds": train_seconds, "sequences": count,
            })
            improved = score > best_score
            if improved:
                best_state, best_score, best_epoch = copy.deepcopy(model.state_dict()), score, epoch
            print(
                f"{model_name} seed {seed} epoch {epoch}: loss {total / count:.4f} valid MRR {score:.4f}"
                f"{' (best)' if improved else ''}", file=sys.stderr,
            )
            if epoch - best_epoch >= cfg.patience:
                break

    result = {
        "model": model_name, "seed": seed, "fingerprint": fp, "best_epoch": best_epoch,
        "best_valid_score": best_score, "epochs_run": len(history) if model.trainable else 0,
        "train_seconds": time.perf_counter() - started, "device": str(device),
    }
    # every file is written aside first; the old marker goes only once they are complete, and the run counts as
    # finished only once the new marker lands (a crash in between leaves no marker: the seed trains again)
    torch.save(best_state, out_dir / "model.pt.tmp")
    pd.DataFrame(history).to_csv(out_dir / "history.csv.tmp", index=False)
    (out_dir / "run.json.tmp").write_text(json.dumps(result, indent=2))
    marker.unlink(missing_ok=True)
    for name in ("model.pt", "history.csv", "run.json"):  # run.json last
        os.replace(out_dir / f"{name}.tmp", out_dir / name)
    return result


def load_run(dataset: Dataset, model_name: str, hyper: dict[str, Any], cfg: TrainConfig, run_dir: Path):
    """The selected checkpoint of a finished run, on the CPU, in eval mode."""
    if not (run_dir / "run.json").is_file():
        raise FileNotFoundError(f"{run_dir}: no finished run (run.json missing); run the train stage first")
    model = build_model(dataset, model_name, hyper, cfg, dataset.split("train"))
    state = torch.load(run_dir / "model.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.eval()
