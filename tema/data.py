"""The canonical dataset: what the prepare stage writes and every later stage reads (readers: tema.datasets).

Canonical form (what every later stage reads):

items      one row per item, ordered by ``item_id`` (global, 0-based; domain A first, then B)
           item_id:int, domain:str ('A'|'B'), local_id:int, source_id:str, title:str, text:str
sequences  one row per example, ``history`` chronological, ``target`` the item that follows it
           user:str (unique), split:str ('train'|'valid'|'test'), history:list[int], target:int,
           target_domain:str
For training rows every position of ``history + [target]`` is a next-item target; for valid and
test rows only ``target`` is evaluated. A user key is '<file>:<user_id>' because upstream user ids
restart in every file (art-office adds '#<line of that user>' since each user has two examples).

The two domains' display names travel with the prepared files (dataset.json), so nothing after prepare
needs the dataset's reader.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

DOMAINS = ("A", "B")
SPLITS = ("train", "valid", "test")


class DataError(ValueError):
    """Raw or prepared data does not have the expected form."""


@dataclass
class Dataset:
    name: str
    domain_names: dict[str, str]
    items: pd.DataFrame
    sequences: pd.DataFrame
    provenance: dict[str, str] = field(default_factory=dict)

    @property
    def n_items(self) -> int:
        return len(self.items)

    def domain_range(self, domain: str) -> tuple[int, int]:
        """[start, stop) of the global item ids of a domain (ids of a domain are contiguous)."""
        ids = self.items.loc[self.items["domain"] == domain, "item_id"]
        return int(ids.min()), int(ids.max()) + 1

    def split(self, split: str) -> pd.DataFrame:
        return self.sequences[self.sequences["split"] == split].reset_index(drop=True)


# ---------------------------------------------------------------- prepared files (parquet)


def save(dataset: Dataset, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    dataset.items.to_parquet(out_dir / "items.parquet", index=False)
    dataset.sequences.to_parquet(out_dir / "sequences.parquet", index=False)
    (out_dir / "dataset.json").write_text(json.dumps({"name": dataset.name, "domain_names": dataset.domain_names}, indent=2) + "\n")


def load(name: str, prepared_dir: Path) -> Dataset:
    """Read a prepared dataset (data/prepared/<name>) back, checking the canonical columns."""
    items_path, seq_path = prepared_dir / "items.parquet", prepared_dir / "sequences.parquet"
    for path in (items_path, seq_path):
        if not path.is_file():
            raise DataError(f"{path}: not found; run the prepare stage first (dvc repro prepare@{name})")
    items = pd.read_parquet(items_path)
    sequences = pd.read_parquet(seq_path)
    for path, table, cols in [
        (items_path, items, ["item_id", "domain", "local_id", "source_id", "title", "text"]),
        (seq_path, sequences, ["user", "split", "history", "target", "target_domain"]),
    ]:
        missing = [c for c in cols if c not in table.columns]
        if missing:
            raise DataError(f"{path}: expected columns {cols}, missing {missing}")
    sequences["history"] = sequences["history"].map(lambda h: [int(x) for x in h])
    described = prepared_dir / "dataset.json"
    names = json.loads(described.read_text())["domain_names"] if described.is_file() else {d: d for d in DOMAINS}
    return Dataset(name=name, domain_names=names, items=items, sequences=sequences)
