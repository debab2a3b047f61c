"""SASRec (Kang & McAuley, ICDM 2018): causal self-attention over the merged sequence.

Pre-LayerNorm blocks with learned positions; the item table is tied between input and output, and the
last position's state is scored against the items of the target's domain.
"""

from __future__ import annotations

import torch
from torch import nn

from tema.models.base import ItemSpace, SequenceRecommender
from tema.models.registry import register


def causal_padding_mask(seqs: torch.Tensor, heads: int) -> torch.Tensor:
    """[batch * heads, L, L] boolean mask (True = blocked): future keys and padding keys.

    A position always sees itself, so padded (left) rows never have every key blocked (no NaNs).
    """
    length = seqs.size(1)
    future = torch.triu(torch.ones(length, length, dtype=torch.bool, device=seqs.device), diagonal=1)
    pad_key = (seqs == 0).unsqueeze(1)  # [B, 1, L]
    eye = torch.eye(length, dtype=torch.bool, device=seqs.device)
    blocked = (future | pad_key) & ~eye
    return blocked.repeat_interleave(heads, dim=0)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(dim, dim))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q = self.norm1(x)
        x = x + self.dropout(self.attn(q, q, q, attn_mask=mask, need_weights=False)[0])
        return x + self.dropout(self.ffn(self.norm2(x)))


@register("sasrec", display="SASRec", group="baseline")
class SASRec(SequenceRecommender):
    def __init__(self, space: ItemSpace, max_len: int, dim: int = 64, blocks: int = 2, heads: int = 2, dropout: float = 0.2):
        super().__init__(space, max_len)
        self.heads = heads
        self.items = nn.Embedding(space.n_items + 1, dim, padding_idx=0)
        nn.init.normal_(self.items.weight, std=0.05)
        with torch.no_grad():
            self.items.weight[0].zero_()
        self.positions = nn.Embedding(max_len, dim)
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(dim, heads, dropout) for _ in range(blocks))
        self.norm = nn.LayerNorm(dim)

    def encode(self, seqs: torch.Tensor) -> torch.Tensor:
        length = seqs.size(1)
        pos = torch.arange(self.max_len - length, self.max_len, device=seqs.device)  # last item = last position
        x = self.dropout(self.items(seqs) * self.items.embedding_dim**0.5 + self.positions(pos))
        x = x * (seqs > 0).unsqueeze(-1)
        mask = causal_padding_mask(seqs, self.heads)
        for block in self.blocks:
            x = block(x, mask)
        return self.norm(x)

    def item_table(self) -> torch.Tensor:
        return self.items.weight
