"""Top-k for a user from a trained run (tema.recommend, `tema recommend`), and the neighbours of an item or a tag."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from conftest import ROOT, describe_datasets
from test_tema import bank, write_features
from test_training import N_A, N_B, synthetic

from tema import artifacts, cli, config, data, recommend
from tema.training import TrainConfig, load_run, train_run

TAGS = ["sweet", "salty", "steel", "organic", "spicy", "glass"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A repository with the synthetic dataset prepared, its features (6 tags) and TEMA trained (seed 1)."""
    repo = tmp_path_factory.mktemp("repo")
    (repo / "dvc.yaml").write_text("stages: {}\n")
    (repo / "params.yaml").write_text("{}\n")
    describe_datasets(repo)
    params = config.load_params(ROOT / "profiles" / "default.yaml")
    params["train"].update(seeds=[1], max_epochs=3, patience=3, batch_size=32, max_len=10, loss="full", num_threads=1, workers=1)
    params["model_params"]["tema"] = {"dim": 16, "dropout": 0.0, "blocks": 1, "lr": 0.01}
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(repo)
        ds = synthetic()
        data.save(ds, artifacts.prepared_dir("synthetic"))
        write_features(repo, "synthetic", bank())
        pd.DataFrame({"tag_id": range(6), "tag": TAGS, "in_A": True, "in_B": True}).to_csv(
            artifacts.features_dir("synthetic") / "tags.tsv", sep="\t", index=False)
        cfg = TrainConfig.from_params(params)
        train_run(ds, "tema", params["model_params"]["tema"], cfg, 1, artifacts.run_dir("synthetic", "tema", 1), "d")
    return repo, params


@pytest.fixture
def repo(trained, monkeypatch):
    recommend._load.cache_clear()
    monkeypatch.chdir(trained[0])
    return trained


def a_test_user(ds: data.Dataset) -> pd.Series:
    test = ds.split("test")
    return test.iloc[0]


def test_top_k_is_the_models_own_ranking_with_the_tags_shared_with_the_history(repo):
    root, params = repo
    ds = data.load("synthetic", artifacts.prepared_dir("synthetic"))
    row = a_test_user(ds)
    table = recommend.top_k("synthetic", "tema", row["user"], k=7, params=params)
    assert list(table["rank"]) == list(range(1, 8)) and (table["domain"] == row["target_domain"]).all()  # the target's domain
    assert table["score"].is_monotonic_decreasing
    # independently: the checkpoint's scores for this history, ranked
    model = load_run(ds, "tema", params["model_params"]["tema"], TrainConfig.from_params(params), artifacts.run_dir("synthetic", "tema", 1))
    with torch.no_grad():
        scores = model.score([list(row["history"])], row["target_domain"])[0].numpy()
    start = ds.domain_range(row["target_domain"])[0]
    assert list(table["item_id"]) == [start + int(i) for i in np.argsort(-scores, kind="stable")[:7]]
    ids = np.load(artifacts.features_dir("synthetic") / "item_tag_ids.npy")
    tags_of = {i: [TAGS[t] for t in ids[i] if t >= 0] for i in range(len(ids))}
    history_tags = {t for i in row["history"] for t in tags_of[i]}
    for item, tags, shared in zip(table["item_id"], table["tags"], table["shared_tags"]):
        assert tags == tags_of[item] and shared == [t for t in tags if t in history_tags]
    assert table["is_target"].sum() == int(row["target"] in set(table["item_id"]))
    other = "A" if row["target_domain"] == "B" else "B"
    assert (recommend.top_k("synthetic", "tema", row["user"], domain=other, k=3, params=params)["domain"] == other).all()


def test_history_items_can_be_left_out(repo):
    root, params = repo
    ds = data.load("synthetic", artifacts.prepared_dir("synthetic"))
    row = a_test_user(ds)
    n = N_A if row["target_domain"] == "A" else N_B
    everything = recommend.top_k("synthetic", "tema", row["user"], k=n, params=params)
    assert len(everything) == n and everything["in_history"].sum() == sum(
        1 for i in set(row["history"]) if ds.items["domain"].iat[i] == row["target_domain"])
    left_out = recommend.top_k("synthetic", "tema", row["user"], k=5, params=params, exclude_history=True)
    assert not left_out["in_history"].any()
    assert list(left_out["item_id"]) == list(everything.loc[~everything["in_history"], "item_id"][:5])


def test_history_carries_the_attention_where_the_model_explains_itself(repo):
    root, params = repo
    ds = data.load("synthetic", artifacts.prepared_dir("synthetic"))
    row = a_test_user(ds)
    table = recommend.history("synthetic", "tema", row["user"], params=params)
    assert list(table["item_id"]) == list(row["history"])[-10:]  # the window the model reads (max_len 10)
    for key in ("self_attention", "tag_attention", "cross_attention"):
        assert table[key].sum() == pytest.approx(1.0, abs=1e-4), key


def test_mistakes_name_the_bad_value(repo):
    root, params = repo
    with pytest.raises(data.DataError, match=r"unknown user 'test:nobody' in synthetic; expected an example key of .*synthetic, e\.g\. \['u"):
        recommend.top_k("synthetic", "tema", "test:nobody", params=params)
    user = a_test_user(data.load("synthetic", artifacts.prepared_dir("synthetic")))["user"]
    with pytest.raises(config.ParamsError, match=r"domain: expected one of \['A', 'B'\].*got 'C'"):
        recommend.top_k("synthetic", "tema", user, domain="C", params=params)
    with pytest.raises(config.ParamsError, match=r"k: expected an integer >= 1, got 0"):
        recommend.top_k("synthetic", "tema", user, k=0, params=params)
    with pytest.raises(data.DataError, match=r"no finished run of sasrec \(seed 1\) on synthetic; trained there: \['tema'\]"):
        recommend.top_k("synthetic", "sasrec", user, params=params)
    with pytest.raises(config.ParamsError, match=r"unknown model 'sasrek'"):
        recommend.top_k("synthetic", "sasrek", user, params=params)


def test_the_cli_prints_a_table_or_json(repo, capsys, monkeypatch):
    root, params = repo
    monkeypatch.setattr(recommend.schema, "load", lambda: params)  # the test repository's params.yaml is empty
    user = a_test_user(data.load("synthetic", artifacts.prepared_dir("synthetic")))["user"]
    assert cli.main(["recommend", "synthetic", "tema", user, "-k", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:3] == ["rank", "item_id", "title"] and len(out) == 4
    assert cli.main(["recommend", "synthetic", "tema", user, "-k", "2", "--json"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["rank"] for r in records] == [1, 2] and {"shared_tags", "score", "title"} <= set(records[0])
    assert cli.main(["recommend", "synthetic", "tema", "test:nobody"]) == 2
    assert capsys.readouterr().err.startswith("tema: error: unknown user 'test:nobody'")


def test_nearest_items_stay_in_the_domain_and_leave_the_item_out(repo):
    by_text = recommend.nearest_items("synthetic", 3, k=5)
    assert len(by_text) == 5 and 3 not in set(by_text["item_id"]) and (by_text["item_id"] < N_A).all()
    text = np.load(artifacts.features_dir("synthetic") / "text.npy")
    unit = text / np.linalg.norm(text, axis=1, keepdims=True)
    expected = [i for i in np.argsort(-(unit[:N_A] @ unit[3]), kind="stable") if i != 3][:5]
    assert list(by_text["item_id"]) == expected
    by_tags = recommend.nearest_items("synthetic", N_A + 2, k=3, by="tags")
    assert (by_tags["item_id"] >= N_A).all() and by_tags["similarity"].iloc[0] == 1.0  # B items 6 apart share all tags
    near = recommend.nearest_tags("synthetic", "sweet", k=2)
    assert len(near) == 2 and "sweet" not in set(near["tag"])
    with pytest.raises(data.DataError, match=r"tag 'bitter' is not in synthetic's vocabulary"):
        recommend.nearest_tags("synthetic", "bitter")
    with pytest.raises(data.DataError, match=r"item 999999: expected an item id of synthetic"):
        recommend.nearest_items("synthetic", 999999)


@pytest.mark.slow
def test_the_exploration_notebook_runs_on_a_trained_run(repo, tmp_path):
    from tema.notebook import execute

    root, params = repo
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    user = a_test_user(data.load("synthetic", artifacts.prepared_dir("synthetic")))["user"]
    (root / "notebooks").mkdir(exist_ok=True)
    shutil.copy(ROOT / "notebooks" / "explore.ipynb", root / "notebooks" / "explore.ipynb")  # it finds the repository from where it runs
    out = tmp_path / "explore.ipynb"
    execute(str(root / "notebooks" / "explore.ipynb"), str(out), {"dataset": "synthetic", "model": "tema", "user": user, "k": 5})
    nb = json.loads(out.read_text())
    text = json.dumps([o for c in nb["cells"] if c["cell_type"] == "code" for o in c["outputs"]])
    assert "shared_tags" in text and "self_attention" in text and "similarity" in text
