"""Stage `features`: frozen encoders turn item text, the tag vocabulary and item images into arrays.

Outputs in data/features/<dataset>/ (numpy .npy, rows in item_id order 0..n-1, identical bits for
identical inputs), described by meta.json (encoder ids, dimensions, sha256 of the inputs):

- text.npy          [n_items, d] float32: title plus description/attributes, truncated by the encoder
- tags.tsv          tag_id, tag, in_A, in_B: one row per vocabulary tag (a tag in both domains' vocabularies
                    is one shared row, so both domains read the same vector)
- tag_vectors.npy   [n_tags, d] float32, the same text encoder by default
- item_tag_ids.npy  [n_items, max_tags] int32, tag ids in LLM rank order, -1 = padding
- item_tag_ranks.npy [n_items, max_tags] int16, each tag's LLM rank (1 = first), 0 = padding
- visual_mask.npy   [n_items] uint8, 1 where an image was embedded
- visual.npy        [n_items, d_img] float32 CLIP image features (zeros where mask is 0); only when some
                    item has an image (the shipped benchmarks have none)
- visual_failures.tsv  item_id, image, reason for every image that could not be read (not fatal)
- tags-<source>/    tags.tsv, tag_vectors.npy, item_tag_ids.npy, item_tag_ranks.npy of each further named tag
                    source of the dataset (tags.other_sources; meta.json's tag_sources), read by a model whose
                    `tags_from` names it

The encoders are tema.encoders'; the stage reads the prepared items and its dataset's tags through
tema.artifacts, which also reads its outputs back (artifacts.load_features).
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tema import artifacts, config, data, schema
from tema.encoders import TextEncoder, encode_images, encode_memoized, load_text_encoder, sha256_lines


def text_rows(dataset: data.Dataset, params: dict[str, Any]) -> np.ndarray:
    """The items whose text is encoded: every item (`features.text_items: all`, the default), or with `used` only
    those in some example's history or target (a quick run on a subsample, as the smoke profile: an item no
    example uses can only be a ranking candidate, and it gets a zero text vector)."""
    if (params.get("features") or {}).get("text_items", "all") == "all":
        return np.arange(dataset.n_items)
    seqs = dataset.sequences
    used = np.concatenate([np.concatenate(seqs["history"].to_numpy()), seqs["target"].to_numpy()]).astype(np.int64)
    return np.unique(used)


def item_texts(items: pd.DataFrame) -> list[str]:
    """Title, then description or attributes where present (the encoder truncates to its limit)."""
    return [f"{t}. {x}" if x else str(t) for t, x in zip(items["title"], items["text"].fillna(""))]


# -- tags --------------------------------------------------------------------------------------------

def write_tag_arrays(tag_dir: Path, out: Path, n_items: int, encoder, encoder_name: str, label: str, root: Path) -> dict[str, Any]:
    """tags.tsv, tag_vectors.npy, item_tag_ids.npy and item_tag_ranks.npy in `out` from the tags stage's outputs in
    tag_dir (stale ones removed first); returns their meta entry ({'available': False} where tag_dir has no tags)."""
    for stale in ("tags.tsv", "tag_vectors.npy", "item_tag_ids.npy", "item_tag_ranks.npy"):
        (out / stale).unlink(missing_ok=True)
    if not artifacts.has_tags(tag_dir):
        return {"available": False}
    vocabulary = artifacts.load_vocabulary(tag_dir)
    item_tags = artifacts.load_item_tags(tag_dir)
    tags, ids, ranks = tag_arrays(vocabulary, item_tags, n_items, str((tag_dir / "item_tags.tsv").relative_to(root)))
    started = time.perf_counter()
    vectors = encoder(tags["tag"].tolist(), desc=f"{label} tags")
    tags.to_csv(out / "tags.tsv", sep="\t", index=False)
    artifacts.write_npy(out / "tag_vectors.npy", vectors)
    artifacts.write_npy(out / "item_tag_ids.npy", ids)
    artifacts.write_npy(out / "item_tag_ranks.npy", ranks)
    tagged = (ids >= 0).any(1)
    print(f"{label}: {len(tags):,} tags in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return {
        "available": True, "encoder": encoder_name, "dim": encoder.dim, "n_tags": len(tags),
        "shared": int((tags["in_A"] & tags["in_B"]).sum()), "max_tags_per_item": int(ids.shape[1]),
        "items_with_tags": int(tagged.sum()), "mean_tags_per_item": round(float((ids >= 0).sum(1).mean()), 3),
        "input_sha256": sha256_lines([*tags["tag"], *map(json.dumps, item_tags["tags"])]),
    }


def tag_arrays(vocabulary: pd.DataFrame, item_tags: pd.DataFrame, n_items: int, source: str) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """(tags table, item_tag_ids, item_tag_ranks) from the tags stage's vocabulary and item tags.

    Tag ids follow the vocabulary file's order (domain, then frequency); a tag in both domains gets one id.
    An item tag outside its domain's vocabulary is an error naming the file and the item.
    """
    order: dict[str, int] = {}
    member: dict[str, set[str]] = {}
    for domain, tag in zip(vocabulary["domain"], vocabulary["tag"]):
        order.setdefault(tag, len(order))
        member.setdefault(tag, set()).add(domain)
    tags = pd.DataFrame({"tag_id": range(len(order)), "tag": list(order)})
    for d in data.DOMAINS:
        tags[f"in_{d}"] = [d in member[t] for t in tags["tag"]]
    width = max([len(t) for t in item_tags["tags"]] + [1])
    ids = np.full((n_items, width), -1, dtype=np.int32)
    ranks = np.zeros((n_items, width), dtype=np.int16)
    for item_id, domain, pairs in zip(item_tags["item_id"], item_tags["domain"], item_tags["tags"]):
        if not 0 <= item_id < n_items:
            raise data.DataError(f"{source}: item_id {item_id} outside 0..{n_items - 1}")
        for j, (tag, rank) in enumerate(sorted(pairs, key=lambda p: p[1])):
            if tag not in order or domain not in member[tag]:
                raise data.DataError(f"{source}: item {item_id} has tag {tag!r}, which is not in domain {domain}'s vocabulary")
            ids[item_id, j], ranks[item_id, j] = order[tag], rank
    return tags, ids, ranks


# -- the stage ---------------------------------------------------------------------------------------

def run(dataset_name: str, params: dict[str, Any], encoder: TextEncoder | None = None) -> dict[str, Any]:
    """Build every feature array of one dataset; returns meta.json's content (written last)."""
    schema.check(params)
    root = config.repo_root()
    dataset = data.load(dataset_name, artifacts.prepared_dir(dataset_name))
    items = dataset.items.sort_values("item_id").reset_index(drop=True)
    if not (items["item_id"].to_numpy() == np.arange(len(items))).all():
        raise data.DataError(f"data/prepared/{dataset_name}/items.parquet: item ids are not 0..n-1")
    out = artifacts.features_dir(dataset_name)
    out.mkdir(parents=True, exist_ok=True)
    meta_path = out / "meta.json"
    meta_path.unlink(missing_ok=True)  # the directory counts as complete only once meta.json is back
    name = config.get(params, "features.text_encoder", str)
    encoder = encoder or load_text_encoder(params)
    meta: dict[str, Any] = {"dataset": dataset_name, "items": len(items), "item_order": "item_id 0..n-1",
                            "item_ids_sha256": sha256_lines(items["source_id"])}

    texts = item_texts(items)
    started = time.perf_counter()
    has_text = np.array([bool(t.strip()) for t in texts])
    rows = text_rows(dataset, params)
    rows = rows[has_text[rows]]  # an item without title and text gets a zero vector, not the encoding of ''
    (out / "text.npy").unlink(missing_ok=True)
    if has_text.any():
        vectors = np.zeros((len(items), encoder.dim), dtype=np.float32)
        vectors[rows] = encode_memoized(encoder, [texts[i] for i in rows], artifacts.text_memo_dir(), desc=f"{dataset_name} item text")
        artifacts.write_npy(out / "text.npy", vectors)
        meta["text"] = {"encoder": name, "dim": encoder.dim, "max_seq_length": encoder.max_seq_length,
                        "input_sha256": sha256_lines(texts)}
        if not has_text.all():
            meta["text"]["items_without_text"] = int((~has_text).sum())
        if len(rows) < int(has_text.sum()):
            meta["text"]["items"] = {"encoded": len(rows), "zero": len(items) - len(rows),
                                     "rule": "features.text_items: used (only the items of some example; the others get zeros)"}
        print(f"{dataset_name}: {len(rows):,} item texts in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    else:
        meta["text"] = {"available": False, "reason": f"the items of {dataset_name} have no title or text (its dataset.yaml "
                        "names no title or text column)"}

    tag_dir = artifacts.tags_dir(params, dataset_name)
    meta["tags"] = write_tag_arrays(tag_dir, out, len(items), encoder, name, dataset_name, root)
    meta["tags"]["source_name"] = config.primary_source_name(params, dataset_name)
    if not meta["tags"]["available"]:
        kind = artifacts.tag_source_kind(tag_dir)
        why = (f"its tag source is none (tags.sources.{dataset_name}.kind: none)" if kind == "none"
               else f"{tag_dir.relative_to(root)}/ is missing: the dataset's tags stage has not run")
        meta["tags"]["reason"] = f"no tags for {dataset_name}: {why}"
    for stale in out.glob("tags-*"):
        shutil.rmtree(stale)
    others = config.other_sources(params, dataset_name)
    if others:  # each further named source: its own arrays beside the first's (a model picks one with tags_from)
        meta["tag_sources"] = {}
        for source in others:
            source_dir = artifacts.tags_dir(params, dataset_name, source)
            if not artifacts.has_tags(source_dir):
                raise data.DataError(f"{source_dir.relative_to(root)}/: no tags of source {source!r} "
                                     f"(tags.other_sources.{dataset_name}.{source}); run dvc repro tags-source@{dataset_name}-{source}")
            folder = out / f"tags-{source}"
            folder.mkdir()
            meta["tag_sources"][source] = {**write_tag_arrays(source_dir, folder, len(items), encoder, name,
                                                              f"{dataset_name} ({source})", root), "source_name": source}

    image_encoder = config.get(params, "features.image_encoder", (str, type(None)))
    visual, mask, failures, meta["visual"] = encode_images(items, image_encoder, root)
    (out / "visual.npy").unlink(missing_ok=True)
    if visual is not None:
        artifacts.write_npy(out / "visual.npy", visual)
    artifacts.write_npy(out / "visual_mask.npy", mask)
    failures.to_csv(out / "visual_failures.tsv", sep="\t", index=False)

    artifacts.write_json(meta_path, meta)
    return meta
