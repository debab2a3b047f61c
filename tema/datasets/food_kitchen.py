"""food-kitchen: Amazon Grocery & Gourmet Food x Home & Kitchen as LLMCDSR distributes it: num.txt, items.tsv and
one 'user<TAB>item,item,...' line per example in train_A, train_B, train_overlap, valid and test."""

from __future__ import annotations

import html

import pandas as pd

from tema.data import DataError, Dataset
from tema.datasets.raw import RawFiles, canonical, check_item, check_item_table, decoded_lines, parse_int
from tema.datasets.spec import Spec


def read(spec: Spec, raw: RawFiles) -> Dataset:
    """The upstream files of data/raw/food-kitchen/ (dataset.yaml: format food-kitchen) in the canonical form."""

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
    return canonical(spec, items, examples)
