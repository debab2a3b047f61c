"""GRU4Rec (Hidasi et al., ICLR 2016) over the merged sequence, scored per domain with a tied item table."""

from __future__ import annotations

import torch
from torch import nn

from tema.models.base import ItemSpace, SequenceRecommender
from tema.models.registry import register


@register("gru4rec", display="GRU4Rec", group="baseline")
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
        """States at every position; the GRU reads only the real items, never the left padding.

        A GRU's biases move its state even on all-zero input, so running it over padding would make
        a user's scores depend on the longest history in the batch. The items are packed right-aligned,
        run, and put back where they were.
        """
        lengths = (seqs > 0).sum(1)
        length = seqs.size(1)
        # left-padded -> right-padded: row r's real items start at column length - lengths[r]
        shift = (torch.arange(length, device=seqs.device).unsqueeze(0) + (length - lengths).unsqueeze(1)) % length
        right = seqs.gather(1, shift)
        packed = nn.utils.rnn.pack_padded_sequence(
            self.dropout(self.items(right)), lengths.clamp(min=1).cpu(), batch_first=True, enforce_sorted=False)
        hidden, _ = self.gru(packed)
        hidden, _ = nn.utils.rnn.pad_packed_sequence(hidden, batch_first=True, total_length=length)
        back = (torch.arange(length, device=seqs.device).unsqueeze(0) - (length - lengths).unsqueeze(1)) % length
        hidden = hidden.gather(1, back.unsqueeze(-1).expand(-1, -1, hidden.size(-1)))
        return self.out(self.dropout(hidden))

    def item_table(self) -> torch.Tensor:
        return self.items.weight
