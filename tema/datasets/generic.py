"""The generic reader (format: generic): a dataset of one's own as CSV/TSV files, described by its dataset.yaml.

    items:            one row per item: its id, its domain (the value dataset.yaml gives each domain), a title and
                      optionally a text (description) and an image (a path or URL); the columns are named in
                      dataset.yaml
    interactions:     one row per (user, item, timestamp); each user's items in time order are their sequence,
                      split by `split.rule`: leave-one-out (per user: the last item is the test target, the one
                      before it the validation target, the rest trains) or time (two cut points)
    or sequences:     pre-split examples (split.rule: given): user, split (train|valid|test) and the items, oldest
                      first; the last item of a row is its target

Files are CSV (',' with "..." quoting) or TSV (tab, no quoting) by their extension, optionally gzipped, UTF-8, with
a header row. Every error names the file, the line and what was expected. docs/datasets.md is the reference, and
examples/ holds a worked example.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pandas as pd

from tema.data import DOMAINS, DataError, Dataset
from tema.datasets.raw import RawFiles, canonical, csv_records, decoded_text
from tema.datasets.spec import Spec

RULES = ("leave-one-out", "time", "given")
SPLITS = ("train", "valid", "test")
MIN_INTERACTIONS = 3  # leave-one-out: one item to train on (as a history), one to validate, one to test
# Each valid/test target is ranked among evaluate.n_candidates (>= 1) distinct items of its domain other than itself
# (tema.protocols.sample_candidates; prepare.check_candidates refuses n_candidates >= a domain's item count), so a
# domain needs at least 2 items for any setting, and more than n_candidates (999 by default) for the one in use.
MIN_DOMAIN_ITEMS = 2


# -- the description -----------------------------------------------------------------------------------------

def section(spec: Spec, key: str, required: dict[str, str], optional: dict[str, Any]) -> dict[str, Any]:
    """dataset.yaml's `key` mapping with its required keys (name -> what) and optional keys (name -> default)."""
    value = spec.body.get(key)
    if not isinstance(value, dict):
        raise DataError(f"{spec.where(key)}: expected a mapping with {sorted(required)}, got {value!r}")
    unknown = sorted(set(value) - set(required) - set(optional))
    if unknown:
        raise DataError(f"{spec.where(key)}: unknown key(s) {unknown}; expected {sorted([*required, *optional])}")
    for name, what in required.items():
        if not isinstance(value.get(name), str) or not value[name].strip():
            raise DataError(f"{spec.where(f'{key}.{name}')}: expected {what}, got {value.get(name)!r}")
    return {**optional, **value}


def split_rule(spec: Spec) -> dict[str, Any]:
    rule = section(spec, "split", {"rule": f"one of {list(RULES)}"},
                   {"history": None, "min_interactions": MIN_INTERACTIONS, "valid_from": None, "test_from": None})
    if rule["rule"] not in RULES:
        raise DataError(f"{spec.where('split.rule')}: expected one of {list(RULES)}, got {rule['rule']!r}")
    history = rule["history"]
    if history is not None and (not isinstance(history, int) or isinstance(history, bool) or history < 1):
        raise DataError(f"{spec.where('split.history')}: expected the number of most recent items each history keeps "
                        f"(an integer >= 1) or null for all, got {history!r}")
    least = rule["min_interactions"]
    if not isinstance(least, int) or isinstance(least, bool) or least < MIN_INTERACTIONS:
        raise DataError(f"{spec.where('split.min_interactions')}: expected an integer >= {MIN_INTERACTIONS}, got {least!r}")
    if rule["rule"] == "time":
        for key in ("valid_from", "test_from"):
            if rule[key] is None:
                raise DataError(f"{spec.where(f'split.{key}')}: missing; split.rule 'time' needs two cut points: a timestamp "
                                "(unix seconds or an ISO 8601 date) or a share of the interactions such as '90%'")
    source = "sequences" if rule["rule"] == "given" else "interactions"
    other = "interactions" if source == "sequences" else "sequences"
    if other in spec.body:
        raise DataError(f"{spec.where(other)}: split.rule {rule['rule']!r} reads '{source}'; remove '{other}' or change the rule")
    return rule


# -- tables ------------------------------------------------------------------------------------------------

def records(raw: RawFiles, fname: str, columns: dict[str, str | None]) -> Iterator[tuple[str, dict[str, str]]]:
    """('<file>:<line>', {role: value}) per data row of a CSV/TSV file; `columns` maps a role to its column name
    (None: the dataset has no such column). The header must hold every named column; every row as many fields."""
    data, shown = raw(fname)
    text = decoded_text(data, shown, "utf-8-sig")  # a byte-order mark, as spreadsheet exports write, is dropped
    plain = fname.removesuffix(".gz")
    if plain.endswith(".tsv"):
        rows: Iterator[tuple[int, list[str]]] = tsv_records(text)
    elif plain.endswith(".csv"):
        rows = csv_records(text, shown)
    else:
        raise DataError(f"{shown}: expected a .csv or .tsv file (optionally .gz), got {fname!r}")
    lineno, header = next(((n, r) for n, r in rows if any(f.strip() for f in r)), (1, []))
    header = [h.strip() for h in header]
    missing = [name for name in columns.values() if name is not None and name not in header]
    if missing:
        raise DataError(f"{shown}:{lineno}: expected a header with the column(s) {missing} (named in dataset.yaml), got {header!r}")
    index = {role: header.index(name) for role, name in columns.items() if name is not None}
    for lineno, fields in rows:
        if not any(f.strip() for f in fields):
            continue
        where = f"{shown}:{lineno}"
        if len(fields) != len(header):
            raise DataError(f"{where}: expected {len(header)} fields as in the header, got {len(fields)}")
        yield where, {role: fields[i].strip() for role, i in index.items()}


def tsv_records(text: str) -> Iterator[tuple[int, list[str]]]:
    for lineno, line in enumerate(text.split("\n"), 1):
        yield lineno, line.rstrip("\r").split("\t")


def read_items(spec: Spec, raw: RawFiles) -> tuple[pd.DataFrame, dict[str, int]]:
    """The item table in canonical order (domain A's items, then B's, each in file order) and the global id of each
    source id."""
    cols = section(spec, "items", {"file": "the items file (.csv or .tsv, optionally .gz)", "id": "the item id column",
                                   "domain": "the domain column"},
                   {"title": None, "text": None, "image": None, "allow_missing_text": False})
    if not isinstance(cols["allow_missing_text"], bool):
        raise DataError(f"{spec.where('items.allow_missing_text')}: expected true or false, got {cols['allow_missing_text']!r}")
    value_to_key = {d.value: key for key, d in spec.domains.items()}
    rows: dict[str, list[tuple[str, str, str, str, str]]] = {key: [] for key in DOMAINS}
    first: dict[str, str] = {}
    roles = {role: cols[role] for role in ("id", "domain", "title", "text", "image")}
    has_text = cols["title"] is not None or cols["text"] is not None
    for where, r in records(raw, cols["file"], roles):
        item = r["id"]
        if not item:
            raise DataError(f"{where}: expected an item id in column {cols['id']!r}, got an empty field")
        if item in first:
            raise DataError(f"{where}: duplicated item id {item!r} (first at {first[item]}); expected each id once")
        first[item] = where
        if r["domain"] not in value_to_key:
            raise DataError(f"{where}: unknown domain {r['domain']!r} for item {item!r}; expected one of "
                            f"{sorted(value_to_key)} (dataset.yaml: domains.A.id, domains.B.id)")
        title, body = r.get("title", ""), r.get("text", "")
        if has_text and not title and not body and not cols["allow_missing_text"]:
            raise DataError(f"{where}: item {item!r} has an empty title and text; expected one of them, or set "
                            "items.allow_missing_text: true in dataset.yaml (such items then get a zero text vector)")
        rows[value_to_key[r["domain"]]].append((item, title, body, r.get("image", ""), where))
    for key in DOMAINS:
        if len(rows[key]) < MIN_DOMAIN_ITEMS:
            count = f"{len(rows[key])} item{'s' * (len(rows[key]) != 1)}" if rows[key] else "no item"
            raise DataError(f"{spec.where('items.file')}: domain {key} ({spec.domains[key].value!r}) has {count}; expected at "
                            f"least {MIN_DOMAIN_ITEMS} items in each domain (evaluation ranks each target among "
                            "evaluate.n_candidates >= 1 other items of its domain; the default 999 needs 1000)")
    table = [(key, local, *row) for key in DOMAINS for local, row in enumerate(rows[key])]
    items = pd.DataFrame({
        "item_id": np.arange(len(table)), "domain": [t[0] for t in table], "local_id": [t[1] for t in table],
        "source_id": [t[2] for t in table], "title": [t[3] for t in table], "text": [t[4] for t in table],
    })
    if cols["image"] is not None:
        items["image"] = [t[5] for t in table]
    return items, {row[2]: gid for gid, row in enumerate(table)}


# -- timestamps ------------------------------------------------------------------------------------------

def parse_time(text: str, where: str) -> float:
    """Unix seconds (an integer or decimal number) or an ISO 8601 date/time (UTC unless it names its offset)."""
    try:
        value = float(text)
        if math.isfinite(value):
            return value
    except ValueError:
        pass
    try:
        stamp = datetime.fromisoformat(text)
    except ValueError:
        raise DataError(f"{where}: expected a timestamp (unix seconds, or an ISO 8601 date such as 2014-05-31 or "
                        f"2014-05-31T12:00:00), got {text!r}") from None
    return (stamp if stamp.tzinfo else stamp.replace(tzinfo=timezone.utc)).timestamp()


def cut_point(value: Any, key: str, times: np.ndarray, spec: Spec) -> float:
    """A time split's cut: a timestamp, or 'P%' for the time below which P percent of the interactions fall."""
    where = spec.where(f"split.{key}")
    if isinstance(value, str) and value.strip().endswith("%"):
        try:
            share = float(value.strip()[:-1])
        except ValueError:
            share = -1.0
        if not 0 < share < 100:
            raise DataError(f"{where}: expected a share between 0% and 100% (exclusive), got {value!r}")
        return float(np.quantile(times, share / 100, method="higher"))
    if isinstance(value, bool):
        raise DataError(f"{where}: expected a timestamp or a share such as '90%', got {value!r}")
    if isinstance(value, (int, float)):
        return float(value)
    if hasattr(value, "isoformat"):  # YAML reads 2014-05-31 as a date
        value = value.isoformat()
    return parse_time(str(value), where)


# -- examples ----------------------------------------------------------------------------------------------

def user_sequences(spec: Spec, raw: RawFiles, item_of: dict[str, int]) -> tuple[dict[str, list[tuple[float, int, int]]], np.ndarray]:
    """Each user's (time, order read, item), sorted by time (ties keep the file's order), and every timestamp."""
    cols = section(spec, "interactions", {"file": "the interactions file (.csv or .tsv, optionally .gz)",
                                          "user": "the user column", "item": "the item column", "timestamp": "the timestamp column"}, {})
    seqs: dict[str, list[tuple[float, int, int]]] = {}
    times = []
    for order, (where, r) in enumerate(records(raw, cols["file"], {k: cols[k] for k in ("user", "item", "timestamp")})):
        if not r["user"]:
            raise DataError(f"{where}: expected a user id in column {cols['user']!r}, got an empty field")
        if r["item"] not in item_of:
            raise DataError(f"{where}: unknown item {r['item']!r}; expected an id of the items file ({cols['item']!r} column)")
        t = parse_time(r["timestamp"], where)
        seqs.setdefault(r["user"], []).append((t, order, item_of[r["item"]]))
        times.append(t)
    if not seqs:
        raise DataError(f"{spec.where('interactions.file')}: no interactions; expected at least one row after the header")
    return {u: sorted(s) for u, s in seqs.items()}, np.asarray(times)


def cut(seq: list[int], history: int | None) -> list[int]:
    return seq if history is None else seq[-history:]


def leave_one_out(seqs: dict[str, list[tuple[float, int, int]]], rule: dict[str, Any]) -> tuple[list, dict[str, int]]:
    examples, dropped = [], 0
    keep = rule["history"]
    for user, seq in seqs.items():
        items = [i for _, _, i in seq]
        if len(items) < rule["min_interactions"]:
            dropped += 1
            continue
        train = items[:-2]
        if len(train) >= 2:
            window = train if keep is None else train[-(keep + 1):]
            examples.append((f"train:{user}", "train", window[:-1], window[-1]))
        examples.append((f"valid:{user}", "valid", cut(items[:-2], keep), items[-2]))
        examples.append((f"test:{user}", "test", cut(items[:-1], keep), items[-1]))
    return examples, {"users_dropped": dropped, "rule": "leave-one-out", "min_interactions": rule["min_interactions"]}


def by_time(seqs: dict[str, list[tuple[float, int, int]]], times: np.ndarray, rule: dict[str, Any], spec: Spec) -> tuple[list, dict[str, Any]]:
    valid_from = cut_point(rule["valid_from"], "valid_from", times, spec)
    test_from = cut_point(rule["test_from"], "test_from", times, spec)
    if not valid_from < test_from:
        raise DataError(f"{spec.where('split.valid_from')}: expected a cut before split.test_from ({rule['test_from']!r}), "
                        f"got {rule['valid_from']!r}")
    keep = rule["history"]
    examples, users_without = [], 0
    for user, seq in seqs.items():
        items = [i for _, _, i in seq]
        before_valid = sum(1 for t, _, _ in seq if t < valid_from)
        before_test = sum(1 for t, _, _ in seq if t < test_from)
        made = 0
        if before_valid >= 2:
            window = items[:before_valid] if keep is None else items[:before_valid][-(keep + 1):]
            examples.append((f"train:{user}", "train", window[:-1], window[-1]))
            made += 1
        if before_valid >= 1 and before_test > before_valid:  # the first item of the validation window
            examples.append((f"valid:{user}", "valid", cut(items[:before_valid], keep), items[before_valid]))
            made += 1
        if before_test >= 1 and len(items) > before_test:  # the first item at or after the test cut
            examples.append((f"test:{user}", "test", cut(items[:before_test], keep), items[before_test]))
            made += 1
        users_without += made == 0
    return examples, {"rule": "time", "valid_from": valid_from, "test_from": test_from, "users_without_examples": users_without}


def given(spec: Spec, raw: RawFiles, item_of: dict[str, int], rule: dict[str, Any]) -> tuple[list, dict[str, Any]]:
    cols = section(spec, "sequences", {"file": "the sequences file (.csv or .tsv, optionally .gz)", "user": "the user column",
                                       "split": "the split column", "items": "the column of item ids, oldest first"},
                   {"separator": " "})
    sep = cols["separator"]
    delimiter = "," if cols["file"].removesuffix(".gz").endswith(".csv") else "\t"
    if not isinstance(sep, str) or not sep or sep == delimiter:
        raise DataError(f"{spec.where('sequences.separator')}: expected the character between item ids, got {sep!r}")
    keep = rule["history"]
    examples, seen = [], {}
    for where, r in records(raw, cols["file"], {k: cols[k] for k in ("user", "split", "items")}):
        user, split = r["user"], r["split"]
        if not user:
            raise DataError(f"{where}: expected a user id in column {cols['user']!r}, got an empty field")
        if split not in SPLITS:
            raise DataError(f"{where}: expected the split 'train', 'valid' or 'test', got {split!r}")
        if (split, user) in seen:
            raise DataError(f"{where}: duplicated user {user!r} in split {split} (first at {seen[split, user]}); "
                            "expected one row per user and split")
        seen[split, user] = where
        tokens = [t for t in r["items"].split(sep) if t.strip()]
        unknown = next((t.strip() for t in tokens if t.strip() not in item_of), None)
        if unknown is not None:
            raise DataError(f"{where}: unknown item {unknown!r}; expected ids of the items file, separated by {sep!r}")
        seq = [item_of[t.strip()] for t in tokens]
        if len(seq) < 2:
            what = "a sequence of one item (nothing to predict)" if split == "train" else "an empty history (a target alone)"
            raise DataError(f"{where}: {what} for user {user!r}; expected at least 2 items, the last the target")
        window = seq if keep is None else seq[-(keep + 1):]
        examples.append((f"{split}:{user}", split, window[:-1], window[-1]))
    return examples, {"rule": "given"}


def read(spec: Spec, raw: RawFiles) -> Dataset:
    """A generic dataset (docs/datasets.md) in the canonical form; the import's counts go to its provenance."""
    rule = split_rule(spec)
    items, item_of = read_items(spec, raw)
    if rule["rule"] == "given":
        examples, report = given(spec, raw, item_of, rule)
    else:
        seqs, times = user_sequences(spec, raw, item_of)
        examples, report = leave_one_out(seqs, rule) if rule["rule"] == "leave-one-out" else by_time(seqs, times, rule, spec)
    for split in SPLITS:
        if not any(e[1] == split for e in examples):
            raise DataError(f"{spec.where('split')}: the rule {rule['rule']!r} leaves no {split} example; expected "
                            "examples in train, valid and test (check the cut points or the data)")
    return canonical(spec, items, examples, {"import": report})
