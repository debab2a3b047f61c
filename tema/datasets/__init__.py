"""The datasets the study can prepare: a folder data/raw/<name>/ with a dataset.yaml, a SHA256SUMS and the files.

`known()` lists them, `spec(name)` reads a description (tema.datasets.spec), `read_raw(name)` verifies and reads the
files into the canonical form (tema.data.Dataset) with the reader its `format` names (tema.datasets.registry; the
generic CSV/TSV reader is tema.datasets.generic). Adding a dataset is adding a folder: no code changes.

Each of them first puts right what a killed `tema dataset add` left in data/raw (tema.datasets.staging.recover), and
hidden folders (its staging and old folders among them) are no datasets.
"""

from __future__ import annotations

from pathlib import Path

from tema import config
from tema.data import DataError, Dataset
from tema.datasets.raw import RawFiles
from tema.datasets.registry import FORMATS, reader, reader_file
from tema.datasets.spec import SPEC_FILE, Domain, Spec, check_name, load_spec
from tema.datasets.staging import is_hidden, recover

__all__ = ["FORMATS", "Domain", "Spec", "known", "raw_root", "read_raw", "reader_path", "spec"]


def raw_root() -> Path:
    return config.repo_root() / "data" / "raw"


def known(root: Path | None = None) -> list[str]:
    """The datasets under data/raw/ (folders holding a dataset.yaml, hidden ones aside), sorted."""
    root = raw_root() if root is None else root
    recover(root)
    return sorted(p.parent.name for p in root.glob(f"*/{SPEC_FILE}") if not is_hidden(p.parent))


def spec(name: str, root: Path | None = None) -> Spec:
    """A dataset's dataset.yaml, checked (nothing else is read)."""
    root = raw_root() if root is None else root
    check_name(name, "dataset")
    recover(root)
    if not (root / name / SPEC_FILE).is_file():
        raise DataError(f"unknown dataset {name!r}: {root.name}/{name}/{SPEC_FILE} not found; datasets: {known(root)}. "
                        "To add one: `tema dataset add <name> <folder>` (README, 'Your own data')")
    return load_spec(root / name)


def reader_path(name: str, root: Path | None = None) -> str:
    """The reader source file of a dataset, relative to the repository (its prepare and tags stages depend on it)."""
    described = spec(name, root)
    return reader_file(described.format, str(described.path))


def read_raw(name: str, root: Path | None = None) -> Dataset:
    """Read, verify and validate one dataset's raw files (<root>/<name>/, by default data/raw/) into the canonical form."""
    described = spec(name, root)
    return reader(described.format, str(described.path)).read(described, RawFiles(described.raw_dir))
