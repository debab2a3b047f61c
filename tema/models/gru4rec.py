"""GRU4Rec (Hidasi et al., ICLR 2016) over the merged sequence, scored per domain with a tied item table."""

from __future__ import annotations

import torch
from torch import nn

from tema.models.base import ItemSpace, SequenceRecommender
from tema.models.registry import register


@register("gru4rec")
class GRU4Rec(SequenceRecommender):
    def __init__(self, space: ItemSpace, max_len: int, dim: int = 64, layers: int = 1, dropout: float = 0.2):
        super().__init__(space, max_len)
        self.items = nn.Embedding(space.n_items + 1, dim, padding_idx=0)
        nn.init.normal_(self.items.weight, std=0.05)
        with torch.no_grad():
            self.items.weight[0].zero_()
        self.dropout = nn.Dropout(dropout)
        self.gru = nn.GRU(dim, dim, num_layers=layers, batch_first=True, dropout=dropout if layers > 1 else 0.0)
        self.out = nn.Linear(dim, dim)

    def encode(self, seqs: torch.Tensor) -> torch.Tensor:
        hidden, _ = self.gru(self.dropout(self.items(seqs)))
        return self.out(self.dropout(hidden))

    def item_table(self) -> torch.Tensor:
        return self.items.weight
