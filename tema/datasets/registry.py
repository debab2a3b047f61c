"""Readers by format name: a dataset's dataset.yaml names its `format`, and this table names the module that reads it.

`generic` reads the documented CSV/TSV format (tema.datasets.generic, docs/datasets.md), which needs no code; the
shipped benchmarks keep readers of their upstream formats. A reader module defines

    read(spec: tema.datasets.spec.Spec, raw: tema.datasets.raw.RawFiles) -> tema.data.Dataset

and is imported only when a dataset of its format is read, so a dataset's stages run (and DVC tracks) its own
reader and no other: editing one benchmark's reader leaves every other dataset's stages as they are.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from tema.data import DataError

FORMATS: dict[str, str] = {
    "generic": "tema.datasets.generic",
    "food-kitchen": "tema.datasets.food_kitchen",
    "art-office": "tema.datasets.art_office",
}


def module_name(fmt: str, where: str = "dataset.yaml") -> str:
    if fmt not in FORMATS:
        raise DataError(f"{where}: format: unknown reader {fmt!r}; expected one of {sorted(FORMATS)} "
                        "('generic' for the CSV/TSV format of docs/datasets.md)")
    return FORMATS[fmt]


def reader_file(fmt: str, where: str = "dataset.yaml") -> str:
    """The reader's source file, relative to the repository root (what a dataset's prepare and tags stages depend on)."""
    return module_name(fmt, where).replace(".", "/") + ".py"


def reader(fmt: str, where: str = "dataset.yaml") -> ModuleType:
    return importlib.import_module(module_name(fmt, where))
