"""What the dataset readers share: verified raw bytes, numbered lines, strict CSV records and the checks every
reader applies to its item table and examples. Every error names the file, the line and what was expected."""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd

from tema.data import DataError, Dataset
from tema.datasets.spec import CHECKSUMS_FILE, Spec, read_checksums


def read_raw_bytes(path: Path, checksums: dict[str, str], key: str) -> tuple[bytes, Path]:
    """The decompressed bytes of a vendored file (`path` or `path`.gz), verified against its listed sha256, and the
    path of the file read."""
    gz = path.with_name(path.name + ".gz")
    if gz.is_file():
        try:
            data = gzip.decompress(gz.read_bytes())
        except (OSError, EOFError) as err:
            raise DataError(f"{gz}: expected a gzip file, could not decompress it ({err})") from err
        shown = gz
    elif path.is_file():
        data, shown = path.read_bytes(), path
    else:
        raise DataError(f"{path}(.gz): file not found")
    if key not in checksums:
        raise DataError(f"{shown}: no sha256 listed for '{key}' in {path.parent / CHECKSUMS_FILE}")
    digest = hashlib.sha256(data).hexdigest()
    if digest != checksums[key]:
        raise DataError(f"{shown}: checksum mismatch, expected sha256 {checksums[key]} ({path.parent / CHECKSUMS_FILE}), got {digest}")
    return data, shown


class RawFiles:
    """One dataset's vendored files: files(name) -> (its verified, decompressed bytes, the path errors name).

    `name` is the file's name in the dataset folder without '.gz' (the folder may hold it gzipped); its sha256 is
    the one the folder's SHA256SUMS lists for that name.
    """

    def __init__(self, raw_dir: Path):
        self.raw_dir = raw_dir
        self.checksums = read_checksums(raw_dir)

    def __call__(self, fname: str) -> tuple[bytes, str]:
        fname = fname.removesuffix(".gz")
        data, shown = read_raw_bytes(self.raw_dir / fname, self.checksums, fname)
        return data, str(shown)


def decoded_text(data: bytes, shown: str, encoding: str = "utf-8") -> str:
    """The whole file as text; undecodable bytes name their line."""
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as err:
        lineno = data[: err.start].count(b"\n") + 1
        raise DataError(f"{shown}:{lineno}: expected UTF-8 text, undecodable bytes") from None


def decoded_lines(data: bytes, shown: str) -> Iterator[tuple[int, str]]:
    """(line number, text) for each non-empty line; undecodable bytes name their line."""
    for lineno, raw in enumerate(data.split(b"\n"), 1):
        raw = raw.rstrip(b"\r")
        if not raw.strip():
            continue
        try:
            yield lineno, raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise DataError(f"{shown}:{lineno}: expected UTF-8 text, undecodable bytes at column {err.start + 1}") from err


def parse_int(text: str, where: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise DataError(f"{where}: expected {what} (an integer), got {text!r}") from None


def check_item(item: int, where: str, n_items: int, domain_range: tuple[int, int] | None, domain: str | None) -> None:
    if not 0 <= item < n_items:
        raise DataError(f"{where}: item id {item} outside the item range 0..{n_items - 1}")
    if domain_range is not None and not domain_range[0] <= item < domain_range[1]:
        raise DataError(
            f"{where}: item id {item} outside domain {domain}'s range {domain_range[0]}..{domain_range[1] - 1}"
        )


def csv_records(text: str, shown: str, delimiter: str = ",") -> Iterator[tuple[int, list[str]]]:
    """(line where the record starts, fields) for each CSV record; a quoting error names its record's line.

    A quoted field may span lines; csv.reader's line_num is the line where a record ends, so the record
    starts on the line after the previous one ended. Strict: a stray character after a closing quote or a
    quote left open at the end of the file is an error, not a silently merged field.
    """
    reader = csv.reader(io.StringIO(text), strict=True, delimiter=delimiter)
    ended = 0
    while True:
        try:
            record = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            raise DataError(
                f"{shown}:{ended + 1}: CSV quoting error in the record starting on this line ({err}); expected every "
                "quoted field to be closed and followed by ',' or the end of the line"
            ) from None
        yield ended + 1, record
        ended = reader.line_num


def check_item_table(items: pd.DataFrame, n_items: int, origins: list[str], end: str) -> None:
    """Item ids 0..n_items-1, each once, in order, domain A's before domain B's.

    origins[i] is the '<file>:<line>' row i was read from, so an error names the first offending row;
    `end` is where the rows end (named when the last ids are missing).
    """
    ids = items["item_id"].tolist()
    first_seen: dict[int, str] = {}
    for row, (item, origin) in enumerate(zip(ids, origins)):
        if item in first_seen:
            raise DataError(f"{origin}: duplicated item id {item} (first seen at {first_seen[item]}); expected each id once")
        if item != row:
            raise DataError(f"{origin}: expected item id {row} (ids 0..{n_items - 1}, each once, in order), got {item}")
        first_seen[item] = origin
    if len(ids) != n_items:
        raise DataError(f"{end}: expected item ids 0..{n_items - 1}, the items end after id {len(ids) - 1}")
    domains = items["domain"].tolist()
    first_b = domains.index("B") if "B" in domains else len(domains)
    stray = next((row for row in range(first_b, len(domains)) if domains[row] != "B"), None)
    if stray is not None:
        raise DataError(
            f"{origins[stray]}: item id {ids[stray]} of domain {domains[stray]} follows domain B's first id "
            f"{ids[first_b]} ({origins[first_b]}); expected the ids of domain A to precede those of domain B"
        )


def sequence_table(examples: list[tuple[str, str, list[int], int]], items: pd.DataFrame) -> pd.DataFrame:
    domain_of = items["domain"].to_numpy()
    table = pd.DataFrame(examples, columns=["user", "split", "history", "target"])
    table["target_domain"] = domain_of[table["target"].to_numpy()]
    return table


def canonical(spec: Spec, items: pd.DataFrame, examples: list[tuple[str, str, list[int], int]],
              provenance: dict[str, Any] | None = None) -> Dataset:
    """The Dataset a reader returns: its checked item table, its (user, split, history, target) examples, and
    what the reader records of the import (where the files came from: dataset.yaml's `source`)."""
    origin = spec.body.get("source", {}).get("origin", "") if isinstance(spec.body.get("source"), dict) else ""
    return Dataset(name=spec.name, domain_names=spec.domain_names, items=items, sequences=sequence_table(examples, items),
                   provenance={"origin": origin, **(provenance or {})})
