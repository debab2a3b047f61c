"""Tagging throughput with the embedded LLM: the decode ceiling of the server, the pipeline against it, and the
pipeline against a naive loop.

1. ceiling (--slots 1 2 4 8): for each slot count, a fresh embedded server with that many parallel slots (the
   study's model, context per slot and threads) and as many concurrent requests, each decoding a fixed number of
   tokens (--decode, end-of-sequence ignored) after the real pass-1 prompt of one item (cached after the first
   round, as the pipeline's shared prefixes are): the aggregate decode rate in output tokens/s, the most any
   tagging loop can get out of this model on this machine if it read no prompt;
   with --item-prompts TOKENS, also the ceiling with item prompts: the same, but each request is another item's
   real prompt, decoding TOKENS: the shared prefix comes from the cache, each item's own tokens (title and text,
   about 40 on art-office) are read first, as in the pipeline. Its items/s is the most any loop can tag with these prompts;
2. naive: one request at a time, one item per request, through the same prompt and validation;
3. pipeline: tema.tagging.tag_items with llm.concurrency requests in flight, filling the server's
   llm.embedded.n_parallel slots.
Both 2 and 3 tag the same items (the first N of each domain, with fresh caches). Prints items/s, output tokens
per item and per second, the ceiling at the pipeline's slot count, and the ratios pipeline / ceiling and
pipeline / naive (issue targets: >= 0.85 and >= 1.3).
4. with --answer-form json list: the pipeline once per answer form (llm.answer_form; the list form under its
   grammar), each against the naive JSON loop, and each form's agreement with the JSON answers on the same items,
   per domain as the tags report compares two sources (tema.tags.compare_sources): mean per-item Jaccard of the
   canonical tag sets, and the share of items with at least one tag in common.
5. with --unconstrained: the pipeline once more with llm.json_mode off (the JSON form parsed from free text, no
   schema or grammar held to the sampler), and its agreement with the constrained answers: what constrained
   sampling costs on this server.

    python benchmarks/tag_throughput.py --items 100                 # ceiling at 1, 2, 4, 8 slots, then the loops
    python benchmarks/tag_throughput.py --items 100 --slots 4       # the ceiling at the configured slot count only
    python benchmarks/tag_throughput.py --items 200 --slots 4 --answer-form json list   # and the compact form
    python benchmarks/tag_throughput.py --items 100 --slots 4 --unconstrained          # and without a grammar
    python benchmarks/tag_throughput.py --items 100 --slots 4 --item-prompts 22        # and the bound with item prompts
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import itertools
import math
import sys
import tempfile
import threading
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tema import config, datasets, llm  # noqa: E402
from tema.tagging import ANSWER_FORMS, TagCache, build_messages, tag_items  # noqa: E402
from tema.tags import compare_sources, domain_prompts, items_to_tag, settings_from_params  # noqa: E402


def ceiling(params: dict, slots: int, prompts: list[list[dict[str, str]]], decode: int, rounds: int) -> dict[str, float]:
    """Aggregate rates of a fresh server with `slots` slots under `slots` concurrent requests that each decode exactly
    `decode` tokens. The requests take the prompts in turn, cycling: one prompt (the decode ceiling) is answered from
    the cache every time; distinct items' prompts (the ceiling with item prompts) each bring their own tokens to read
    first, as the pipeline's do. A first, untimed round puts the shared prefix into every slot's cache."""
    params = copy.deepcopy(params)
    params["llm"]["embedded"]["n_parallel"] = slots
    turn, lock = itertools.cycle(prompts), threading.Lock()
    tokens, fresh, requests = [0] * slots, [0] * slots, [0] * slots
    with llm.endpoint(params) as ep:
        client = ep.client(timeout=600)

        def worker(i: int, n: int) -> None:
            for _ in range(n):
                with lock:
                    messages = next(turn)
                response = client.chat.completions.create(model=ep.model, messages=messages, max_tokens=decode,
                                                          temperature=0.0, extra_body={"ignore_eos": True})
                usage = response.usage
                cached = getattr(getattr(usage, "prompt_tokens_details", None), "cached_tokens", None)
                tokens[i] += usage.completion_tokens
                fresh[i] += usage.prompt_tokens - cached if cached is not None else float("nan")  # nan: not reported
                requests[i] += 1

        def round_of(n: int) -> float:
            start = time.perf_counter()
            threads = [threading.Thread(target=worker, args=(i, n)) for i in range(slots)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            return time.perf_counter() - start

        round_of(1)  # warm, untimed: each slot caches the shared prefix
        tokens[:], fresh[:], requests[:] = [0] * slots, [0] * slots, [0] * slots
        seconds = round_of(rounds)
    return {"tokens_s": sum(tokens) / seconds, "tokens": sum(tokens), "seconds": seconds,
            "requests_s": sum(requests) / seconds, "fresh_prompt_tokens": sum(fresh) / sum(requests)}


def agreement(items, first: dict[int, list[str]], second: dict[int, list[str]], names: tuple[str, str]) -> "pd.DataFrame":
    """Two answer forms' tags of the same items compared per domain (tema.tags.compare_sources, as the tags report does)."""
    table = pd.DataFrame({"item_id": [it.item_id for it in items], "domain": [it.domain_name for it in items]})

    def tags(found: dict[int, list[str]]) -> pd.DataFrame:
        return pd.DataFrame({"item_id": list(found), "tags": [[(t, 1.0) for t in v] for v in found.values()]})

    return compare_sources(table, tags(first), tags(second), names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="food-kitchen")
    parser.add_argument("--items", type=int, default=100, help="items in total (half from each domain)")
    parser.add_argument("--slots", type=int, nargs="*", default=[1, 2, 4, 8], help="slot counts of the ceiling")
    parser.add_argument("--decode", type=int, default=48, help="tokens each ceiling request decodes")
    parser.add_argument("--rounds", type=int, default=3, help="requests per slot in the ceiling")
    parser.add_argument("--item-prompts", type=int, metavar="TOKENS", help="also the ceiling with item prompts: at each slot "
                        "count, distinct items' real prompts, each decoding TOKENS (the pipeline's output tokens per item, "
                        "e.g. 22): the items/s bound once each item's own prompt tokens are read")
    parser.add_argument("--parallel", type=int, help="the loops' server slots (default: llm.embedded.n_parallel)")
    parser.add_argument("--concurrency", type=int, help="the pipeline's requests in flight (default: llm.concurrency)")
    parser.add_argument("--answer-form", nargs="+", choices=ANSWER_FORMS, help="the pipeline once per answer form "
                        "(default: llm.answer_form), with each form's agreement with the JSON answers")
    parser.add_argument("--unconstrained", action="store_true", help="the pipeline once more with json_mode off "
                        "(no schema or grammar), with its agreement with the constrained JSON answers")
    args = parser.parse_args()
    params = config.load_params(ROOT / "profiles" / "default.yaml")
    if args.parallel:
        params["llm"]["embedded"]["n_parallel"] = args.parallel
    if args.concurrency:
        params["llm"]["concurrency"] = args.concurrency
    settings = settings_from_params(params)
    dataset = datasets.read_raw(args.dataset, ROOT / "data" / "raw")
    items = items_to_tag(dataset, args.items // 2, domain_prompts(datasets.spec(args.dataset, ROOT / "data" / "raw")))
    prompts = [build_messages(item.domain_prompt, item.title, item.text, settings.k) for item in items]
    ceilings, item_ceilings = {}, {}
    for slots in args.slots:
        found = ceiling(params, slots, prompts[:1], args.decode, args.rounds)
        ceilings[slots] = found["tokens_s"]
        print(f"ceiling : {slots} slot(s): {found['tokens']} tokens in {found['seconds']:.1f} s = "
              f"{found['tokens_s']:.1f} output tokens/s", flush=True)
        if args.item_prompts:
            found = ceiling(params, slots, prompts, args.item_prompts, args.rounds)
            item_ceilings[slots] = found["requests_s"]
            print(f"ceiling with item prompts: {slots} slot(s): {found['requests_s']:.2f} items/s, "
                  f"{found['tokens_s']:.1f} output tokens/s ({args.item_prompts} per item), "
                  f"{found['fresh_prompt_tokens']:.0f} prompt tokens/item read, not from the cache"
                  f"{' (the server does not report its cached tokens)' if math.isnan(found['fresh_prompt_tokens']) else ''}",
                  flush=True)
    forms = args.answer_form or [settings.answer_form]
    # (name, requests in flight, answer form, the key its answers are kept under: the form, or "free" without a grammar)
    loops = [("naive", 1, "json", "json")] + [(f"pipeline{'' if len(forms) == 1 else ' ' + form}", settings.concurrency, form, form)
                                               for form in forms]
    if args.unconstrained:
        loops.append(("pipeline free", settings.concurrency, "json", "free"))
    results, answers = {}, {}
    with tempfile.TemporaryDirectory() as tmp, llm.LazyEndpoint(params, settings.timeout_s) as ep:
        ep.client()  # start the server before timing
        for name, concurrency, form, kept in loops:
            run_settings = dataclasses.replace(settings, concurrency=concurrency, answer_form=form,
                                               json_mode=settings.json_mode and kept != "free")
            start = time.perf_counter()
            found, failures, acct = tag_items(items, ep.client, ep.model, ep.model_sha256, run_settings,
                                              TagCache(Path(tmp) / f"{name.replace(' ', '-')}.jsonl"), progress=False)
            seconds = time.perf_counter() - start
            results[name] = {"items_s": len(items) / seconds, "tokens_s": acct.tokens_out / seconds, "form": form}
            answers.setdefault(kept, found)
            print(f"{name:13s}: {len(items)} items in {seconds:.1f} s = {len(items) / seconds:.2f} items/s, "
                  f"{acct.tokens_out / seconds:.1f} output tokens/s, {acct.tokens_in / len(items):.0f} prompt tokens/item, "
                  f"{acct.tokens_out / len(items):.1f} output tokens/item, {len(failures)} failures", flush=True)
    slots = params["llm"]["embedded"]["n_parallel"]
    for name, _, _, kept in loops[1:]:
        print(f"ratio {name} / naive: {results[name]['items_s'] / results['naive']['items_s']:.2f}x items/s "
              f"(server: {slots} slots, {params['llm']['embedded']['threads']} threads, concurrency {settings.concurrency})")
        if slots in ceilings:
            print(f"ratio {name} / ceiling at {slots} slots: {results[name]['tokens_s'] / ceilings[slots]:.2f} "
                  f"({results[name]['tokens_s']:.1f} of {ceilings[slots]:.1f} output tokens/s)")
        if slots in item_ceilings:
            print(f"ratio {name} / ceiling with item prompts at {slots} slots: "
                  f"{results[name]['items_s'] / item_ceilings[slots]:.2f} ({results[name]['items_s']:.2f} of "
                  f"{item_ceilings[slots]:.2f} items/s)")
        if kept != "json":
            compared = agreement(items, answers["json"], answers[kept], ("json", kept))
            for domain, row in compared.iterrows():
                print(f"agreement {kept} / json, {domain}: mean per-item Jaccard {row['mean Jaccard per item']:.3f}, "
                      f"items with a tag in common {row['share with a tag in common']:.3f} ({row['items both tag']} items)")
    if ceilings:
        best = max(ceilings, key=ceilings.get)
        print(f"best ceiling: {ceilings[best]:.1f} output tokens/s at {best} slots")


if __name__ == "__main__":
    main()
