"""Stage `prepare`: vendored raw benchmark -> canonical parquet, statistics, plots, evaluation candidates.

Outputs in data/prepared/<dataset>/:
  items.parquet, sequences.parquet   the canonical dataset (tema.data)
  candidates.parquet                 the seeded sampled-999 candidates of every valid/test example
  stats.json                         users, items, interactions per domain and split; lengths; overlap
  figures/                           history lengths and item popularity (PNG)
They are built in a temporary sibling folder and replace the previous ones only when all are written.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tema import config, data, datasets, schema
from tema.protocols import sample_candidates
from tema.views import PNG_METADATA, new_figure


def subsample(dataset: data.Dataset, train_users: int | None, eval_users: int | None, seed: int) -> data.Dataset:
    """A seeded subset of the examples per split (the smoke profile); item ids are kept as they are."""
    if train_users is None and eval_users is None:
        return dataset
    rng = np.random.default_rng(seed)
    parts = []
    for split in data.SPLITS:
        rows = dataset.split(split)
        limit = train_users if split == "train" else eval_users
        if limit is not None and limit < len(rows):
            rows = rows.iloc[np.sort(rng.choice(len(rows), size=limit, replace=False))]
        parts.append(rows)
    sequences = pd.concat(parts, ignore_index=True)
    return data.Dataset(dataset.name, dataset.domain_names, dataset.items, sequences, dataset.provenance)


def candidates_table(dataset: data.Dataset, n: int, seed: int) -> pd.DataFrame:
    frames = []
    for offset, split in enumerate(("valid", "test")):
        rows = dataset.split(split)
        ranges = [dataset.domain_range(d) for d in rows["target_domain"]]
        cand = sample_candidates(rows["target"].to_numpy(), ranges, n, seed + offset)
        frames.append(pd.DataFrame({"split": split, "user": rows["user"], "candidates": list(cand.astype(np.int32))}))
    return pd.concat(frames, ignore_index=True)


def statistics(dataset: data.Dataset) -> dict[str, Any]:
    items, seqs = dataset.items, dataset.sequences
    domain_of = items["domain"].to_numpy()
    stats: dict[str, Any] = {"dataset": dataset.name, "domains": dataset.domain_names, "items": {}, "splits": {}}
    for domain in data.DOMAINS:
        stats["items"][domain] = int((items["domain"] == domain).sum())
    for split in data.SPLITS:
        rows = seqs[seqs["split"] == split]
        full = [h + [t] for h, t in zip(rows["history"], rows["target"])]
        flat = np.concatenate([np.asarray(s) for s in full]) if full else np.array([], dtype=int)
        per_domain = {d: int((domain_of[flat] == d).sum()) for d in data.DOMAINS}
        has = {d: np.array([(domain_of[np.asarray(s)] == d).any() for s in full]) for d in data.DOMAINS}
        lengths = np.array([len(h) for h in rows["history"]])
        stats["splits"][split] = {
            "examples": len(rows),
            "interactions": per_domain,
            "targets": {d: int((rows["target_domain"] == d).sum()) for d in data.DOMAINS},
            "overlap_examples": int((has["A"] & has["B"]).sum()),
            "only_A": int((has["A"] & ~has["B"]).sum()),
            "only_B": int((~has["A"] & has["B"]).sum()),
            "history_length": {
                "min": int(lengths.min()) if len(lengths) else 0, "median": float(np.median(lengths)) if len(lengths) else 0.0,
                "mean": round(float(lengths.mean()), 3) if len(lengths) else 0.0, "max": int(lengths.max()) if len(lengths) else 0,
            },
        }
    seen = np.zeros(len(items), dtype=bool)
    for h, t in zip(seqs["history"], seqs["target"]):
        seen[h] = True
        seen[t] = True
    stats["items_never_seen"] = int((~seen).sum())
    stats["titles_duplicated"] = int(items["title"].duplicated().sum())
    stats["items_with_text"] = int((items["text"].str.len() > 0).sum())
    return stats


def plot_statistics(dataset: data.Dataset, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    seqs = dataset.sequences
    fig, ax = new_figure(size=(6, 3.5))
    for split in data.SPLITS:
        lengths = seqs.loc[seqs["split"] == split, "history"].map(len)
        ax.hist(lengths, bins=np.arange(0, min(160, lengths.max() + 2)), histtype="step", label=split, density=True)
    ax.set(xlabel="history length (items)", ylabel="share of examples", title=f"{dataset.name}: history lengths", yscale="log")
    ax.legend()
    fig.tight_layout()
    paths = [out_dir / "history_lengths.png"]
    fig.savefig(paths[0], dpi=90, metadata=PNG_METADATA)

    train = dataset.split("train")
    counts = np.bincount(np.concatenate([np.concatenate(train["history"].to_numpy()), train["target"].to_numpy()]), minlength=dataset.n_items)
    fig, ax = new_figure(size=(6, 3.5))
    for domain in data.DOMAINS:
        start, stop = dataset.domain_range(domain)
        ax.plot(np.sort(counts[start:stop])[::-1], label=f"{domain}: {dataset.domain_names[domain]}")
    ax.set(xlabel="item rank", ylabel="training interactions", xscale="log", yscale="log", title=f"{dataset.name}: item popularity")
    ax.legend()
    fig.tight_layout()
    paths.append(out_dir / "item_popularity.png")
    fig.savefig(paths[1], dpi=90, metadata=PNG_METADATA)
    return paths


def check_candidates(dataset: data.Dataset, n_candidates: int) -> None:
    """Each valid/test example draws n_candidates distinct items of its target's domain other than the target
    (tema.protocols.sample_candidates), so every domain needs more than n_candidates items."""
    for domain in data.DOMAINS:
        start, stop = dataset.domain_range(domain)
        if n_candidates >= stop - start:
            raise config.ParamsError(
                f"params.yaml: 'evaluate.n_candidates' is {n_candidates}, but domain {domain} "
                f"({dataset.domain_names[domain]}) of {dataset.name} has {stop - start} items; expected fewer than "
                f"{stop - start} (the candidates are distinct items of the target's domain, the target excluded)"
            )


@contextmanager
def replaced_on_success(out: Path) -> Iterator[Path]:
    """A new empty folder beside `out` to build into; when the block succeeds it replaces `out` by rename.

    The old folder is renamed aside, the new one into place, then the old one is deleted, so `out` always holds
    one run's complete outputs. When the block fails the new folder is deleted and `out` is left as it was.
    Leftovers of a killed run of the same dataset (one runs at a time under DVC) are deleted first.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in [*out.parent.glob(f".{out.name}.tmp-*"), *out.parent.glob(f".{out.name}.old-*")]:
        shutil.rmtree(stale, ignore_errors=True)
    new, old = (out.with_name(f".{out.name}.{kind}-{os.getpid()}") for kind in ("tmp", "old"))
    new.mkdir()
    try:
        yield new
        if out.exists():
            out.rename(old)
        try:
            new.rename(out)
        except BaseException:
            if old.exists() and not out.exists():
                old.rename(out)
            raise
    finally:
        shutil.rmtree(new, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)


def write_outputs(dataset: data.Dataset, out: Path, n_candidates: int, candidate_seed: int) -> dict[str, Any]:
    data.save(dataset, out)
    candidates_table(dataset, n_candidates, candidate_seed).to_parquet(out / "candidates.parquet", index=False)
    stats = statistics(dataset)
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    plot_statistics(dataset, out / "figures")
    return stats


def run(dataset_name: str, params: dict[str, Any]) -> dict[str, Any]:
    """Execute the stage for one dataset; returns the statistics.

    Everything is checked before anything is written, and data/prepared/<dataset> is replaced as a whole only
    once all of its files are written (replaced_on_success): a failure leaves the previous outputs untouched.
    """
    schema.check(params)  # types and ranges; the candidate count against the domains' sizes needs the data (below)
    root = config.repo_root()
    train_users = params["prepare"]["subsample"]["train_users"]
    eval_users = params["prepare"]["subsample"]["eval_users"]
    seed = params["prepare"]["seed"]
    n_candidates = params["evaluate"]["n_candidates"]
    candidate_seed = params["evaluate"]["candidate_seed"]

    dataset = datasets.read_raw(dataset_name, root / "data" / "raw")
    check_candidates(dataset, n_candidates)
    dataset = subsample(dataset, train_users, eval_users, seed)
    with replaced_on_success(config.dataset_dir("prepared", dataset_name)) as out:
        return write_outputs(dataset, out, n_candidates, candidate_seed)
