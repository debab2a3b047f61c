"""Popularity: every user gets the items of the target domain ranked by their training frequency."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from tema.models.base import ItemSpace, SequenceRecommender
from tema.models.registry import register


@register("popularity", display="Popularity", group="baseline")
class Popularity(SequenceRecommender):
    trainable = False

    def __init__(self, space: ItemSpace, max_len: int = 1):
        super().__init__(space, max_len)
        self.register_buffer("counts", torch.zeros(space.n_items, dtype=torch.float32))

    def fit(self, train: pd.DataFrame) -> None:
        """Count each item's occurrences in the training sequences (history and target)."""
        items = np.concatenate([np.concatenate(train["history"].to_numpy()), train["target"].to_numpy()])
        self.counts.copy_(torch.as_tensor(np.bincount(items, minlength=self.space.n_items), dtype=torch.float32))

    def score(self, histories: list[list[int]], domain: str) -> torch.Tensor:
        start, stop = self.space.domain_ranges[domain]
        return self.counts[start:stop].expand(len(histories), -1).clone()
