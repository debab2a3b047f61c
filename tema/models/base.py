"""What every model shares: the item space, how histories become tensors, per-domain scoring."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
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


def next_item_loss(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    table: torch.Tensor,
    space: ItemSpace,
    loss: str,
    n_negatives: int,
) -> torch.Tensor:
    """Cross-entropy of each next item against the items of its own domain.

    "full" scores every item of the domain; "sampled" scores the target against n_negatives items
    drawn uniformly from the domain (shared by the batch; accidental hits masked). With a uniform
    proposal the logQ correction is the same constant for every candidate and cancels in the softmax.
    """
    keep = targets > 0
    h, t = hidden[keep], targets[keep]
    total = hidden.new_zeros(())
    for start, stop in space.domain_ranges.values():
        in_domain = (t > start) & (t <= stop)
        if not in_domain.any():
            continue
        hd, td = h[in_domain], t[in_domain]
        if loss == "full":
            logits = hd @ table[start + 1 : stop + 1].T
            total = total + F.cross_entropy(logits, td - 1 - start, reduction="sum")
        else:
            neg = torch.randint(start + 1, stop + 1, (n_negatives,), device=hd.device)
            positive = (hd * table[td]).sum(-1, keepdim=True)
            negative = (hd @ table[neg].T).masked_fill(neg.unsqueeze(0) == td.unsqueeze(1), float("-inf"))
            logits = torch.cat([positive, negative], 1)
            total = total + F.cross_entropy(logits, torch.zeros_like(td), reduction="sum")
    return total / max(1, len(t))


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

    def setup(self, train) -> None:
        """Derive what the model needs from the training split (graphs, counts) before training and
        before loading a checkpoint. Only training interactions may be read here. Default: nothing."""

    def training_loss(self, inputs: torch.Tensor, targets: torch.Tensor, loss: str, n_negatives: int) -> torch.Tensor:
        """Loss of one batch (left-padded model indices; inputs[:, t] predicts targets[:, t])."""
        return next_item_loss(self.encode(inputs), targets, self.item_table(), self.space, loss, n_negatives)

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
