"""Builds examples/kitchen-sample/ from the vendored food-kitchen benchmark (data/raw/food-kitchen): a small dataset
in the generic format (docs/datasets.md) that the README's worked example and the tests use.

What is real and what is not: the items and their titles are food-kitchen's (Amazon), and each user's sequence is
the real order of one food-kitchen training user who bought in both domains. The benchmark has no timestamps, so
the dates are made up: each user starts on a seeded random day of 2015 and buys every 1 to 9 days. The item table
also holds 1,500 items per domain (the users' items, then seeded others), so that the sampled-999 protocol, which
draws 999 other items of the target's domain, works as on the benchmarks.

    python examples/build_kitchen_sample.py     # rewrites examples/kitchen-sample/{items.csv,interactions.csv}
"""

from __future__ import annotations

import csv
import datetime as dt
from pathlib import Path

import numpy as np

from tema import datasets

OUT = Path(__file__).resolve().parent / "kitchen-sample"
USERS, ITEMS_PER_DOMAIN, SEED = 200, 1500, 7
DOMAIN_VALUE = {"A": "grocery", "B": "kitchen"}


def main() -> None:
    ds = datasets.read_raw("food-kitchen")
    rng = np.random.default_rng(SEED)
    overlap = ds.sequences[ds.sequences["user"].str.startswith("train_overlap:")]
    overlap = overlap[[len(h) >= 4 for h in overlap["history"]]]
    chosen = overlap.iloc[np.sort(rng.choice(len(overlap), size=USERS, replace=False))]
    domain = ds.items["domain"].to_numpy()
    used = sorted({i for h, t in zip(chosen["history"], chosen["target"]) for i in [*h, t]})
    keep = []
    for d in ("A", "B"):
        mine = [i for i in used if domain[i] == d]
        others = np.setdiff1d(np.flatnonzero(domain == d), mine)
        keep += mine + sorted(rng.choice(others, size=ITEMS_PER_DOMAIN - len(mine), replace=False).tolist())
    items = ds.items.set_index("item_id").loc[sorted(keep)]
    with open(OUT / "items.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["item_id", "category", "title"])
        for _, row in items.iterrows():
            writer.writerow([row["source_id"], DOMAIN_VALUE[row["domain"]], row["title"]])
    asin = ds.items["source_id"].to_numpy()
    start = dt.date(2015, 1, 1)
    with open(OUT / "interactions.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["user_id", "item_id", "time"])
        for n, (history, target) in enumerate(zip(chosen["history"], chosen["target"]), 1):
            day = start + dt.timedelta(days=int(rng.integers(0, 365)))
            for item in [*history, target]:
                writer.writerow([f"u{n:03d}", asin[item], day.isoformat()])
                day += dt.timedelta(days=int(rng.integers(1, 10)))


if __name__ == "__main__":
    main()
