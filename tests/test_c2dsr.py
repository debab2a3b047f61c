"""C2DSR: its item graphs come from training interactions only; its pieces do what the paper says."""

from __future__ import annotations

import pandas as pd
import torch
from test_training import N_A, cfg, synthetic

from tema.models import ItemSpace, build
from tema.models.c2dsr import next_in_domain, transition_graphs
from tema.training import build_model, load_run, train_run

HYPER = {"dim": 16, "dropout": 0.0, "max_len": 8}


def edges(adj: torch.Tensor) -> set[tuple[int, int]]:
    return {tuple(e) for e in adj.to_sparse_coo().coalesce().indices().T.tolist()}


def test_transition_graphs_count_consecutive_items_and_normalise_rows():
    space = ItemSpace(4, {"A": (0, 2), "B": (2, 4)})
    cross, single = transition_graphs([[0, 3, 1], [0, 1], [0, 1]], space)  # ids; graphs use id + 1
    dense = cross.to_dense()
    assert dense[1, 2] == 2 / 3 and dense[1, 4] == 1 / 3 and dense[4, 2] == 1.0  # 0->1 twice, 0->3 once, 3->1
    assert edges(cross) == {(1, 2), (1, 4), (4, 2)}
    assert edges(single) == {(1, 2)}  # 0 -> 1 inside A (across the B item, and directly); B has one item per sequence
    assert single.to_dense()[1, 2] == 1.0


def test_graphs_are_built_from_training_interactions_only(tmp_path):
    ds = synthetic()
    seqs = ds.sequences.copy()
    held_out = seqs["split"] != "train"
    # Every held-out user walks a path no training user walks: item 29 -> 28 -> 27, then a B item.
    seqs.loc[held_out, "history"] = pd.Series([[N_A - 1, N_A - 2, N_A - 3]] * int(held_out.sum()), index=seqs.index[held_out])
    seqs.loc[held_out, "target"] = N_A + 39  # the last B item
    seqs.loc[held_out, "target_domain"] = "B"
    ds = type(ds)(ds.name, ds.domain_names, ds.items, seqs)
    train = ds.split("train")
    expected = set()
    for history, target in zip(train["history"], train["target"]):
        s = [i + 1 for i in list(history) + [target]]
        expected |= set(zip(s[:-1], s[1:]))

    built = build_model(ds, "c2dsr", HYPER, cfg(), train)
    assert edges(built.adj_cross) == expected
    assert not edges(built.adj_cross) & {(N_A, N_A - 1), (N_A - 1, N_A - 2), (N_A - 2, N_A + 40)}

    train_run(ds, "c2dsr", HYPER, cfg(max_epochs=1), 1, tmp_path, "d")
    loaded = load_run(ds, "c2dsr", HYPER, cfg(), tmp_path)  # evaluation rebuilds the graphs the same way
    assert edges(loaded.adj_cross) == expected and edges(loaded.adj_single) == edges(built.adj_single)
    assert "adj_cross" not in torch.load(tmp_path / "model.pt", weights_only=True)


def test_domain_targets_are_the_next_item_of_the_same_domain():
    # ids + 1 with A = 1..3, B = 4..6: inputs a1 b4 a2 b5, final target a3
    inputs = torch.tensor([[0, 1, 4, 2, 5]])
    targets = torch.tensor([[1, 4, 2, 5, 3]])
    in_a = lambda m: (m > 0) & (m <= 3)  # noqa: E731
    in_b = lambda m: (m > 3) & (m <= 6)  # noqa: E731
    assert next_in_domain(inputs, targets, in_a).tolist() == [[0, 2, 0, 3, 0]]
    assert next_in_domain(inputs, targets, in_b).tolist() == [[0, 0, 5, 0, 0]]  # b5 has no later B item


def test_scores_use_the_domain_stream_only_when_the_history_has_that_domain():
    torch.manual_seed(0)
    model = build("c2dsr", ItemSpace(70, {"A": (0, 30), "B": (30, 70)}), {"dim": 16, "dropout": 0.0}, 10)
    model.setup(synthetic().split("train"))
    model.eval()
    with torch.no_grad():
        only_a = model.score([[1, 2, 3]], "B")  # no B item: merged state only
        merged, _, _ = model.streams(torch.tensor([[2, 3, 4]]))
        assert torch.allclose(only_a, model.heads_out[1](merged[:, -1]), atol=1e-5)
        assert model.score([[1, 2, 3]], "A").shape == (1, 30)


def test_contrastive_term_changes_the_loss_and_full_softmax_works():
    torch.manual_seed(0)
    ds = synthetic()
    model = build_model(ds, "c2dsr", {**HYPER, "lam": 1.0}, cfg(), ds.split("train")).eval()
    inputs = torch.tensor([[0, 1, 31, 2], [1, 2, 3, 32]])
    targets = torch.tensor([[1, 31, 2, 33], [2, 3, 32, 4]])
    rec_only = model.training_loss(inputs, targets, "full", 0)
    model.lam = 0.7
    mixed = model.training_loss(inputs, targets, "full", 0)
    assert torch.isfinite(rec_only) and torch.isfinite(mixed) and not torch.isclose(0.7 * rec_only, mixed)
    assert torch.isfinite(model.training_loss(inputs, targets, "sampled", 8))


def test_lambda_weights_the_recommendation_loss_even_without_mixed_sequences():
    torch.manual_seed(0)
    ds = synthetic()
    model = build_model(ds, "c2dsr", HYPER, cfg(), ds.split("train")).eval()
    inputs = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]])  # domain A only: no infomax pair
    targets = torch.tensor([[2, 3, 4, 5], [5, 6, 7, 8]])
    weighted = model.training_loss(inputs, targets, "full", 0)
    model.lam = 1.0
    assert torch.isclose(weighted, 0.7 * model.training_loss(inputs, targets, "full", 0))
