"""Every stage's outputs: where they live, and how they are written and read back.

A stage writes its own outputs and reads those of the stages below it through this module only, so no
stage imports another to find a file. The layout (all under the repository root):

- data/prepared/<dataset>/   items.parquet, sequences.parquet, candidates.parquet, stats.json  (prepare)
- <tags.out_dir>/<dataset>/  item_tags.tsv, vocabulary.tsv, pass1_tags.tsv, failures.tsv,
                             provenance.json, accounting.json; the same in <source>/ for each further
                             named source of the dataset (tags.other_sources)                      (tags)
- data/features/<dataset>/   text.npy, tags.tsv, tag_vectors.npy, item_tag_ids.npy, item_tag_ranks.npy,
                             visual.npy, visual_mask.npy, visual_failures.tsv, meta.json; the tag arrays
                             of each further source in tags-<source>/                              (features)
- data/runs/<dataset>/<model>/seed<k>/   model.pt, history.csv, run.json                           (train)
- data/eval/<table>/         per_user.parquet                                                      (evaluate)
- reports/tables/<table>.json   what a result page shows of the table: the dataset's statistics, the
                             results, significance, curves, run times and explanations (evaluate; the
                             report stage reads only these, so a page renders without data/runs)

A directory whose completion marker (meta.json, run.json) is missing is not finished, and reading it is an
error that names the stage to run.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tema import config
from tema.data import DataError

# -- paths ---------------------------------------------------------------------------------------------

def prepared_dir(dataset: str) -> Path:
    return config.dataset_dir("prepared", dataset)


def tags_dir(params: dict[str, Any], dataset: str, source: str | None = None) -> Path:
    return config.tags_dir(params, dataset, source)


def features_dir(dataset: str) -> Path:
    return config.dataset_dir("features", dataset)


def runs_dir(dataset: str, model: str | None = None) -> Path:
    out = config.dataset_dir("runs", dataset)
    return out / model if model else out


def run_dir(dataset: str, model: str, seed: int) -> Path:
    return runs_dir(dataset, model) / f"seed{seed}"


def eval_dir(table: str) -> Path:
    return config.dataset_dir("eval", table)


def table_inputs_path(table: str) -> Path:
    """reports/tables/<table>.json: the evaluate stage's summary of a table for the result pages (committed)."""
    return reports_dir("tables") / f"{table}.json"


def text_memo_dir() -> Path:
    """Encoded item texts remembered by their exact input (tema.encoders.encode_memoized; git- and dvc-ignored)."""
    return config.repo_root() / "data" / "cache" / "text-vectors"


def reports_dir(name: str = "") -> Path:
    out = config.repo_root() / "reports"
    return out / name if name else out


def tuning_dir() -> Path:
    """reports/tuning/ (committed): the searches of `tema tune` (<dataset>.csv, <dataset>-params.yaml) and of
    `tema tune-joint` (joint.csv, joint-params.yaml). The report stage depends on the folder and shows them."""
    return reports_dir("tuning")


# -- writing -------------------------------------------------------------------------------------------

def write_npy(path: Path, array: np.ndarray) -> None:
    """An .npy file, written aside and moved into place (a reader never sees half an array)."""
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, np.ascontiguousarray(array), allow_pickle=False)
    os.replace(tmp, path)


def write_json(path: Path, content: Any) -> None:
    """A JSON file, written aside and moved into place (used for completion markers)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(content, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


# -- prepare -------------------------------------------------------------------------------------------

def load_stats(dataset: str) -> dict[str, Any]:
    return json.loads((prepared_dir(dataset) / "stats.json").read_text())


def load_candidates(prepared: Path, split: str, examples: pd.DataFrame) -> np.ndarray:
    """The saved candidates of one split, aligned with its examples (checked by user key)."""
    path = prepared / "candidates.parquet"
    table = pd.read_parquet(path)
    table = table[table["split"] == split].reset_index(drop=True)
    if table["user"].tolist() != examples["user"].tolist():
        raise DataError(f"{path}: the {split} candidates do not match the prepared {split} examples; re-run prepare")
    return np.stack(table["candidates"].to_numpy()).astype(np.int64)


# -- tags ----------------------------------------------------------------------------------------------

TAG_FILES = ("item_tags.tsv", "vocabulary.tsv", "pass1_tags.tsv", "failures.tsv", "provenance.json", "accounting.json")


def tag_source_kind(tag_dir: Path) -> str | None:
    """Where a tags stage's tags came from (provenance.json's source: llm, external, none), None without one."""
    path = tag_dir / "provenance.json"
    return json.loads(path.read_text()).get("source") if path.is_file() else None


def has_tags(tag_dir: Path) -> bool:
    """Whether the tags stage wrote tags there: its files, from a source other than none."""
    return (tag_dir / "vocabulary.tsv").is_file() and (tag_dir / "item_tags.tsv").is_file() and tag_source_kind(tag_dir) != "none"


def load_item_tags(tag_dir: Path) -> pd.DataFrame:
    """item_id, domain, tags (list of [tag, llm_rank]) as the tags stage wrote them into `tag_dir`."""
    table = pd.read_csv(tag_dir / "item_tags.tsv", sep="\t", quoting=csv.QUOTE_NONE)
    table["tags"] = table["tags"].map(json.loads)
    return table


def load_vocabulary(tag_dir: Path) -> pd.DataFrame:
    """domain, tag, count, ... one row per vocabulary tag, as the tags stage wrote it."""
    return pd.read_csv(tag_dir / "vocabulary.tsv", sep="\t", keep_default_na=False)


# -- features ------------------------------------------------------------------------------------------

FEATURE_ARRAYS = ("text", "tag_vectors", "item_tag_ids", "item_tag_ranks", "visual", "visual_mask")


def features_meta_path(dataset: str) -> Path:
    return features_dir(dataset) / "meta.json"


def features_identity(dataset: str) -> str:
    """The identity of a dataset's features: a hash of their meta.json (encoders, input hashes, dimensions)."""
    meta = features_meta_path(dataset)
    if not meta.is_file():
        raise FileNotFoundError(f"{meta}: no finished features (meta.json missing); run dvc repro features@{dataset}")
    return hashlib.sha256(meta.read_bytes()).hexdigest()[:16]


TAG_ARRAYS = ("tag_vectors", "item_tag_ids", "item_tag_ranks")


def load_features(dataset: str, tag_source: str | None = None) -> dict[str, Any]:
    """The feature arrays of a dataset (memory-mapped npy), 'meta', 'tags' (the tag table) and 'identity'.

    tag_source: the name of another of the dataset's tag sources (tags.other_sources; a model's `tags_from`): its tag
    arrays (data/features/<dataset>/tags-<source>/) replace the first source's, and the identity says which."""
    out = features_dir(dataset)
    identity = features_identity(dataset)
    meta = json.loads((out / "meta.json").read_text())
    own = (meta.get("tags") or {}).get("source_name", config.DEFAULT_SOURCE_NAME)
    folder = out
    if tag_source is not None and tag_source != own:
        known = [own, *(meta.get("tag_sources") or {})]
        if tag_source not in (meta.get("tag_sources") or {}):
            raise FileNotFoundError(f"{out / f'tags-{tag_source}'}: no tag source {tag_source!r} in the features of {dataset} "
                                    f"(it has {known}); add it under tags.other_sources.{dataset} and run dvc repro features@{dataset}")
        folder = out / f"tags-{tag_source}"
        meta = {**meta, "tags": meta["tag_sources"][tag_source]}
        identity = hashlib.sha256(f"{identity}:{tag_source}".encode()).hexdigest()[:16]
    result: dict[str, Any] = {"meta": meta, "identity": identity}
    for name in FEATURE_ARRAYS:
        path = (folder if name in TAG_ARRAYS else out) / f"{name}.npy"
        if path.is_file():
            result[name] = np.load(path, mmap_mode="r", allow_pickle=False)
    if (folder / "tags.tsv").is_file():
        result["tags"] = pd.read_csv(folder / "tags.tsv", sep="\t", keep_default_na=False)
    return result


# -- train ---------------------------------------------------------------------------------------------

def load_histories(dataset: str, model: str, seeds) -> pd.DataFrame:
    """Every seed's per-epoch history of one model, with a `seed` column."""
    frames = [pd.read_csv(run_dir(dataset, model, s) / "history.csv").assign(seed=s) for s in seeds]
    return pd.concat(frames, ignore_index=True)


def load_run_summary(dataset: str, model: str, seed: int) -> dict[str, Any]:
    marker = run_dir(dataset, model, seed) / "run.json"
    if not marker.is_file():
        raise FileNotFoundError(f"{marker.parent}: no finished run (run.json missing); run the train stage first")
    return json.loads(marker.read_text())


# -- evaluate ------------------------------------------------------------------------------------------

def load_per_user(table: str) -> pd.DataFrame:
    return pd.read_parquet(eval_dir(table) / "per_user.parquet")


def load_table_inputs(table: str) -> dict[str, Any]:
    """A table's summary for the result pages (evaluate writes it: tema.evaluate.table_inputs)."""
    path = table_inputs_path(table)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no summary of table {table!r}; run its evaluate stage "
                                f"(dvc repro evaluate@{table})")
    return json.loads(path.read_text())
