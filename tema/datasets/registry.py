"""Datasets by name: a reader turns a dataset's raw files into the canonical form (tema.data.Dataset).

A reader registers itself with its name and its two domains' display names; the prepare stage and the
parameter schema ask this registry, so adding a dataset touches no other dataset's code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tema.data import DataError, Dataset

Reader = Callable[[Path, dict[str, str]], Dataset]


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    domain_names: dict[str, str]
    read: Reader


READERS: dict[str, DatasetInfo] = {}


def register(name: str, domain_names: dict[str, str]) -> Callable[[Reader], Reader]:
    def wrap(read: Reader) -> Reader:
        READERS[name] = DatasetInfo(name, dict(domain_names), read)
        return read

    return wrap


def known() -> list[str]:
    return sorted(READERS)


def info(name: str) -> DatasetInfo:
    if name not in READERS:
        raise DataError(f"unknown dataset {name!r}; expected one of {known()}")
    return READERS[name]
