"""art-office: Amazon Arts, Crafts & Sewing x Office Products as URLLM distributes it: two item CSVs and
'user<TAB>L<TAB>item|pos|pos ...' lines, two per user (the two domains' targets), in train, valid and test."""

from __future__ import annotations

import html

import pandas as pd

from tema.data import DataError, Dataset
from tema.datasets.raw import RawFiles, canonical, check_item, check_item_table, csv_records, decoded_lines, decoded_text, parse_int
from tema.datasets.spec import Spec


def read(spec: Spec, raw: RawFiles) -> Dataset:
    """The upstream files of data/raw/art-office/ (dataset.yaml: format art-office) in the canonical form."""
    raw_dir = spec.raw_dir

    rows, origins = [], []
    for fname, domain in [("item_listA_F.csv", "A"), ("item_listO_AA_F.csv", "B")]:
        data, shown = raw(fname)
        records = csv_records(decoded_text(data, shown), shown)
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
    return canonical(spec, items, examples)
