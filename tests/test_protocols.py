"""Ranking metrics and the two evaluation protocols, checked against hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from tema.protocols import evaluate_split, metrics_from_ranks, ranks_full, ranks_sampled, sample_candidates

RANGES = {"A": (0, 1200), "B": (1200, 3000)}


def test_hand_computed_metrics():
    m = metrics_from_ranks(np.array([1, 3, 7, 12]))
    assert m["MRR"].tolist() == pytest.approx([1.0, 1 / 3, 1 / 7, 1 / 12])
    assert m["NDCG@5"].tolist() == pytest.approx([1.0, 1 / math.log2(4), 0.0, 0.0])
    assert m["NDCG@10"].tolist() == pytest.approx([1.0, 0.5, 1 / math.log2(8), 0.0])
    assert m["HR@1"].tolist() == [1, 0, 0, 0]
    assert m["HR@5"].tolist() == [1, 1, 0, 0]
    assert m["HR@10"].tolist() == [1, 1, 1, 0]


def test_ties_count_against_the_target():
    scores = torch.tensor([[0.5, 0.9, 0.5, 0.1, 0.5]])
    # target 0 scores 0.5: one item above, two tied -> rank 4
    assert ranks_full(scores, torch.tensor([0])).tolist() == [4]
    assert ranks_sampled(scores, torch.tensor([0]), torch.tensor([[2, 3]])).tolist() == [2]
    assert ranks_sampled(scores, torch.tensor([3]), torch.tensor([[1, 2, 4]])).tolist() == [4]


def test_candidate_sampler_is_seeded_in_domain_and_excludes_target():
    targets = np.array([5, 1500, 0, 2999])
    ranges = [RANGES["A"], RANGES["B"], RANGES["A"], RANGES["B"]]
    a = sample_candidates(targets, ranges, 999, seed=7)
    b = sample_candidates(targets, ranges, 999, seed=7)
    c = sample_candidates(targets, ranges, 999, seed=8)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    for row, (t, (lo, hi)) in enumerate(zip(targets, ranges)):
        assert len(set(a[row])) == 999
        assert t not in a[row]
        assert a[row].min() >= lo and a[row].max() < hi
    with pytest.raises(ValueError, match="fewer than the 999 candidates"):
        sample_candidates(np.array([0]), [(0, 500)], 999, seed=0)


def examples(n=60, seed=0):
    rng = np.random.default_rng(seed)
    domains = rng.choice(["A", "B"], size=n)
    targets = [int(rng.integers(*RANGES[d])) for d in domains]
    return pd.DataFrame({
        "user": [f"u{i}" for i in range(n)], "history": [[1, 2, 3]] * n, "target": targets, "target_domain": domains,
    })


def run(score_fn, ex):
    ranges = [RANGES[d] for d in ex["target_domain"]]
    cand = sample_candidates(ex["target"].to_numpy(), ranges, 999, seed=1)
    return evaluate_split(score_fn, ex, RANGES, cand, batch_size=16)


def test_constant_scorer_ranks_last():
    ex = examples()
    per_user = run(lambda hist, d: torch.zeros(len(hist), RANGES[d][1] - RANGES[d][0]), ex)
    sampled = per_user[per_user["protocol"] == "sampled-999"]
    assert (sampled["rank"] == 1000).all()
    full = per_user[per_user["protocol"] == "full"]
    sizes = full["domain"].map({d: hi - lo for d, (lo, hi) in RANGES.items()})
    assert (full["rank"] == sizes).all()
    assert per_user["HR@10"].sum() == 0


def test_oracle_ranks_first():
    ex = examples()
    queue = {"A": list(ex.loc[ex.target_domain == "A", "target"]), "B": list(ex.loc[ex.target_domain == "B", "target"])}

    def oracle(hist, domain):
        lo, hi = RANGES[domain]
        scores = torch.zeros(len(hist), hi - lo)
        for row in range(len(hist)):
            scores[row, queue[domain].pop(0) - lo] = 1.0
        return scores

    per_user = run(oracle, ex)
    # the scorer is called once per batch of each domain, in order; each protocol reuses those scores
    assert (per_user["rank"] == 1).all() and (per_user["MRR"] == 1).all()
    assert set(per_user["protocol"]) == {"full", "sampled-999"}
    assert len(per_user) == 2 * len(ex)


def test_random_scorer_matches_chance():
    ex = examples(n=400)
    gen = torch.Generator().manual_seed(0)
    per_user = run(lambda hist, d: torch.rand(len(hist), RANGES[d][1] - RANGES[d][0], generator=gen), ex)
    sampled = per_user[per_user["protocol"] == "sampled-999"]
    assert sampled["HR@10"].mean() == pytest.approx(0.01, abs=0.015)
    assert sampled["rank"].mean() == pytest.approx(500, rel=0.1)
