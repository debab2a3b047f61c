"""Tagging throughput with the embedded LLM: the pipeline's concurrent tagger against a naive loop.

Both tag the same items (the first N of each domain of a dataset, domain by domain) with fresh caches:
- naive: one request at a time, one item per request, through the same prompt and validation;
- pipeline: tema.tagging.tag_items with llm.concurrency requests in flight, filling the server's
  parallel slots (llm.embedded.n_parallel), whose shared prompt prefixes the server caches.
Prints items/s, output tokens/s and their ratio.

    python benchmarks/tag_throughput.py --items 100
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tema import config, datasets, llm  # noqa: E402
from tema.tagging import TagCache, tag_items  # noqa: E402
from tema.tags import domain_prompts, items_to_tag, settings_from_params  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="food-kitchen")
    parser.add_argument("--items", type=int, default=100, help="items in total (half from each domain)")
    args = parser.parse_args()
    params = config.load_params(ROOT / "profiles" / "default.yaml")
    settings = settings_from_params(params)
    dataset = datasets.read_raw(args.dataset, ROOT / "data" / "raw")
    items = items_to_tag(dataset, args.items // 2, domain_prompts(datasets.spec(args.dataset, ROOT / "data" / "raw")))
    results = {}
    with tempfile.TemporaryDirectory() as tmp, llm.LazyEndpoint(params, settings.timeout_s) as ep:
        ep.client()  # start the server before timing
        for name, concurrency in [("naive", 1), ("pipeline", settings.concurrency)]:
            run_settings = dataclasses.replace(settings, concurrency=concurrency)
            start = time.perf_counter()
            found, failures, acct = tag_items(items, ep.client, ep.model, ep.model_sha256, run_settings,
                                              TagCache(Path(tmp) / f"{name}.jsonl"), progress=False)
            seconds = time.perf_counter() - start
            results[name] = len(items) / seconds
            print(f"{name:8s}: {len(items)} items in {seconds:.1f} s = {len(items) / seconds:.2f} items/s, "
                  f"{acct.tokens_out / seconds:.1f} output tokens/s, {acct.tokens_in / len(items):.0f} prompt tokens/item, "
                  f"{acct.tokens_out / len(items):.1f} output tokens/item, {len(failures)} failures", flush=True)
    print(f"ratio pipeline / naive: {results['pipeline'] / results['naive']:.2f}x "
          f"(server: {params['llm']['embedded']['n_parallel']} slots, {params['llm']['embedded']['threads']} threads)")


if __name__ == "__main__":
    main()
