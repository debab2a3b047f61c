"""TEMA: tag-enriched multi-attention for cross-domain sequential recommendation (Wu et al., 2025).

The paper's full text is not available here; this follows the reconstruction in the study's design
(docs/method.md, "Item representation" and "Tag-enriched multi-attention"). It reads top to bottom:

1. Item representation: e_i = E_id[i] + P_text t_i + m_i P_vis v_i + g_i, from the frozen vectors of the
   features stage (text t_i, image v_i with mask m_i), and the weighted tag fusion
   g_i = sum_k alpha_ik P_tag tau_k, alpha_i = softmax_k(a^T tanh(W tau_k) + b r_ik), where tau_k is a tag's
   frozen vector and r_ik = -log(rank) the prior from the LLM's rank (1 = first).
2. Three sequences per user: the merged sequence S and the two domain views S^A, S^B (same length as S,
   the other domain's items blanked, positions counted within the domain). A domain view is read at every
   step, so H^A_t summarises the user's A items up to step t even when step t is a B item.
3. Level 1, intra-sequence: causal self-attention blocks (pre-LayerNorm, learned positions) per sequence.
4. Level 2, tag enrichment: each stream attends causally to its items' fused tag vectors g:
   H <- H + MHA(LN(H), LN(G), G) (keys normalised like the queries: see CrossAttention).
5. Level 3, cross-domain: each domain stream attends causally to the merged stream:
   H^A <- H^A + MHA(H^A, H^S, H^S), likewise for B.
6. Prediction for a target in domain d after step t: u = H^d_t + H^S_t, score(i) = <u, e_i> over the items
   of domain d, with the item representation tied between input and output.
7. Loss: next-item cross-entropy over the target domain's items for the fused state, plus aux_weight times
   the same loss for the merged state and for the domain state alone (in-domain sampled softmax by
   default, as for every model here; a uniform proposal makes the logQ correction a constant that cancels).

Every ablation is a constructor switch (tags = weighted | mean | none, tag_attention, cross_attention, text,
visual), and each has a registered name (ABLATIONS): TEMA with that switch fixed. An ablation inherits TEMA's
hyper-parameters (tema.models.registry.hyper): model_params.<ablation> is optional and holds only what differs.

Also here: SASRec-text, the baseline that isolates what tags add beyond text (item ID + frozen text
vector, no tags, one merged sequence). It lives in this module so that a change to the shared item
representation retrains both (tema.training fingerprints a model's module with what it imports).

The frozen arrays come from the features stage: the trainer (tema.training) reads them through
tema.artifacts and passes them as `features`, with their identity, which is part of the run's fingerprint
(new features retrain the model). The checkpoint records that identity too, and loading it into a model
built on other features is an error.
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tema.models.base import ItemSpace, SequenceRecommender, pad_histories
from tema.models.registry import register
from tema.models.sasrec import Block, causal_padding_mask

TAG_MODES = ("weighted", "mean", "none")
SIDE_INFO = ("fused", "noninvasive")  # where side information enters: the item vectors, or the attention scores only

# Registered with TEMA and its ablations (tema.models.registry); printed in the report's "Deviations" section.
DEVIATIONS = [
    "The paper's full text (equations, hyper-parameters, prompts) is not available here: the architecture is the "
    "reconstruction in the study's design from the abstract and the authors' predecessors (IFCDSR, LLM-EMF, C2DSR), "
    "so the numbers are not comparable one-to-one with the paper's.",
    "No images: the benchmark datasets have none and CLIP weights cannot be fetched offline. The visual branch is "
    "implemented and tested with a small random CLIP, and switched on automatically when a dataset has images.",
    "Text vectors come from a sentence-transformers MiniLM (384-d) instead of CLIP's text tower.",
    "Tags come from a 0.5B instruction model served locally (food-kitchen) instead of a large hosted LLM; art-office "
    "uses the vendored tags of a large hosted model (external_tags_deepseek.tsv). A dataset whose tags stage has not "
    "run yet has no tags: TEMA then runs without them (the features' meta.json and this report say so).",
    "Next-item losses use an in-domain sampled softmax (uniform negatives, so the logQ correction is a constant that "
    "cancels), like every model here; train.loss: full gives the full softmax.",
    "Width 64 and two blocks per stream, like the baselines; learning rate, dropout, weight decay and the auxiliary-loss "
    "weight chosen by the same validation-only search as the baselines' (`tema tune`: 6 trials, one seed), with early "
    "stopping on validation MRR: the baselines' budget, not a paper-scale configuration.",
]


class ReadsFeatures:
    """Mixin of the models that read the features stage's arrays: the trainer hands them `features` (the arrays of
    tema.artifacts.load_features, with their 'identity'). The checkpoint records that identity (a persistent
    buffer), and loading it into a model built on other features is an error, not a silently different model."""

    reads_features = True

    def remember_features(self, identity: str) -> None:
        self.register_buffer("features_key", torch.tensor(list(identity.ljust(16).encode()[:16]), dtype=torch.uint8))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        stored = state_dict.get(prefix + "features_key")
        if stored is not None and not torch.equal(stored, self.features_key):
            found, expected = bytes(self.features_key.tolist()).decode().strip(), bytes(stored.tolist()).decode().strip()
            raise ValueError(
                f"features changed: the checkpoint was trained on features {expected or '(given arrays)'}, "
                f"data/features now holds {found or '(given arrays)'}; re-run the train stage"
            )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _padded(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """A tensor with one extra leading zero row (row 0 = padding, row i + 1 = item i)."""
    values = torch.as_tensor(np.array(array), dtype=dtype)  # a copy: the arrays are read-only memory maps
    return torch.cat([torch.zeros((1, *values.shape[1:]), dtype=dtype), values])


class ItemRepresentation(nn.Module):
    """e_i = E_id[i] + P_text t_i + m_i P_vis v_i + g_i for model indices (0 = padding, which gives 0).

    The frozen arrays are non-persistent buffers: checkpoints hold the learned weights only, and the
    arrays are read again from the features stage when a run is loaded.
    """

    def __init__(self, n_items: int, dim: int, bank: dict[str, Any], text: bool, visual: bool, tags: str,
                 gate: bool = False, tag_dropout: float = 0.0, tag_noise: float = 0.0, tag_noise_seed: int = 0,
                 domains: dict[str, tuple[int, int]] | None = None):
        super().__init__()
        if not 0.0 <= tag_dropout < 1.0:
            raise ValueError(f"model_params: 'tag_dropout' must be in [0, 1), got {tag_dropout!r}")
        if not 0.0 <= tag_noise <= 1.0:
            raise ValueError(f"model_params: 'tag_noise' must be in [0, 1], got {tag_noise!r}")
        self.tag_dropout = tag_dropout
        if tags not in TAG_MODES:
            raise ValueError(f"model_params: 'tags' must be one of {TAG_MODES}, got {tags!r}")
        self.ids = nn.Embedding(n_items + 1, dim, padding_idx=0)
        nn.init.normal_(self.ids.weight, std=0.05)
        with torch.no_grad():
            self.ids.weight[0].zero_()
        self.use_text = text and "text" in bank
        if text and "text" not in bank:
            reason = (bank.get("meta") or {}).get("text", {}).get("reason", "text.npy is missing; run the features stage")
            raise ValueError(f"this model reads item text, but the features hold no text vectors: {reason}")
        if self.use_text:
            text_vectors = _padded(bank["text"], torch.float32)
            self._check_rows(text_vectors, n_items, "text.npy")
            self.register_buffer("text", text_vectors, persistent=False)
            self.p_text = nn.Linear(text_vectors.size(1), dim, bias=False)
        # Visual: only where the features hold images (the benchmarks have none: mask only).
        self.use_visual = visual and "visual" in bank
        if self.use_visual:
            vis = _padded(bank["visual"], torch.float32)
            self._check_rows(vis, n_items, "visual.npy")
            self.register_buffer("visual", vis, persistent=False)
            self.register_buffer("visual_mask", _padded(bank["visual_mask"], torch.float32), persistent=False)
            self.p_vis = nn.Linear(vis.size(1), dim, bias=False)
        # Tags: item_tag_ids [n_items, K] (-1 = none) -> model tag index (0 = none); ranks 1 = first.
        if tags != "none" and not ("item_tag_ids" in bank and len(bank.get("tag_vectors", ()))):
            reason = (bank.get("meta") or {}).get("tags", {}).get("reason", "the features hold no tag arrays")
            raise ValueError(f"this model reads tags (tags: {tags}), but the dataset has none: {reason}; train the ablation "
                             "tema-no-tags instead, or give the dataset a tag source")
        self.tag_mode = tags
        if self.tag_mode != "none":
            tag_ids = np.asarray(bank["item_tag_ids"]).astype(np.int64)
            if tag_noise:
                tag_ids = noisy_tags(tag_ids, bank["tags"], domains or {}, tag_noise, tag_noise_seed)
            ids = _padded(tag_ids + 1, torch.long)
            self._check_rows(ids, n_items, "item_tag_ids.npy")
            ranks = _padded(np.asarray(bank["item_tag_ranks"]).astype(np.float32), torch.float32)
            self.register_buffer("item_tags", ids, persistent=False)
            self.register_buffer("rank_prior", -torch.log(ranks.clamp(min=1)), persistent=False)
            self.register_buffer("tag_vectors", _padded(bank["tag_vectors"], torch.float32), persistent=False)
            width = self.tag_vectors.size(1)
            self.p_tag = nn.Linear(width, dim, bias=False)
            if self.tag_mode == "weighted":
                self.w_tag = nn.Linear(width, dim)
                self.a_tag = nn.Linear(dim, 1, bias=False)
                nn.init.zeros_(self.a_tag.weight)  # with b = 1, the fusion starts at the rank prior: alpha ~ 1/rank
                self.b_rank = nn.Parameter(torch.ones(()))
        # Gates (gate: True): one learned scalar per side-information term, e = E_id + sum_s gamma_s term_s, with the
        # tag gate at 0 and the others at 1, so that the model starts as itself without tags and opens the tag path
        # only as far as the training loss pays for it.
        self.gates = nn.ParameterDict(
            {name: nn.Parameter(torch.tensor(0.0 if name == "tags" else 1.0)) for name in self.terms()}
        ) if gate else None

    @staticmethod
    def _check_rows(tensor: torch.Tensor, n_items: int, name: str) -> None:
        if tensor.size(0) != n_items + 1:
            raise ValueError(f"features {name}: {tensor.size(0) - 1} rows, the dataset has {n_items} items")

    @property
    def has_tags(self) -> bool:
        return self.tag_mode != "none"

    def terms(self) -> list[str]:
        """The side-information terms this representation adds to the ID embedding."""
        return [name for name, on in (("text", self.use_text), ("visual", self.use_visual), ("tags", self.has_tags)) if on]

    def gate(self, name: str) -> torch.Tensor | float:
        return 1.0 if self.gates is None else self.gates[name]

    def tag_weights(self, rows: torch.Tensor) -> torch.Tensor:
        """alpha [*rows, K]: the fusion weights of each item's tags (zeros for an item without tags)."""
        ids = self.item_tags[rows]
        present = ids > 0
        if self.training and self.tag_dropout:  # tag dropout: whole tags of an item left out at training time
            present = present & (torch.rand(ids.shape, device=ids.device) >= self.tag_dropout)
        if self.tag_mode == "mean":
            logits = torch.zeros(ids.shape, device=ids.device)
        else:
            per_tag = self.a_tag(torch.tanh(self.w_tag(self.tag_vectors))).squeeze(-1)  # [T + 1], vocabulary once
            logits = per_tag[ids] + self.b_rank * self.rank_prior[rows]
        logits = logits.masked_fill(~present, float("-inf"))
        any_tag = present.any(-1, keepdim=True)
        alpha = torch.softmax(logits.masked_fill(~any_tag, 0.0), -1)
        return alpha * present

    def tag_fusion(self, rows: torch.Tensor) -> torch.Tensor:
        """g [*rows, dim] = sum_k alpha_ik P_tag tau_k (zero for items without tags or padding)."""
        projected = self.p_tag(self.tag_vectors)  # [T + 1, dim]: the vocabulary once, then gathered
        return (self.tag_weights(rows).unsqueeze(-1) * projected[self.item_tags[rows]]).sum(-2)

    def tagged(self, rows: torch.Tensor) -> torch.Tensor:
        """Boolean [*rows]: the item has at least one tag."""
        if not self.has_tags:
            return torch.zeros(rows.shape, dtype=torch.bool, device=rows.device)
        return (self.item_tags[rows] > 0).any(-1)

    def side(self, rows: torch.Tensor, tags: torch.Tensor | None = None) -> torch.Tensor:
        """The side information of rows [*rows, dim]: the (gated) sum of the text, visual and tag terms."""
        s = torch.zeros((*rows.shape, self.ids.embedding_dim), device=rows.device)
        if self.use_text:
            s = s + self.gate("text") * self.p_text(self.text[rows])
        if self.use_visual:
            s = s + self.gate("visual") * self.visual_mask[rows].unsqueeze(-1) * self.p_vis(self.visual[rows])
        if self.has_tags:
            s = s + self.gate("tags") * (self.tag_fusion(rows) if tags is None else tags)
        return s * (rows > 0).unsqueeze(-1)

    def forward(self, rows: torch.Tensor, tags: torch.Tensor | None = None) -> torch.Tensor:
        """e [*rows, dim]; `tags` (the rows' g, when the caller already has it) avoids computing it twice."""
        return self.ids(rows) + self.side(rows, tags)


def noisy_tags(ids: np.ndarray, tags: Any, domains: dict[str, tuple[int, int]], p: float, seed: int) -> np.ndarray:
    """item_tag_ids [n_items, K] (-1 = none) with each tag replaced, independently with probability p, by a tag drawn
    uniformly from its item's domain vocabulary (the features' tags table, column in_<domain>); seeded, so every
    training seed sees the same noisy tags. The tag-noise experiment: at p = 1 the tags carry no information."""
    rng = np.random.default_rng(seed)
    out = ids.copy()
    for domain, (start, stop) in sorted(domains.items()):
        vocab = np.flatnonzero(np.asarray(tags[f"in_{domain}"], dtype=bool))
        block = out[start:stop]  # model indices start+1..stop are rows start..stop-1
        replace = (block >= 0) & (rng.random(block.shape) < p)
        block[replace] = rng.choice(vocab, int(replace.sum()))
    return out


def gather_rows(seqs: torch.Tensor, fn) -> torch.Tensor:
    """fn evaluated once per distinct model index of seqs, spread back to seqs' shape."""
    rows, where = torch.unique(seqs, return_inverse=True)
    return fn(rows)[where]


def sampled_loss(
    hidden: torch.Tensor, targets: torch.Tensor, items: ItemRepresentation, ranges: list[tuple[int, int]],
    loss: str, n_negatives: int, weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Summed (weighted) next-item cross-entropy of hidden [N, dim] for targets [N] (model indices) against
    the items of each target's domain.

    Only the rows a batch needs are represented, once: the targets and, for "sampled", n_negatives items
    drawn uniformly from each domain (shared by the batch, accidental hits masked); "full" scores every item.
    """
    total = hidden.new_zeros(())
    weights = torch.ones(len(targets), device=hidden.device) if weights is None else weights
    for start, stop in ranges:
        in_domain = (targets > start) & (targets <= stop)
        if not in_domain.any():
            continue
        h, t, w = hidden[in_domain], targets[in_domain], weights[in_domain]
        if loss == "full":
            table = items(torch.arange(start + 1, stop + 1, device=h.device))
            total = total + (w * F.cross_entropy(h @ table.T, t - 1 - start, reduction="none")).sum()
            continue
        neg = torch.randint(start + 1, stop + 1, (n_negatives,), device=h.device)
        rows, where = torch.unique(torch.cat([t, neg]), return_inverse=True)
        reps = items(rows)
        target_reps, neg_reps = reps[where[: len(t)]], reps[where[len(t) :]]
        positive = (h * target_reps).sum(-1, keepdim=True)
        negative = (h @ neg_reps.T).masked_fill(neg.unsqueeze(0) == t.unsqueeze(1), float("-inf"))
        ce = F.cross_entropy(torch.cat([positive, negative], 1), torch.zeros_like(t), reduction="none")
        total = total + (w * ce).sum()
    return total


class CrossAttention(nn.Module):
    """H <- H + gamma MHA(LN(H), K, V): a query stream reads another sequence of vectors causally (V = K unless
    given). gamma is 1, or with gate=True a learned scalar that starts at 0 (the block starts as the identity).

    key_norm=True normalises the keys too, MHA(LN(H), LN'(K), V): for keys that are not a normalised stream, such as
    the fused tag vectors g (norm ~0.3 against the queries' ~8). Without it the key path of the tag attention starts
    with a tiny gradient, and Adam's coupled weight decay (a step of about lr per step for a weight whose loss
    gradient is smaller than weight_decay times itself) shrinks its query and key projections to zero: on
    food-kitchen their norms fell from ~5.7 to ~0.006 and the tag attention was exactly uniform for every user."""

    def __init__(self, dim: int, heads: int, dropout: float, gate: bool = False, key_norm: bool = False):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.key_norm = nn.LayerNorm(dim) if key_norm else None
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.gate = nn.Parameter(torch.zeros(())) if gate else None
        self.last_weights: torch.Tensor | None = None
        self.record = False

    def forward(self, h: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor, values: torch.Tensor | None = None) -> torch.Tensor:
        normed = keys if self.key_norm is None else self.key_norm(keys)
        out, weights = self.attn(self.norm(h), normed, keys if values is None else values, attn_mask=mask,
                                 need_weights=self.record, average_attn_weights=True)
        if self.record:
            self.last_weights = weights.detach()
        out = self.dropout(out)
        return h + (out if self.gate is None else self.gate * out)


def key_mask(keys_present: torch.Tensor, heads: int) -> torch.Tensor:
    """[B * heads, L, L] (True = blocked): future keys and absent keys; a position may always see itself."""
    length = keys_present.size(1)
    future = torch.triu(torch.ones(length, length, dtype=torch.bool, device=keys_present.device), diagonal=1)
    eye = torch.eye(length, dtype=torch.bool, device=keys_present.device)
    blocked = (future | ~keys_present.unsqueeze(1)) & ~eye
    return blocked.repeat_interleave(heads, dim=0)


class NonInvasiveBlock(Block):
    """A level-1 block whose attention scores may read side information that its values do not carry (NOVA, Liu et
    al., AAAI 2021): queries and keys from LN(H + S), values from LN(H). Without S it is SASRec's block."""

    def scores_input(self, x: torch.Tensor, side: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        v = self.norm1(x)
        return (v if side is None else self.norm1(x + side)), v

    def forward(self, x: torch.Tensor, mask: torch.Tensor, side: torch.Tensor | None = None) -> torch.Tensor:
        if side is None:
            return super().forward(x, mask)
        qk, v = self.scores_input(x, side)
        x = x + self.dropout(self.attn(qk, qk, v, attn_mask=mask, need_weights=False)[0])
        return x + self.dropout(self.ffn(self.norm2(x)))


class Stream(nn.Module):
    """One sequence's encoder: learned positions counted within the stream, then level-1 blocks and (if
    enabled) level-2 tag attention."""

    def __init__(self, dim: int, blocks: int, heads: int, dropout: float, max_len: int, tag_attention: bool,
                 gate: bool = False):
        super().__init__()
        self.heads = heads
        self.positions = nn.Embedding(max_len + 1, dim, padding_idx=0)
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(NonInvasiveBlock(dim, heads, dropout) for _ in range(blocks))
        self.tag_attention = CrossAttention(dim, heads, dropout, gate=gate, key_norm=True) if tag_attention else None
        self.record = False  # explain(): keep the last block's attention weights
        self.last_weights: torch.Tensor | None = None

    def forward(self, seqs: torch.Tensor, x: torch.Tensor, g: torch.Tensor | None, tagged: torch.Tensor | None,
                side: torch.Tensor | None = None) -> torch.Tensor:
        """x: the items' input vectors; with `side` (non-invasive), x is the ID stream and side shapes the level-1
        attention scores only, and the tag attention's values are the ID stream instead of the tag vectors g."""
        present = seqs > 0
        position = torch.cumsum(present, dim=1)  # items of this stream so far (0 before its first item)
        scale = x.size(-1) ** 0.5
        h = self.dropout(x * scale + self.positions(position))
        s = None if side is None else side * scale
        mask = causal_padding_mask(seqs, self.heads)
        for block in self.blocks:
            if self.record and block is self.blocks[-1]:
                qk, v = block.scores_input(h, s)
                self.last_weights = block.attn(qk, qk, v, attn_mask=mask, need_weights=True)[1].detach()
            h = block(h, mask, s)
        if self.tag_attention is not None and g is not None:
            h = self.tag_attention(h, g, key_mask(present & tagged, self.heads), None if side is None else x)
        return h


class TEMAModel(ReadsFeatures, SequenceRecommender):
    """The model; registered as "tema" and, with one switch fixed, as each ablation (see ABLATIONS)."""

    @staticmethod
    def feature_inputs(settings: dict[str, Any]) -> set[str]:
        """What it reads with these switches (tema.models.registry.inputs); visual only where a dataset has images."""
        return {name for name, on in [("text", settings["text"]), ("tags", settings["tags"] != "none"), ("visual", settings["visual"])] if on}

    def __init__(
        self, space: ItemSpace, max_len: int, dim: int = 64, blocks: int = 2, heads: int = 2, dropout: float = 0.2,
        tags: str = "weighted", tag_attention: bool = True, cross_attention: bool = True, text: bool = True,
        visual: bool = True, aux_weight: float = 0.5, side_info: str = "fused", gate: bool = False,
        tag_dropout: float = 0.0, tag_noise: float = 0.0, tag_noise_seed: int = 0, tags_from: str | None = None,
        features: dict[str, Any] | None = None,
    ):
        super().__init__(space, max_len)
        given = {"tags": tags, "tag_attention": tag_attention, "cross_attention": cross_attention, "text": text, "visual": visual}
        if side_info not in SIDE_INFO:
            raise ValueError(f"model_params: 'side_info' must be one of {SIDE_INFO}, got {side_info!r}")
        self.noninvasive = side_info == "noninvasive"
        self.tags_from = tags_from  # which of the dataset's tag sources `features` holds: the trainer's choice (tema.training)
        if features is None:
            raise ValueError("TEMA reads the features stage's arrays: pass them as 'features' (tema.training does)")
        if len(space.domain_ranges) != 2:
            raise ValueError(f"TEMA needs exactly two domains, got {sorted(space.domain_ranges)}")
        self.switches = given
        self.domains = sorted(space.domain_ranges)
        self.ranges = [space.domain_ranges[d] for d in self.domains]
        self.aux_weight = aux_weight
        self.remember_features(features.get("identity", ""))
        self.items = ItemRepresentation(space.n_items, dim, features, given["text"], given["visual"], given["tags"], gate=gate,
                                        tag_dropout=tag_dropout, tag_noise=tag_noise, tag_noise_seed=tag_noise_seed,
                                        domains=dict(space.domain_ranges))
        tag_attention = given["tag_attention"] and self.items.has_tags
        self.streams_ = nn.ModuleList(Stream(dim, blocks, heads, dropout, max_len, tag_attention, gate) for _ in range(3))  # S, A, B
        self.cross = nn.ModuleList(CrossAttention(dim, heads, dropout) for _ in range(2)) if given["cross_attention"] else None
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(3))

    def in_domain(self, k: int, m: torch.Tensor) -> torch.Tensor:
        start, stop = self.ranges[k]
        return (m > start) & (m <= stop)

    def streams(self, seqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """H^S, H^A, H^B [B, L, dim] for left-padded model indices."""
        rows, where = torch.unique(seqs, return_inverse=True)
        g_rows = self.items.tag_fusion(rows) if self.items.has_tags else None
        g, tagged = (None, None) if g_rows is None else (g_rows[where], self.items.tagged(rows)[where])
        if self.noninvasive:  # values: the ID stream; side information shapes the attention scores
            x, side = self.items.ids(rows)[where], self.items.side(rows, g_rows)[where]
        else:
            x, side = self.items(rows, g_rows)[where], None
        merged = self.norms[0](self.streams_[0](seqs, x, g, tagged, side))
        out = [merged]
        for k in range(2):
            keep = self.in_domain(k, seqs)
            view, kept = seqs * keep, keep.unsqueeze(-1)
            h = self.streams_[k + 1](view, x * kept, None if g is None else g * kept, tagged, None if side is None else side * kept)
            if self.cross is not None:
                h = self.cross[k](h, merged, key_mask(seqs > 0, self.cross[k].attn.num_heads))
            out.append(self.norms[k + 1](h))
        return out[0], out[1], out[2]

    def training_loss(self, inputs: torch.Tensor, targets: torch.Tensor, loss: str, n_negatives: int) -> torch.Tensor:
        """Per step with a target in domain k: CE(H^S + H^k) + aux_weight (CE(H^S) + CE(H^k)), one set of
        negatives per domain for the three terms; the mean over the batch's targets."""
        merged, ha, hb = self.streams(inputs)
        total = merged.new_zeros(())
        for k, h_dom in enumerate((ha, hb)):
            at = self.in_domain(k, targets)
            if not at.any():
                continue
            t, hs, hd = targets[at], merged[at], h_dom[at]
            if self.aux_weight:
                hidden, goal = torch.cat([hs + hd, hs, hd]), t.repeat(3)
                weights = torch.cat([torch.ones_like(t, dtype=hs.dtype), torch.full((2 * len(t),), self.aux_weight, device=hs.device)])
            else:
                hidden, goal, weights = hs + hd, t, None
            total = total + sampled_loss(hidden, goal, self.output_items, [self.ranges[k]], loss, n_negatives, weights)
        return total / max(1, int((targets > 0).sum()))

    def user_vectors(self, seqs: torch.Tensor, k: int) -> torch.Tensor:
        merged, ha, hb = self.streams(seqs)
        return merged[:, -1] + (ha, hb)[k][:, -1]

    def output_items(self, rows: torch.Tensor) -> torch.Tensor:
        """The items' output vectors (tied with the input): the full representation e, or with non-invasive side
        information the ID embedding alone (side information never enters the value path)."""
        return self.items.ids(rows) if self.noninvasive else self.items(rows)

    def domain_table(self, k: int, device) -> torch.Tensor:
        start, stop = self.ranges[k]
        return self.output_items(torch.arange(start + 1, stop + 1, device=device))

    def score(self, histories: list[list[int]], domain: str) -> torch.Tensor:
        device = self.items.ids.weight.device
        k = self.domains.index(domain)
        seqs = pad_histories(histories, self.max_len).to(device)
        return (self.user_vectors(seqs, k) @ self.domain_table(k, device).T).cpu()

    # -- diagnostics -------------------------------------------------------------------------------
    @torch.no_grad()
    def diagnostics(self, histories: list[list[int]], batch_size: int = 256, pairs: int = 20000, seed: int = 0) -> dict[str, Any]:
        """What the tag path of a trained model does (the train stage's report), over the given histories:

        - scale: the mean L2 norm over all items of the ID embedding and of each side-information term as it enters
          the item vector (after its gate), and of the fused tag vector g itself;
        - gates (gate=True) and the rank-prior weight b of the tag fusion;
        - tag attention: the merged stream's level-2 attention at each history's last step, as a normalised
          entropy H / log n over the n keys it may read (1 = exactly uniform), for histories with n >= 2;
        - similarity: the mean cosine of random same-domain item pairs, for the ID embeddings and for g (tags that
          many items share pull their vectors together).
        """
        was_training = self.training
        self.eval()
        items = self.items
        device = items.ids.weight.device
        rows = torch.arange(1, self.space.n_items + 1, device=device)
        out: dict[str, Any] = {"side_info": "noninvasive" if self.noninvasive else "fused"}
        scale = {"id": items.ids(rows).norm(dim=-1).mean().item()}
        if items.use_text:
            scale["text"] = (items.gate("text") * items.p_text(items.text[rows])).norm(dim=-1).mean().item()
        g = items.tag_fusion(rows) if items.has_tags else None
        if g is not None:
            tagged = items.tagged(rows)
            scale["tags (g)"] = g[tagged].norm(dim=-1).mean().item()
            scale["tags (gated)"] = (items.gate("tags") * g[tagged]).norm(dim=-1).mean().item()
        out["scale"] = scale
        out["gates"] = {} if items.gates is None else {k: float(v) for k, v in items.gates.items()}
        for i, stream in enumerate(self.streams_):
            if stream.tag_attention is not None and stream.tag_attention.gate is not None:
                out["gates"][f"tag attention ({'SAB'[i]})"] = float(stream.tag_attention.gate)
        out["rank_prior_weight"] = float(items.b_rank) if items.tag_mode == "weighted" else None
        rng = np.random.default_rng(seed)
        similarity = {}
        for k, (start, stop) in enumerate(self.ranges):
            a, b = (torch.as_tensor(rng.integers(start + 1, stop + 1, pairs), device=device) for _ in range(2))
            keep = a != b
            similarity[f"id {self.domains[k]}"] = F.cosine_similarity(items.ids(a[keep]), items.ids(b[keep])).mean().item()
            if g is not None:
                both = keep & items.tagged(a) & items.tagged(b)
                similarity[f"tags {self.domains[k]}"] = F.cosine_similarity(items.tag_fusion(a[both]), items.tag_fusion(b[both])).mean().item()
        out["similarity"] = similarity
        entropies: list[float] = []
        attention = self.streams_[0].tag_attention
        if attention is not None:
            attention.record = True
            try:
                for begin in range(0, len(histories), batch_size):
                    seqs = pad_histories(histories[begin : begin + batch_size], self.max_len).to(device)
                    self.streams(seqs)
                    w = attention.last_weights[:, -1, :]  # [B, L], averaged over heads
                    allowed = (seqs > 0) & items.tagged(seqs)
                    allowed[:, -1] = True  # a position may always read itself
                    n = allowed.sum(-1)
                    h = -(w.clamp_min(1e-12).log() * w * allowed).sum(-1)
                    ok = n >= 2
                    entropies += (h[ok] / torch.log(n[ok].float())).tolist()
            finally:
                attention.record = False
        self.train(was_training)
        if entropies:
            e = np.asarray(entropies)
            out["tag_attention"] = {"histories": len(e), "normalised_entropy_mean": float(e.mean()),
                                    "normalised_entropy_min": float(e.min()), "share_uniform": float((e > 0.999).mean())}
        return out

    # -- explanations ------------------------------------------------------------------------------
    @torch.no_grad()
    def explain(self, history: list[int], domain: str, top: int = 5) -> dict[str, Any]:
        """For one history: the top recommended items of `domain`, and where the model looked.

        Returns item ids (0-based) of the history window and of the recommendations, the attention of the
        last step over the history in the merged stream's last self-attention block, in its tag attention
        and in the target domain's cross-domain attention (each a list over the window, summing to 1), and
        the tag weights alpha of each item in the window.
        """
        was_training = self.training
        self.eval()
        k = self.domains.index(domain)
        seqs = pad_histories([history], self.max_len).to(self.items.ids.weight.device)
        window = [int(i) - 1 for i in seqs[0].tolist() if i > 0]
        records: dict[str, Any] = {}
        recorders = [m for m in (self.streams_[0], self.streams_[0].tag_attention, None if self.cross is None else self.cross[k]) if m is not None]
        for m in recorders:
            m.record = True
        try:
            scores = (self.user_vectors(seqs, k) @ self.domain_table(k, seqs.device).T)[0]
        finally:
            for m in recorders:
                m.record = False
            self.train(was_training)
        n = len(window)
        start = self.ranges[k][0]
        if n == 0:
            return {"history": [], "recommended": [start + int(i) for i in torch.topk(scores, min(top, len(scores))).indices],
                    "self_attention": [], "tag_attention": [], "cross_attention": [], "tag_weights": []}
        records["history"] = window
        records["recommended"] = [start + int(i) for i in torch.topk(scores, min(top, len(scores))).indices]
        records["self_attention"] = self.streams_[0].last_weights[0, -1, -n:].tolist()
        tag_attn = self.streams_[0].tag_attention
        records["tag_attention"] = tag_attn.last_weights[0, -1, -n:].tolist() if tag_attn is not None and tag_attn.last_weights is not None else None
        cross = None if self.cross is None else self.cross[k].last_weights
        records["cross_attention"] = cross[0, -1, -n:].tolist() if cross is not None else None
        if self.items.has_tags:
            rows = torch.as_tensor([i + 1 for i in window], device=seqs.device)
            records["tag_weights"] = self.items.tag_weights(rows).tolist()
        return records


@register("tema", display="TEMA", group="ours", deviations=DEVIATIONS, choices={"tags": TAG_MODES, "side_info": SIDE_INFO})
class TEMA(TEMAModel):
    pass


# Ablations: each is TEMA with one switch fixed (docs/method.md, "Ablations") and otherwise TEMA's hyper-parameters; the names are what
# params.yaml lists under `models`: name -> (display name, fixed switches).
ABLATIONS = {
    "tema-no-tags": ("TEMA w/o tags", {"tags": "none"}),
    "tema-mean-tags": ("TEMA mean-pooled tags", {"tags": "mean"}),
    "tema-no-tag-attention": ("TEMA w/o tag attention", {"tag_attention": False}),
    "tema-no-cross-attention": ("TEMA w/o cross-attention", {"cross_attention": False}),
    "tema-no-text": ("TEMA w/o text", {"text": False}),
    "tema-no-visual": ("TEMA w/o visual", {"visual": False}),
    # the tag-noise experiment: a seeded share of each item's tags replaced by random tags of its domain (noisy_tags)
    "tema-tag-noise-50": ("TEMA, 50% random tags", {"tag_noise": 0.5}),
    "tema-tag-noise-100": ("TEMA, random tags", {"tag_noise": 1.0}),
    # the tagger comparison: TEMA reading the tags of the dataset's source named "embedded" (tags.other_sources), the
    # embedded local LLM's, beside TEMA reading the dataset's own source
    "tema-embedded-tags": ("TEMA, embedded-LLM tags", {"tags_from": "embedded"}),
}


def _ablation(name: str, display: str, fixed: dict[str, Any]) -> type:
    """TEMA with `fixed` switches, registered as an ablation of "tema"; params.yaml may repeat them but not
    contradict them."""

    def __init__(self, space: ItemSpace, max_len: int, **kwargs: Any) -> None:
        clash = {k: kwargs[k] for k in fixed if k in kwargs and kwargs[k] != fixed[k]}
        if clash:
            raise ValueError(f"model_params.{name}: this ablation fixes {fixed}; got {clash}")
        TEMAModel.__init__(self, space, max_len, **{**kwargs, **fixed})

    __init__.__signature__ = inspect.signature(TEMAModel.__init__)  # what registry.build accepts
    cls = type(name.title().replace("-", ""), (TEMAModel,), {"__init__": __init__, "__module__": __name__})
    return register(name, display=display, group="ablation", base="tema", fixed=fixed)(cls)


for _name, (_display, _fixed) in ABLATIONS.items():
    _ablation(_name, _display, _fixed)


@register("sasrec-text", display="SASRec+text", group="baseline")
class SASRecText(ReadsFeatures, SequenceRecommender):
    """SASRec over item ID + frozen text vectors (no tags, no domain streams): what text alone adds."""

    @staticmethod
    def feature_inputs(settings: dict[str, Any]) -> set[str]:
        return {"text"}

    def __init__(
        self, space: ItemSpace, max_len: int, dim: int = 64, blocks: int = 2, heads: int = 2, dropout: float = 0.2,
        features: dict[str, Any] | None = None,
    ):
        super().__init__(space, max_len)
        if features is None:
            raise ValueError("SASRec-text reads the features stage's text vectors: pass them as 'features' (tema.training does)")
        self.ranges = [space.domain_ranges[d] for d in sorted(space.domain_ranges)]
        self.remember_features(features.get("identity", ""))
        self.items = ItemRepresentation(space.n_items, dim, features, text=True, visual=False, tags="none")
        self.stream = Stream(dim, blocks, heads, dropout, max_len, tag_attention=False)
        self.norm = nn.LayerNorm(dim)

    def encode(self, seqs: torch.Tensor) -> torch.Tensor:
        x = gather_rows(seqs, self.items)
        return self.norm(self.stream(seqs, x, None, None))

    def training_loss(self, inputs: torch.Tensor, targets: torch.Tensor, loss: str, n_negatives: int) -> torch.Tensor:
        hidden = self.encode(inputs)
        keep = targets > 0
        return sampled_loss(hidden[keep], targets[keep], self.items, self.ranges, loss, n_negatives) / max(1, int(keep.sum()))

    def score(self, histories: list[list[int]], domain: str) -> torch.Tensor:
        device = self.items.ids.weight.device
        seqs = pad_histories(histories, self.max_len).to(device)
        start, stop = self.space.domain_ranges[domain]
        table = self.items(torch.arange(start + 1, stop + 1, device=device))
        return (self.encode(seqs)[:, -1] @ table.T).cpu()
