"""Feature extraction throughput: every item text and every tag of a dataset through the text encoder.

Prints items/s and tags/s, the wall time of both together, and the ratio to the 3-minute target for
food-kitchen. Item texts come from the vendored raw data; tags from data/tags/<dataset>/vocabulary.tsv
when the tags stage has run, else the distinct pass-1 tags in the LLM answer cache (a superset of any
vocabulary refined from it).

    python benchmarks/feature_throughput.py --dataset food-kitchen
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tema import config, datasets, encoders, features  # noqa: E402


def tag_texts(dataset: str) -> tuple[list[str], str]:
    vocab = ROOT / "data" / "tags" / dataset / "vocabulary.tsv"
    if vocab.is_file():
        return sorted(set(pd.read_csv(vocab, sep="\t", keep_default_na=False)["tag"])), str(vocab.relative_to(ROOT))
    cache = ROOT / "data" / "tags-cache" / dataset / "pass1.jsonl"
    tags = set()
    for line in cache.read_text().splitlines():
        record = json.loads(line)
        tags.update(record.get("tags") or [])
    return sorted(tags), f"{cache.relative_to(ROOT)} (distinct pass-1 tags)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="food-kitchen")
    parser.add_argument("--target-s", type=float, default=180.0)
    args = parser.parse_args()
    params = config.load_params(ROOT / "profiles" / "default.yaml")
    torch.set_num_threads(config.get(params, "train.num_threads", int))
    ds = datasets.read_raw(args.dataset, ROOT / "data" / "raw")
    texts = features.item_texts(ds.items.sort_values("item_id"))
    tags, tag_source = tag_texts(args.dataset)
    start = time.perf_counter()
    encoder = encoders.TextEncoder(config.get(params, "features.text_encoder", str), config.get(params, "features.batch_size", int))
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    encoder(texts)
    items_s = time.perf_counter() - start
    start = time.perf_counter()
    encoder(tags)
    tags_s = time.perf_counter() - start
    total = load_s + items_s + tags_s
    print(f"{args.dataset}: {len(texts):,} item texts, {len(tags):,} tags from {tag_source}; encoder {encoder.name} (dim {encoder.dim}), "
          f"{torch.get_num_threads()} threads")
    print(f"load encoder   {load_s:7.1f} s")
    print(f"item texts     {items_s:7.1f} s  {len(texts) / items_s:8.0f} items/s")
    print(f"tags           {tags_s:7.1f} s  {len(tags) / max(tags_s, 1e-9):8.0f} tags/s")
    print(f"total          {total:7.1f} s  (target {args.target_s:.0f} s: {total / args.target_s:.2f} of it)")
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
