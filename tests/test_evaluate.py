"""Paired significance tests between models over per-user metrics."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tema import config
from tema.evaluate import significance


def per_user(n_users=60, seeds=(1, 2)) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    base = rng.uniform(0.0, 0.5, n_users)
    rows = []
    for seed in seeds:
        for model, values in {"ref": base + 0.1, "same": base + 0.1, "worse": base,
                              "noisy": base + 0.1 + rng.normal(0, 0.3, n_users)}.items():
            for u, v in enumerate(values):
                rows.append({"model": model, "seed": seed, "split": "test", "protocol": "full", "domain": "A",
                             "user": f"u{u}", "MRR": v, "NDCG@10": v / 2})
    return pd.DataFrame(rows)


def test_wilcoxon_separates_a_consistent_gain_from_ties_and_noise():
    sig = significance(per_user(), "ref").set_index(["model", "metric"])
    assert sig.loc[("worse", "MRR"), "p_value"] < 1e-6 and sig.loc[("worse", "MRR"), "difference"] == pytest.approx(0.1)
    assert sig.loc[("same", "MRR"), "p_value"] == 1.0 and sig.loc[("same", "MRR"), "difference"] == 0
    assert sig.loc[("noisy", "MRR"), "p_value"] > 0.05
    assert set(sig["pairs"]) == {60} and set(sig["reference"]) == {"ref"}


def test_unknown_reference_names_the_parameter():
    with pytest.raises(config.ParamsError, match="'evaluate.reference' is 'tema'"):
        significance(per_user(), "tema")
