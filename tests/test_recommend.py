"""Top-k for a user from a trained run (tema.recommend, `tema recommend`), the history with the attention, and the
neighbours of an item or a tag: checked against the loaded model's own scores and the features' arrays."""

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
from tema.evaluate import explain_users
from tema.models import registry
from tema.protocols import evaluate_split
from tema.training import TrainConfig, load_run, train_run

N_TAGS = 20
TAGS = [f"tag{t:02d}" for t in range(N_TAGS)]


def features() -> dict[str, np.ndarray]:
    """bank()'s text vectors, with 20 tags (two or three per item, every 7th item none), so that a history's tags
    cover only some of an item's and shared_tags is a real intersection."""
    arrays = bank()
    n = N_A + N_B
    ids = np.full((n, 3), -1, dtype=np.int32)
    ranks = np.zeros((n, 3), dtype=np.int16)
    for item in range(n):
        if item % 7 == 3:
            continue
        tags = [item % N_TAGS, (3 * item + 1) % N_TAGS] + ([(5 * item + 2) % N_TAGS] if item % 2 else [])
        tags = list(dict.fromkeys(tags))
        ids[item, : len(tags)], ranks[item, : len(tags)] = tags, range(1, len(tags) + 1)
    rng = np.random.default_rng(1)
    return {**arrays, "item_tag_ids": ids, "item_tag_ranks": ranks, "tag_vectors": rng.normal(size=(N_TAGS, 8)).astype(np.float32)}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A repository with the synthetic dataset prepared (titles 'item <id>'), its features and two trained runs
    (seed 1): TEMA, which explains itself, and Popularity, which has neither `explain` nor item vectors."""
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
        ds.items["title"] = [f"item {i}" for i in ds.items["item_id"]]
        data.save(ds, artifacts.prepared_dir("synthetic"))
        write_features(repo, "synthetic", features())
        pd.DataFrame({"tag_id": range(N_TAGS), "tag": TAGS, "in_A": True, "in_B": [t % 2 == 0 for t in range(N_TAGS)]}).to_csv(
            artifacts.features_dir("synthetic") / "tags.tsv", sep="\t", index=False)
        cfg = TrainConfig.from_params(params)
        for model in ("tema", "popularity"):
            train_run(ds, model, registry.hyper(params, model), cfg, 1, artifacts.run_dir("synthetic", model, 1), "d")
    return repo, params


@pytest.fixture
def repo(trained, monkeypatch):
    recommend._load.cache_clear()
    monkeypatch.chdir(trained[0])
    return trained


def prepared() -> data.Dataset:
    return data.load("synthetic", artifacts.prepared_dir("synthetic"))


def loaded(params, model: str = "tema"):
    """The run loaded independently of tema.recommend."""
    return load_run(prepared(), model, registry.hyper(params, model), TrainConfig.from_params(params), artifacts.run_dir("synthetic", model, 1))


def tags_of() -> dict[int, list[str]]:
    ids = features()["item_tag_ids"]
    return {i: [TAGS[t] for t in ids[i] if t >= 0] for i in range(len(ids))}


def test_top_k_is_the_models_own_ranking_with_the_tags_shared_with_the_history(repo):
    root, params = repo
    row = prepared().split("test").iloc[0]
    table = recommend.top_k("synthetic", "tema", row["user"], k=7, params=params)
    assert list(table["rank"]) == list(range(1, 8)) and (table["domain"] == row["target_domain"]).all()  # the target's domain
    assert table["score"].is_monotonic_decreasing and table["score"].iloc[0] > table["score"].iloc[-1]
    assert table.equals(recommend.top_k("synthetic", "tema", row["user"], domain=row["target_domain"], k=7, params=params))
    # independently: the checkpoint's scores for this history, ranked
    with torch.no_grad():
        scores = loaded(params).score([list(row["history"])], row["target_domain"])[0].numpy()
    start = prepared().domain_range(row["target_domain"])[0]
    expected = [start + int(i) for i in np.argsort(-scores, kind="stable")[:7]]
    assert list(table["item_id"]) == expected
    assert table["score"].tolist() == pytest.approx([float(scores[i - start]) for i in expected], rel=1e-6)
    assert list(table["title"]) == [f"item {i}" for i in expected]
    other = "A" if row["target_domain"] == "B" else "B"
    assert (recommend.top_k("synthetic", "tema", row["user"], domain=other, k=3, params=params)["domain"] == other).all()


def test_shared_tags_are_the_intersection_with_the_history_tags(repo):
    root, params = repo
    row = prepared().split("test").iloc[0]
    n = N_A if row["target_domain"] == "A" else N_B
    table = recommend.top_k("synthetic", "tema", row["user"], k=n, params=params)  # every item of the domain
    tags = tags_of()
    history_tags = {t for i in row["history"] for t in tags[i]}
    for item, item_tags, shared in zip(table["item_id"], table["tags"], table["shared_tags"]):
        assert item_tags == tags[item] and shared == [t for t in item_tags if t in history_tags]
    # not a vacuous check: some items share part of their tags, some none, some have no tags at all
    assert any(0 < len(s) < len(t) for s, t in zip(table["shared_tags"], table["tags"]))
    assert any(t and not s for s, t in zip(table["shared_tags"], table["tags"])) and any(not t for t in table["tags"])


def test_history_items_are_ranked_as_the_full_protocol_ranks_them_unless_left_out(repo):
    root, params = repo
    ds = prepared()
    test = ds.split("test")
    per_user = evaluate_split(loaded(params).score, test, {d: ds.domain_range(d) for d in data.DOMAINS}, None, 64, ("full",))
    rank_of = dict(zip(per_user["user"], per_user["rank"]))
    for _, row in test.head(5).iterrows():
        n = N_A if row["target_domain"] == "A" else N_B
        everything = recommend.top_k("synthetic", "tema", row["user"], k=n, params=params)
        assert len(everything) == n and everything["is_target"].sum() == 1
        assert everything.loc[everything["is_target"], "rank"].item() == rank_of[row["user"]]  # no ties among float scores
        in_domain = {i for i in row["history"] if ds.items["domain"].iat[i] == row["target_domain"]}
        assert set(everything.loc[everything["in_history"], "item_id"]) == in_domain
    row = test.iloc[0]
    left_out = recommend.top_k("synthetic", "tema", row["user"], k=5, params=params, exclude_history=True)
    assert not left_out["in_history"].any()
    n = N_A if row["target_domain"] == "A" else N_B
    everything = recommend.top_k("synthetic", "tema", row["user"], k=n, params=params)
    assert list(left_out["item_id"]) == list(everything.loc[~everything["in_history"], "item_id"][:5])
    assert len(recommend.top_k("synthetic", "tema", row["user"], k=n, params=params, exclude_history=True)) == n - everything["in_history"].sum()


def test_history_with_the_attention_where_the_model_explains_itself(repo):
    root, params = repo
    row = prepared().split("test").iloc[0]
    tags = tags_of()
    plain = recommend.history("synthetic", row["user"])  # no model: the whole history, no attention
    assert list(plain.columns) == ["item_id", "domain", "title", "tags"]
    assert list(plain["item_id"]) == list(row["history"]) and list(plain["tags"]) == [tags[i] for i in row["history"]]
    assert list(plain["domain"]) == ["A" if i < N_A else "B" for i in row["history"]]
    table = recommend.history("synthetic", row["user"], model="tema", params=params)
    assert list(table["item_id"]) == list(row["history"])[-10:]  # the window the model reads (max_len 10)
    why = loaded(params).explain(list(row["history"]), row["target_domain"])
    for key in ("self_attention", "tag_attention", "cross_attention"):
        assert table[key].tolist() == pytest.approx(why[key], abs=1e-6) and table[key].sum() == pytest.approx(1.0, abs=1e-4), key
    other = "A" if row["target_domain"] == "B" else "B"
    toward = recommend.history("synthetic", row["user"], model="tema", domain=other, params=params)
    assert toward["cross_attention"].tolist() == pytest.approx(loaded(params).explain(list(row["history"]), other)["cross_attention"], abs=1e-6)
    popular = recommend.history("synthetic", row["user"], model="popularity", params=params)  # no `explain`: no attention
    assert list(popular.columns) == ["item_id", "domain", "title", "tags"]


def test_mistakes_name_the_bad_value(repo):
    root, params = repo
    ds = prepared()
    user = ds.split("test")["user"].iat[0]
    with pytest.raises(data.DataError, match=r"unknown user 'test:nobody' in synthetic; expected an example key of its test split "
                       r".*e\.g\. \['u260', 'u261', 'u262'\]"):
        recommend.top_k("synthetic", "tema", "test:nobody", params=params)
    with pytest.raises(data.DataError, match=r"user 'u0' is a train example of synthetic, not a test one; pass split='train'"):
        recommend.top_k("synthetic", "tema", "u0", params=params)
    assert len(recommend.top_k("synthetic", "tema", "u0", k=2, params=params, split="train")) == 2
    with pytest.raises(config.ParamsError, match=r"split: expected one of \['train', 'valid', 'test'\], got 'tst'"):
        recommend.history("synthetic", user, split="tst")
    with pytest.raises(config.ParamsError, match=r"domain: expected one of \['A', 'B'\].*got 'C'"):
        recommend.top_k("synthetic", "tema", user, domain="C", params=params)
    for k in (0, -1, True, "3"):
        with pytest.raises(config.ParamsError, match=rf"k: expected an integer >= 1, got {k!r}"):
            recommend.top_k("synthetic", "tema", user, k=k, params=params)
    with pytest.raises(data.DataError, match=r"no finished run of sasrec \(seed 1\) on synthetic; trained there with seed 1: "
                       r"\['popularity', 'tema'\]"):
        recommend.top_k("synthetic", "sasrec", user, params=params)
    with pytest.raises(data.DataError, match=r"unknown dataset 'nosuch': no data/prepared/nosuch/; prepared here: \['synthetic'\]"):
        recommend.top_k("nosuch", "tema", user, params=params)
    with pytest.raises(data.DataError, match=r"no finished run of tema \(seed 7\)"):
        recommend.top_k("synthetic", "tema", user, seed=7, params=params)
    with pytest.raises(config.ParamsError, match=r"unknown model 'sasrek'; expected one of \["):
        recommend.top_k("synthetic", "sasrek", user, params=params)
    other = {**params, "model_params": {**params["model_params"], "tema": {**params["model_params"]["tema"], "dim": 32}}}
    with pytest.raises(data.DataError, match=r"the checkpoint does not fit tema as these params build it \(.*size mismatch"):
        recommend.top_k("synthetic", "tema", user, params=other)
    with pytest.raises(data.DataError, match=r"item 999999: expected an item id of synthetic, 0\.\.69"):
        recommend.nearest_items("synthetic", 999999)
    with pytest.raises(config.ParamsError, match=r"by: expected 'text', 'tags' or 'model', got 'title'"):
        recommend.nearest_items("synthetic", 1, by="title")
    with pytest.raises(config.ParamsError, match=r"by='model' .*name the model"):
        recommend.nearest_items("synthetic", 1, by="model")
    with pytest.raises(data.DataError, match=r"model 'popularity' has no item embedding"):
        recommend.nearest_items("synthetic", 1, by="model", model="popularity", params=params)
    with pytest.raises(data.DataError, match=r"item 3 of synthetic has no tags"):
        recommend.nearest_items("synthetic", 3, by="tags")
    with pytest.raises(data.DataError, match=r"tag 'bitter' is not in synthetic's vocabulary"):
        recommend.nearest_tags("synthetic", "bitter")
    with pytest.raises(config.ParamsError, match=r"k: expected an integer >= 1, got 0"):
        recommend.nearest_tags("synthetic", "tag01", k=0)


def test_the_cli_prints_a_table_or_json(repo, capsys, monkeypatch):
    root, params = repo
    monkeypatch.setattr(recommend.schema, "load", lambda: params)  # the test repository's params.yaml is empty
    row = prepared().split("test").iloc[0]
    expected = recommend.top_k("synthetic", "tema", row["user"], k=3, params=params)
    assert recommend.main(["synthetic", "tema", row["user"], "-k", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"synthetic / tema (seed 1) / user {row['user']}: top 3 of domain {row['target_domain']} ({row['target_domain'].lower()})"
    assert out[1].split() == ["rank", "item_id", "title", "score", "shared_tags", "mark"] and len(out) == 5
    for line, (_, item) in zip(out[2:], expected.iterrows()):
        assert line.split()[:4] == [str(item["rank"]), str(item["item_id"]), "item", str(item["item_id"])]
        assert f"{item['score']:.4f}" in line and ", ".join(item["shared_tags"]) in line
    other = "A" if row["target_domain"] == "B" else "B"
    assert cli.main(["recommend", "synthetic", "tema", row["user"], "-k", "2", "--json", "--domain", other]) == 0
    found = json.loads(capsys.readouterr().out)
    assert {k: found[k] for k in ("dataset", "model", "seed", "user", "split", "domain")} == {
        "dataset": "synthetic", "model": "tema", "seed": 1, "user": row["user"], "split": "test", "domain": other}
    assert found["items"] == recommend.top_k("synthetic", "tema", row["user"], other, 2, params=params).to_dict(orient="records")
    assert cli.main(["recommend", "synthetic", "tema", "test:nobody"]) == 2  # tema.cli's one line, no traceback
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("tema: error: unknown user 'test:nobody'")
    assert cli.main(["recommend", "synthetic", "tema", row["user"], "-k", "0"]) == 2
    assert capsys.readouterr().err == "tema: error: k: expected an integer >= 1, got 0\n"


@pytest.mark.parametrize("content", [b"", b"\x00garbage" * 100, None])
def test_a_damaged_checkpoint_is_one_line_from_the_cli(repo, capsys, monkeypatch, content):
    root, params = repo
    monkeypatch.setattr(recommend.schema, "load", lambda: params)
    path = artifacts.run_dir("synthetic", "tema", 1) / "model.pt"
    good = path.read_bytes()
    user = prepared().split("test").iloc[0]["user"]
    try:
        path.write_bytes(good[:-100] if content is None else content)  # truncated, empty, random bytes
        assert cli.main(["recommend", "synthetic", "tema", user]) == 2
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and err[0].startswith(f"tema: error: {path}: not loaded: model.pt does not match the SHA-256")
        assert err[0].endswith("dvc repro train@synthetic-tema")
    finally:
        path.write_bytes(good)
        recommend._load.cache_clear()
    assert cli.main(["recommend", "synthetic", "tema", user]) == 0


def test_nearest_items_stay_in_the_domain_and_leave_the_item_out(repo):
    root, params = repo
    by_text = recommend.nearest_items("synthetic", 4, k=5)
    assert len(by_text) == 5 and 4 not in set(by_text["item_id"]) and (by_text["item_id"] < N_A).all() and (by_text["domain"] == "A").all()
    text = np.load(artifacts.features_dir("synthetic") / "text.npy")
    unit = text / np.linalg.norm(text, axis=1, keepdims=True)
    assert list(by_text["item_id"]) == [i for i in np.argsort(-(unit[:N_A] @ unit[4]), kind="stable") if i != 4][:5]
    assert by_text["similarity"].is_monotonic_decreasing and list(by_text["tags"]) == [tags_of()[i] for i in by_text["item_id"]]
    item = N_A + 5
    by_tags = recommend.nearest_items("synthetic", item, k=N_B, by="tags")  # k larger than the rest of the domain: all of it
    assert len(by_tags) == N_B - 1 and item not in set(by_tags["item_id"]) and (by_tags["item_id"] >= N_A).all()
    tags, mine = tags_of(), set(tags_of()[item])
    for other, similarity in zip(by_tags["item_id"], by_tags["similarity"]):
        assert similarity == pytest.approx(len(mine & set(tags[other])) / len(mine | set(tags[other])))
    assert by_tags["similarity"].is_monotonic_decreasing
    by_model = recommend.nearest_items("synthetic", item, k=4, by="model", model="tema", params=params)
    with torch.no_grad():
        vectors = loaded(params).items(torch.arange(N_A + 1, N_A + N_B + 1)).double().numpy()
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    cosine = vectors @ vectors[item - N_A]
    assert list(by_model["item_id"]) == [N_A + int(i) for i in np.argsort(-cosine, kind="stable") if N_A + i != item][:4]


def test_nearest_tags_by_their_vectors(repo):
    near = recommend.nearest_tags("synthetic", "tag04", k=3)
    vectors = features()["tag_vectors"].astype(np.float64)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    expected = [t for t in np.argsort(-(vectors @ vectors[4]), kind="stable") if t != 4][:3]
    assert list(near["tag"]) == [TAGS[t] for t in expected] and near["similarity"].is_monotonic_decreasing
    assert list(near["domains"]) == ["A+B" if t % 2 == 0 else "A" for t in expected]


def test_the_reports_explanations_describe_items_as_top_k_does(repo):
    """tema.evaluate.explain_users builds its items with recommend.item_record: its top items are top_k's."""
    root, params = repo
    explained = explain_users("synthetic", params, "tema", n_users=3, top=4)
    assert len(explained["users"]) == 3
    for user in explained["users"]:
        table = recommend.top_k("synthetic", "tema", user["user"], k=4, params=params)
        assert [r["item"] for r in user["recommended"]] == list(table["item_id"])
        assert [r["tags"] for r in user["recommended"]] == list(table["tags"])
        assert [r["title"] for r in user["recommended"]] == list(table["title"])
        assert user["target"]["title"] == f"item {user['target']['item']}" and user["target"]["tags"] == tags_of()[user["target"]["item"]]


def test_the_exploration_notebook_runs_on_a_trained_run(repo, tmp_path):
    """notebooks/explore.ipynb top to bottom with papermill, with its default user (the first mixed test user)."""
    from tema.notebook import execute

    root, params = repo
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    (root / "notebooks").mkdir(exist_ok=True)
    shutil.copy(ROOT / "notebooks" / "explore.ipynb", root / "notebooks" / "explore.ipynb")  # it finds the repository from where it runs
    out = tmp_path / "explore.ipynb"
    execute(str(root / "notebooks" / "explore.ipynb"), str(out), {"dataset": "synthetic", "model": "tema", "user": None, "k": 5})
    nb = json.loads(out.read_text())
    outputs = [o for c in nb["cells"] if c["cell_type"] == "code" for o in c["outputs"]]
    assert not [o for o in outputs if o["output_type"] == "error"]
    text = json.dumps(outputs)
    assert f"synthetic, tema, user {recommend.mixed_user('synthetic')}" in text
    for shown in ("shared_tags", "self_attention", "cross_attention", "similarity", "domain A", "domain B", "tags nearest to"):
        assert shown in text, shown
