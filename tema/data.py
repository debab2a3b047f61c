"""The canonical dataset and the readers of the two vendored benchmarks.

Canonical form (what every later stage reads):

items      one row per item, ordered by ``item_id`` (global, 0-based; domain A first, then B)
           item_id:int, domain:str ('A'|'B'), local_id:int, source_id:str, title:str, text:str
sequences  one row per example, ``history`` chronological, ``target`` the item that follows it
           user:str (unique), split:str ('train'|'valid'|'test'), history:list[int], target:int,
           target_domain:str
For training rows every position of ``history + [target]`` is a next-item target; for valid and
test rows only ``target`` is evaluated. A user key is '<file>:<user_id>' because upstream user ids
restart in every file (art-office adds '#<line of that user>' since each user has two examples).

Raw files are vendored gzip-compressed under data/raw/<dataset>/ and verified against the upstream
sha256 of their decompressed bytes (data/raw/SHA256SUMS) before they are parsed. Every error names
the file, the line and what was expected.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import html
import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

DOMAINS = ("A", "B")
SPLITS = ("train", "valid", "test")
DOMAIN_NAMES = {
    "food-kitchen": {"A": "Grocery & Gourmet Food", "B": "Home & Kitchen"},
    "art-office": {"A": "Arts, Crafts & Sewing", "B": "Office Products"},
}


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


# ---------------------------------------------------------------- raw files


def read_raw_bytes(path: Path, checksums: dict[str, str], key: str) -> bytes:
    """The decompressed bytes of a vendored file, verified against its upstream sha256."""
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
        raise DataError(f"{shown}: no sha256 listed for '{key}' in SHA256SUMS")
    digest = hashlib.sha256(data).hexdigest()
    if digest != checksums[key]:
        raise DataError(f"{shown}: checksum mismatch, expected sha256 {checksums[key]}, got {digest}")
    return data


def read_checksums(raw_root: Path) -> dict[str, str]:
    path = raw_root / "SHA256SUMS"
    sums = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or len(parts[0]) != 64:
            raise DataError(f"{path}:{lineno}: expected '<sha256>  <file>', got {line!r}")
        sums[parts[1]] = parts[0]
    return sums


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


# ---------------------------------------------------------------- food-kitchen


def read_food_kitchen(raw_dir: Path, checksums: dict[str, str]) -> Dataset:
    name = "food-kitchen"

    def raw(fname: str) -> tuple[bytes, str]:
        return read_raw_bytes(raw_dir / fname, checksums, f"{name}/{fname}"), f"{raw_dir / fname}.gz"

    data, shown = raw("num.txt")
    counts = [parse_int(t, f"{shown}:{n}", "an item count") for n, t in decoded_lines(data, shown)]
    if len(counts) != 2:
        raise DataError(f"{shown}: expected two item counts (domain A, domain B), got {len(counts)}")
    n_items = sum(counts)
    ranges = {"A": (0, counts[0]), "B": (counts[0], n_items)}

    data, shown = raw("items.tsv")
    rows, origins = [], []
    lines = decoded_lines(data, shown)
    header = next(lines, (0, ""))[1]
    if header.split("\t") != ["global_idx", "domain", "local_idx", "asin", "title"]:
        raise DataError(f"{shown}:1: expected header 'global_idx domain local_idx asin title', got {header!r}")
    for lineno, line in lines:
        parts = line.split("\t")
        where = f"{shown}:{lineno}"
        if len(parts) != 5:
            raise DataError(f"{where}: expected 5 tab-separated fields, got {len(parts)}")
        item = parse_int(parts[0], where, "global_idx")
        domain = parts[1]
        if domain not in ranges:
            raise DataError(f"{where}: expected domain 'A' or 'B', got {domain!r}")
        check_item(item, where, n_items, ranges[domain], domain)
        local = parse_int(parts[2], where, "local_idx")
        if local != item - ranges[domain][0]:
            raise DataError(f"{where}: expected local_idx {item - ranges[domain][0]} for global_idx {item}, got {local}")
        rows.append((item, domain, local, parts[3], html.unescape(parts[4]).strip(), ""))
        origins.append(where)
    items = pd.DataFrame(rows, columns=["item_id", "domain", "local_id", "source_id", "title", "text"])
    check_item_table(items, n_items, origins, origins[-1] if origins else f"{shown}:1")

    examples = []
    for fname, split, domain in [
        ("train_A.txt", "train", "A"),
        ("train_B.txt", "train", "B"),
        ("train_overlap.txt", "train", None),
        ("valid.txt", "valid", None),
        ("test.txt", "test", None),
    ]:
        data, shown = raw(fname)
        stem = fname.removesuffix(".txt")
        seen: dict[str, int] = {}
        for lineno, line in decoded_lines(data, shown):
            where = f"{shown}:{lineno}"
            parts = line.split("\t")
            if len(parts) != 2:
                raise DataError(f"{where}: expected 'user_id<TAB>item,item,...', got {len(parts)} fields")
            user = parts[0].strip()
            parse_int(user, where, "user_id")
            if user in seen:
                raise DataError(f"{where}: duplicated user {user} (first on line {seen[user]})")
            seen[user] = lineno
            if not parts[1].strip():
                raise DataError(f"{where}: empty sequence for user {user}")
            seq = [parse_int(t, where, "an item id") for t in parts[1].split(",")]
            for item in seq:
                check_item(item, where, n_items, ranges[domain] if domain else None, domain)
            if len(seq) < 2:
                what = "a target with no history" if split != "train" else "a sequence of one item (nothing to predict)"
                raise DataError(f"{where}: {what} for user {user}; expected at least 2 items")
            examples.append((f"{stem}:{user}", split, seq[:-1], seq[-1]))
    return Dataset(
        name=name,
        domain_names=DOMAIN_NAMES[name],
        items=items,
        sequences=sequence_table(examples, items),
        provenance={"origin": "github.com/xhran2010/LLMCDSR data/food-kitchen @ 857de8d516909c16e96e3b4630f18d5a093faadd"},
    )


# ---------------------------------------------------------------- art-office


def read_art_office(raw_dir: Path, checksums: dict[str, str]) -> Dataset:
    name = "art-office"

    def raw(fname: str) -> tuple[bytes, str]:
        return read_raw_bytes(raw_dir / fname, checksums, f"{name}/{fname}"), f"{raw_dir / fname}.gz"

    rows, origins = [], []
    for fname, domain in [("item_listA_F.csv", "A"), ("item_listO_AA_F.csv", "B")]:
        data, shown = raw(fname)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as err:
            lineno = data[: err.start].count(b"\n") + 1
            raise DataError(f"{shown}:{lineno}: expected UTF-8 text, undecodable bytes") from err
        records = csv_records(text, shown)
        header = next(records, (1, []))[1]
        if header != ["idBefore", "item_title", "idAfter", "item_attribute"]:
            raise DataError(f"{shown}:1: expected header 'idBefore,item_title,idAfter,item_attribute', got {header!r}")
        for lineno, record in records:
            where = f"{shown}:{lineno}"
            if len(record) != 4:
                raise DataError(f"{where}: expected 4 comma-separated fields, got {len(record)}")
            item = parse_int(record[2], where, "idAfter")
            rows.append((item, domain, 0, record[0], html.unescape(record[1]).strip(), record[3].strip()))
            origins.append(where)
        if not any(row[1] == domain for row in rows):
            raise DataError(f"{shown}:2: expected at least one item after the header, got none")
    # one table ordered by the global id (stable: of two rows with one id, the first read stays first)
    order = sorted(range(len(rows)), key=lambda row: rows[row][0])
    rows, origins = [rows[row] for row in order], [origins[row] for row in order]
    items = pd.DataFrame(rows, columns=["item_id", "domain", "local_id", "source_id", "title", "text"])
    n_items = len(items)
    check_item_table(items, n_items, origins, f"{raw_dir}/item_list*.csv.gz")
    start_b = int(items.loc[items["domain"] == "B", "item_id"].min())
    items["local_id"] = items["item_id"] - items["domain"].map({"A": 0, "B": start_b})

    examples = []
    for fname, split in [("train_F2.txt", "train"), ("valid_F2.txt", "valid"), ("test_F2.txt", "test")]:
        data, shown = raw(fname)
        stem = fname.removesuffix(".txt")
        lines_of: dict[str, list[int]] = {}
        last_user = None
        for lineno, line in decoded_lines(data, shown):
            where = f"{shown}:{lineno}"
            fields = line.rstrip("\t").split("\t")
            if len(fields) < 3:
                raise DataError(f"{where}: expected 'user<TAB>L<TAB>item|pos|pos ...', got {len(fields)} fields")
            user = fields[0].strip()
            parse_int(user, where, "user_id")
            length = parse_int(fields[1], where, "L (the index of the last token)")
            tokens = fields[2:]
            if not tokens or not "".join(tokens).strip():
                raise DataError(f"{where}: empty sequence for user {user}")
            seq = []
            for pos, token in enumerate(tokens):
                parts = token.split("|")
                if len(parts) != 3:
                    raise DataError(f"{where}: expected token 'item|pos|pos', got {token!r}")
                item = parse_int(parts[0], where, "an item id")
                if parse_int(parts[1], where, "a position") != pos or parse_int(parts[2], where, "a position") != pos:
                    raise DataError(f"{where}: expected token {pos} to carry position {pos}, got {token!r}")
                check_item(item, where, n_items, None, None)
                seq.append(item)
            if length != len(seq) - 1:
                raise DataError(f"{where}: expected L = {len(seq) - 1} (tokens - 1), got {length}")
            if len(seq) < 2:
                raise DataError(f"{where}: a target with no history for user {user}; expected at least 2 items")
            previous = lines_of.setdefault(user, [])
            if previous and (last_user != user or len(previous) >= 2):
                raise DataError(
                    f"{where}: duplicated user {user} (lines {previous}); expected at most two consecutive lines per user"
                )
            previous.append(lineno)
            last_user = user
            examples.append((f"{stem}:{user}#{len(previous)}", split, seq[:-1], seq[-1]))
    return Dataset(
        name=name,
        domain_names=DOMAIN_NAMES[name],
        items=items,
        sequences=sequence_table(examples, items),
        provenance={"origin": "github.com/TingJShen/URLLM DG_Final/AO @ e31a04e8c29e1c99e1bb012982040991a995f08a"},
    )


# ---------------------------------------------------------------- shared pieces


def csv_records(text: str, shown: str) -> Iterator[tuple[int, list[str]]]:
    """(line where the record starts, fields) for each CSV record; a quoting error names its record's line.

    A quoted field may span lines; csv.reader's line_num is the line where a record ends, so the record
    starts on the line after the previous one ended. Strict: a stray character after a closing quote or a
    quote left open at the end of the file is an error, not a silently merged field.
    """
    reader = csv.reader(io.StringIO(text), strict=True)
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


READERS: dict[str, Callable[[Path, dict[str, str]], Dataset]] = {
    "food-kitchen": read_food_kitchen,
    "art-office": read_art_office,
}


def read_raw(name: str, raw_root: Path) -> Dataset:
    """Read, verify and validate one vendored benchmark into the canonical form."""
    if name not in READERS:
        raise DataError(f"unknown dataset {name!r}; expected one of {sorted(READERS)}")
    return READERS[name](raw_root / name, read_checksums(raw_root))


# ---------------------------------------------------------------- prepared files (parquet)


def save(dataset: Dataset, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    dataset.items.to_parquet(out_dir / "items.parquet", index=False)
    dataset.sequences.to_parquet(out_dir / "sequences.parquet", index=False)


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
    names = DOMAIN_NAMES.get(name, {d: d for d in DOMAINS})
    return Dataset(name=name, domain_names=names, items=items, sequences=sequences)
