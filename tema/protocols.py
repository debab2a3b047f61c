"""Evaluation protocols and ranking metrics (docs/evaluation.md, "Protocols" and "Metrics").

Two protocols, per domain of the target:
- "sampled-999": the target ranked among 999 items drawn uniformly, without replacement, from its
  domain, excluding the target itself; history items may be drawn (as in the C2DSR line of work). The
  candidates are seeded and saved by the prepare stage, so every model sees the same ones.
- "full": the target ranked among all items of its domain (history items included).
Ties count against the target: rank = 1 + #(other candidates scoring >= the target).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pandas as pd
import torch

PROTOCOLS = ("sampled-999", "full")
METRICS = ("MRR", "NDCG@5", "NDCG@10", "HR@1", "HR@5", "HR@10")


def sample_candidates(targets: np.ndarray, domain_ranges: list[tuple[int, int]], n: int, seed: int) -> np.ndarray:
    """n distinct items per row, uniform over the row's domain [start, stop) minus the target (global ids)."""
    rng = np.random.default_rng(seed)
    out = np.empty((len(targets), n), dtype=np.int64)
    for row, (target, (start, stop)) in enumerate(zip(targets, domain_ranges)):
        size = stop - start - 1
        if size < n:
            raise ValueError(f"domain [{start}, {stop}) has {size} non-target items, fewer than the {n} candidates asked")
        draw = rng.choice(size, size=n, replace=False) + start
        draw[draw >= target] += 1  # skip the target's own id
        out[row] = draw
    return out


def ranks_full(scores: torch.Tensor, target_local: torch.Tensor) -> torch.Tensor:
    """Rank of each row's target among all columns; ties count against the target."""
    target_score = scores.gather(1, target_local.view(-1, 1))
    return (scores >= target_score).sum(1)  # the target itself makes the count start at 1


def ranks_sampled(scores: torch.Tensor, target_local: torch.Tensor, candidates_local: torch.Tensor) -> torch.Tensor:
    """Rank of each row's target among itself and its candidates; ties count against the target."""
    target_score = scores.gather(1, target_local.view(-1, 1))
    return 1 + (scores.gather(1, candidates_local) >= target_score).sum(1)


def metrics_from_ranks(ranks: np.ndarray) -> dict[str, np.ndarray]:
    ranks = np.asarray(ranks, dtype=np.float64)
    out = {"MRR": 1.0 / ranks}
    for k in (5, 10):
        out[f"NDCG@{k}"] = np.where(ranks <= k, 1.0 / np.log2(ranks + 1.0), 0.0)
    for k in (1, 5, 10):
        out[f"HR@{k}"] = (ranks <= k).astype(np.float64)
    return out


ScoreFn = Callable[[list[list[int]], str], torch.Tensor]


def evaluate_split(
    score: ScoreFn,
    examples: pd.DataFrame,
    domain_ranges: dict[str, tuple[int, int]],
    candidates: np.ndarray | None,
    batch_size: int = 256,
    protocols: tuple[str, ...] = PROTOCOLS,
) -> pd.DataFrame:
    """Per-example ranks and metrics under each protocol.

    score(histories, domain) returns a [batch, n_items_of_domain] tensor; examples holds the rows of
    one split (history, target, target_domain, user); candidates is aligned with those rows.
    """
    unknown = [p for p in protocols if p not in PROTOCOLS]
    if unknown:
        raise ValueError(f"unknown protocol(s) {unknown}; expected names from {PROTOCOLS}")
    if "sampled-999" in protocols and (candidates is None or len(candidates) != len(examples)):
        raise ValueError("sampled-999 needs one candidate row per example (from the prepare stage)")
    frames = []
    for domain, (start, _stop) in domain_ranges.items():
        rows = np.flatnonzero(examples["target_domain"].to_numpy() == domain)
        for lo in range(0, len(rows), batch_size):
            idx = rows[lo : lo + batch_size]
            batch = examples.iloc[idx]
            with torch.no_grad():
                scores = score(batch["history"].tolist(), domain).float()
            target_local = torch.as_tensor(batch["target"].to_numpy() - start)
            for protocol in protocols:
                if protocol == "full":
                    ranks = ranks_full(scores, target_local)
                else:
                    cand = torch.as_tensor(candidates[idx] - start)
                    ranks = ranks_sampled(scores, target_local, cand)
                frame = pd.DataFrame({"user": batch["user"].to_numpy(), "domain": domain, "protocol": protocol})
                frame["rank"] = ranks.numpy()
                for name, values in metrics_from_ranks(frame["rank"].to_numpy()).items():
                    frame[name] = values
                frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def summarize(per_user: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """Mean of each metric per group (e.g. per protocol and domain)."""
    return per_user.groupby(by, sort=True)[list(METRICS)].mean()


def selection_score(per_user: pd.DataFrame) -> float:
    """Checkpoint selection on validation: the mean of the two domains' full-ranking MRR."""
    full = per_user[per_user["protocol"] == "full"]
    value = full.groupby("domain")["MRR"].mean().mean()
    return float(value) if not math.isnan(value) else 0.0
