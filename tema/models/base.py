"""What every model shares: the item space, how histories become tensors, per-domain scoring."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ItemSpace:
    """Global item ids 0..n_items-1; model index = id + 1 (0 is padding); contiguous id range per domain."""

    n_items: int
    domain_ranges: dict[str, tuple[int, int]]

    @classmethod
    def of(cls, dataset) -> ItemSpace:
        return cls(dataset.n_items, {d: dataset.domain_range(d) for d in sorted(set(dataset.items["domain"]))})


def pad_histories(histories: list[list[int]], max_len: int) -> torch.Tensor:
    """Left-padded [batch, length] tensor of model indices (item id + 1), keeping the last max_len items."""
    length = max(1, min(max_len, max(len(h) for h in histories)))
    out = torch.zeros(len(histories), length, dtype=torch.long)
    for row, history in enumerate(histories):
        tail = history[-length:]
        if tail:
            out[row, length - len(tail) :] = torch.as_tensor(tail, dtype=torch.long) + 1
    return out


class SequenceRecommender(nn.Module):
    """A model that encodes a (merged-domain) sequence and scores items by a dot product with its item table.

    Subclasses define encode(seqs) -> [batch, length, dim] hidden states (position t summarises the
    prefix up to t) and item_table() -> [n_items + 1, dim] (row 0 is padding).
    """

    trainable = True

    def __init__(self, space: ItemSpace, max_len: int):
        super().__init__()
        self.space = space
        self.max_len = max_len

    def encode(self, seqs: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def item_table(self) -> torch.Tensor:
        raise NotImplementedError

    def score(self, histories: list[list[int]], domain: str) -> torch.Tensor:
        """[batch, n_items_of_domain] scores for the next item of each history, in that domain."""
        device = next(self.parameters()).device
        seqs = pad_histories(histories, self.max_len).to(device)
        user = self.encode(seqs)[:, -1]
        start, stop = self.space.domain_ranges[domain]
        return (user @ self.item_table()[start + 1 : stop + 1].T).cpu()
