"""The datasets the study can prepare: each module here reads one dataset's raw files (see registry)."""

from __future__ import annotations

from pathlib import Path

from tema import config
from tema.data import Dataset
from tema.datasets import art_office, food_kitchen  # noqa: F401  (each registers itself)
from tema.datasets.raw import read_checksums
from tema.datasets.registry import READERS, DatasetInfo, info, known

__all__ = ["READERS", "DatasetInfo", "info", "known", "read_raw"]


def read_raw(name: str, raw_root: Path | None = None) -> Dataset:
    """Read, verify and validate one dataset's raw files (<raw_root>/<name>/, by default data/raw/) into the
    canonical form."""
    raw_root = config.repo_root() / "data" / "raw" if raw_root is None else raw_root
    return info(name).read(raw_root / name, read_checksums(raw_root))
