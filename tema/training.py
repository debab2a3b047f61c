"""One training loop for every model: seeds, next-item loss per domain, early stopping on validation.

A run (model x seed) keeps the state with the best validation score (mean of the two domains'
full-ranking MRR) and never looks at test data. Finished runs are marked by run.json, written last,
with a fingerprint of everything that determines them, so an interrupted stage resumes where it stopped
and a changed parameter retrains exactly what it affects.
"""

from __future__ import annotations

import copy
import hashlib
import io
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

from tema import artifacts, atomic, config
from tema.data import DataError, Dataset
from tema.models import registry
from tema.models.base import ItemSpace
from tema.models.registry import build
from tema.protocols import evaluate_split, selection_score

# tema.models.base and .registry, not the tema.models package: the package's __init__ imports every model, and
# code_fingerprint hashes what this module imports (a package's __init__ where the package itself is imported).


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


def code_fingerprint(model_name: str, root: Path | None = None) -> str:
    """Hash of the code that determines a trained run: the model's module and this loop, with the tema modules they
    import at module level, transitively (tema.imports.depends_on), read from the package under root (by default
    the repository's; tests point it at an edited copy).

    For every model the hash covers this file, tema/artifacts.py, tema/atomic.py, tema/config.py, tema/data.py,
    tema/protocols.py, tema/models/base.py and tema/models/registry.py, and the model's module with what it imports: for TEMA and
    SASRec-text (tema/models/tema.py) and C2DSR also tema/models/sasrec.py, whose blocks and masks they use
    (tests/test_structure.py checks this list). An edit to another model, to tema/models/__init__.py (it imports
    the models to register them), to a dataset reader (tema/datasets/) or to a stage (tema/train.py, ...) changes
    no fingerprint; an edit to tema/artifacts.py (every stage's readers and writers) changes all of them.
    """
    from tema import imports  # here, not at module level: that would hash tema/imports.py into every fingerprint

    root = imports.ROOT if root is None else root
    files = imports.depends_on([imports.module_file(model_class(model_name).__module__, root),
                                imports.module_file(__name__, root)], root)
    digest = hashlib.sha256()
    for rel in files:  # sorted, named by their path in the repository: the same code hashes alike under any root
        digest.update(rel.encode() + (root / rel).read_bytes())
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
    return registry.info(model_name).reads_features


def model_class(model_name: str) -> type:
    return registry.info(model_name).cls


def model_features(dataset: Dataset, model_name: str, hyper: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The features stage's arrays of the dataset, for a model that reads them; None for the others. A model whose
    hyper-parameters name a tag source (`tags_from`, one of tags.other_sources) gets that source's tag arrays."""
    if not reads_features(model_name):
        return None
    return artifacts.load_features(dataset.name, tag_source_of(model_name, hyper))


def tag_source_of(model_name: str, hyper: dict[str, Any] | None) -> str | None:
    """The tag source a model reads (`tags_from`, from its hyper-parameters or the switch its ablation fixes); None:
    the dataset's own."""
    return {**(hyper or {}), **registry.info(model_name).fixed}.get("tags_from")


def build_model(dataset: Dataset, model_name: str, hyper: dict[str, Any], cfg: TrainConfig, train: pd.DataFrame,
                features: dict[str, Any] | None = None):
    """The model, set up from the training split only (a model's own max_len, if any, overrides train.max_len);
    a model that reads features gets `features` (by default the dataset's, from the features stage)."""
    max_len = int(hyper.get("max_len", cfg.max_len))
    if max_len < 1:
        raise config.ParamsError(f"params.yaml: 'model_params.{model_name}.max_len' must be >= 1, got {max_len}")
    arch = dict(hyper)
    if reads_features(model_name):
        arch["features"] = features if features is not None else model_features(dataset, model_name, hyper)
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
    features = model_features(dataset, model_name, hyper)
    fp = fingerprint(model_name, hyper, cfg, seed, data_hash, features["identity"] if features is not None else None)
    done = finished_run(out_dir, fp)
    if done is not None:
        print(f"{model_name} seed {seed}: already trained (fingerprint {fp}), reusing", file=sys.stderr)
        return done
    # a stale run (parameters, data or code changed) is kept until the new run has finished, so a run that fails
    # (a bad setting, an interrupt) leaves the old one usable when the old settings come back

    torch.set_num_threads(cfg.num_threads)
    seed_everything(seed)
    device = resolve_device(cfg.device)
    train = dataset.split("train")
    model = build_model(dataset, model_name, hyper, cfg, train, features).to(device)
    valid = dataset.split("valid")
    started = time.perf_counter()
    fitted = fit(model, train, valid, cfg, hyper, seed, device, f"{model_name} seed {seed}")
    result = {
        "model": model_name, "seed": seed, "fingerprint": fp, "best_epoch": fitted.best_epoch,
        "best_valid_score": fitted.best_score, "epochs_run": len(fitted.history) if model.trainable else 0,
        "train_seconds": time.perf_counter() - started, "device": str(device),
    }
    save_run(out_dir, fitted, result)
    return result


class CheckpointError(DataError):
    """A run's files are damaged or incomplete: they do not match the digests in its run.json, or do not load."""


RUN_FILES = ("model.pt", "history.csv")  # what run.json's `files` holds a SHA-256 of; run.json itself is written last


def damage(out_dir: Path, done: dict[str, Any]) -> str | None:
    """Why the files of a run do not match its run.json (missing, a digest that differs, no digests at all); None
    when every file of RUN_FILES is there with the digest run.json records."""
    digests = done.get("files")
    if not isinstance(digests, dict):
        return "its run.json records no file digests (written by an older version)"
    for name in RUN_FILES:
        path = out_dir / name
        if not path.is_file():
            return f"{name} is missing"
        if hashlib.sha256(path.read_bytes()).hexdigest() != digests.get(name):
            return f"{name} does not match the SHA-256 in run.json (damaged or replaced)"
    return None


def read_marker(out_dir: Path) -> dict[str, Any] | None:
    """out_dir/run.json as a dict; None when there is none or it is not a JSON object (an unfinished run)."""
    try:
        done = json.loads((out_dir / "run.json").read_text())
    except (OSError, ValueError):
        return None
    return done if isinstance(done, dict) else None


def finished_run(out_dir: Path, fp: str) -> dict[str, Any] | None:
    """The result in out_dir/run.json if out_dir holds a finished run with fingerprint fp whose files match the digests
    in run.json. A damaged run is not finished (the train stage says why and trains it again)."""
    done = read_marker(out_dir)
    if done is None or done.get("fingerprint") != fp:
        return None
    problem = damage(out_dir, done)
    if problem is not None:
        print(f"{out_dir}: not reused: {problem}; training it again", file=sys.stderr)
        return None
    return {key: value for key, value in done.items() if key != "files"}


@dataclass
class Fit:
    """What the loop found: one history row per epoch (history.csv), and the state that scored best on validation."""

    history: list[dict[str, Any]]
    best_state: dict[str, torch.Tensor] | None
    best_score: float
    best_epoch: int  # 0: before any epoch (a model fitted without gradient steps)
    validation_seconds: list[float]  # per validation, beside history's training seconds (benchmarks report both)


def fit(model, train: pd.DataFrame, valid: pd.DataFrame, cfg: TrainConfig, hyper: dict[str, Any], seed: int,
        device: torch.device, label: str) -> Fit:
    """The training loop: epochs of next-item loss over the training sequences (Adam, hyper's lr and weight_decay),
    a validation after each, until cfg.patience epochs bring no better score or cfg.max_epochs have run. A model
    that is not trained by gradient steps (model.trainable False) is fitted once and validated. Seeds numpy's batch
    order with `seed`; torch's generator is the caller's (tema.training.seed_everything before building the model).
    `label` names the run in progress output."""
    if not model.trainable:
        model.fit(train)
        score, by_domain, seconds = validate(model, valid, cfg)
        row = {"epoch": 0, "loss": float("nan"), "valid_score": score, **by_domain, "seconds": 0.0, "sequences": 0}
        return Fit([row], copy.deepcopy(model.state_dict()), score, 0, [seconds])
    optimizer = torch.optim.Adam(model.parameters(), lr=float(hyper.get("lr", 1e-3)),
                                 weight_decay=float(hyper.get("weight_decay", 0.0)), fused=True)
    sequences = [h + [t] for h, t in zip(train["history"], train["target"], strict=True)]
    rng = np.random.default_rng(seed)
    fitted = Fit([], None, -1.0, 0, [])
    model.train()
    for epoch in range(1, cfg.max_epochs + 1):
        started = time.perf_counter()
        batches = training_batches(sequences, cfg.batch_size, model.max_len, rng)
        loss, count = train_epoch(model, optimizer, batches, cfg, device, f"{label} epoch {epoch}",
                                  -(-len(sequences) // cfg.batch_size))
        train_seconds = time.perf_counter() - started
        score, by_domain, seconds = validate(model, valid, cfg)
        fitted.history.append({"epoch": epoch, "loss": loss, "valid_score": score, **by_domain,
                               "seconds": train_seconds, "sequences": count})
        fitted.validation_seconds.append(seconds)
        improved = score > fitted.best_score
        if improved:
            fitted.best_state, fitted.best_score, fitted.best_epoch = copy.deepcopy(model.state_dict()), score, epoch
        print(f"{label} epoch {epoch}: loss {loss:.4f} valid MRR {score:.4f}{' (best)' if improved else ''}",
              file=sys.stderr)
        if epoch - fitted.best_epoch >= cfg.patience:
            break
    return fitted


def train_epoch(model, optimizer: torch.optim.Optimizer, batches, cfg: TrainConfig, device: torch.device,
                label: str, n_batches: int) -> tuple[float, int]:
    """One pass of gradient steps over batches (training_batches), with a progress bar: mean loss, sequences seen."""
    total, count = 0.0, 0
    bar = tqdm(batches, total=n_batches, desc=label, unit="batch", file=sys.stderr, mininterval=10, leave=False,
               disable=os.environ.get("TEMA_PROGRESS") == "0")
    for inputs, targets in bar:
        inputs, targets = inputs.to(device), targets.to(device)
        loss = model.training_loss(inputs, targets, cfg.loss, cfg.n_negatives)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += float(loss.detach()) * len(inputs)
        count += len(inputs)
        bar.set_postfix(loss=f"{total / count:.4f}", refresh=False)
    return total / count, count


def validate(model, valid: pd.DataFrame, cfg: TrainConfig) -> tuple[float, dict[str, float], float]:
    """The selection score on the validation split (full ranking), each domain's MRR, and the seconds it took;
    leaves the model in training mode."""
    started = time.perf_counter()
    model.eval()
    per_user = evaluate_split(model.score, valid, model.space.domain_ranges, None, cfg.eval_batch_size, ("full",))
    model.train()
    by_domain = per_user.groupby("domain")["MRR"].mean()
    seconds = time.perf_counter() - started
    return selection_score(per_user), {f"valid_MRR_{d}": float(v) for d, v in by_domain.items()}, seconds


def save_run(out_dir: Path, fitted: Fit, result: dict[str, Any]) -> None:
    """Write a finished run: the best state (model.pt), the history (history.csv), then the result (run.json) with
    the SHA-256 of the other two. Each file is written whole (tema.atomic); the old marker goes first and the run
    counts as finished only once the new one lands, so a crash or a full disk in between leaves no finished run."""
    buffer = io.BytesIO()
    torch.save(fitted.best_state, buffer)
    blobs = {"model.pt": buffer.getvalue(),
             "history.csv": pd.DataFrame(fitted.history).to_csv(index=False).encode()}
    (out_dir / "run.json").unlink(missing_ok=True)
    for name, blob in blobs.items():
        atomic.write_bytes(out_dir / name, blob)
    files = {name: hashlib.sha256(blob).hexdigest() for name, blob in blobs.items()}
    atomic.write_text(out_dir / "run.json", json.dumps({**result, "files": files}, indent=2))


def load_state(run_dir: Path) -> dict[str, torch.Tensor]:
    """The checkpoint of a finished run, checked before use: its files match run.json's digests, it loads as tensors
    only (weights_only), and every floating-point weight is finite. CheckpointError (one line naming the file and
    the stage to re-run) otherwise."""
    retrain = f"retrain it: dvc repro train@{run_dir.parent.parent.name}-{run_dir.parent.name}"
    if not (run_dir / "run.json").is_file():
        raise FileNotFoundError(f"{run_dir}: no finished run (run.json missing); run the train stage first")
    done = read_marker(run_dir)
    if done is None:
        raise CheckpointError(f"{run_dir / 'run.json'}: unreadable (not a JSON object); {retrain}")
    problem = damage(run_dir, done)
    if problem is not None:
        raise CheckpointError(f"{run_dir / 'model.pt'}: not loaded: {problem}; {retrain}")
    try:
        state = torch.load(run_dir / "model.pt", map_location="cpu", weights_only=True)
    except Exception as err:  # the digest matched, so the writer itself wrote something torch cannot read
        raise CheckpointError(f"{run_dir / 'model.pt'}: not a readable checkpoint ({type(err).__name__}); {retrain}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{run_dir / 'model.pt'}: expected a state dict of tensors; {retrain}")
    for key, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{run_dir / 'model.pt'}: weight {key!r} holds NaN or inf; {retrain}")
    return state


def load_run(dataset: Dataset, model_name: str, hyper: dict[str, Any], cfg: TrainConfig, run_dir: Path):
    """The selected checkpoint of a finished run (checked by load_state), on the CPU, in eval mode."""
    state = load_state(run_dir)
    model = build_model(dataset, model_name, hyper, cfg, dataset.split("train"))
    model.load_state_dict(state)
    return model.eval()
