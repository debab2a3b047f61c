"""The prepare stage checks its parameters before writing, and replaces its outputs as a whole or not at all."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
from conftest import ROOT, art_office_files, describe_datasets, food_kitchen_files, write_raw

from tema import config, prepare

# the tiny food-kitchen has 4 items in domain A and 5 in B
PARAMS = config.load_params(ROOT / "profiles" / "default.yaml")
PARAMS["datasets"] = ["food-kitchen", "art-office"]
PARAMS["evaluate"]["n_candidates"] = 2


def with_value(dotted: str, value) -> dict:
    params = copy.deepcopy(PARAMS)
    *path, last = dotted.split(".")
    node = params
    for part in path:
        node = node[part]
    node[last] = value
    return params


@pytest.fixture
def repo(tmp_path, monkeypatch) -> Path:
    """A repository root (dvc.yaml + params.yaml, so config.repo_root() finds it) with tiny raw datasets."""
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "params.yaml").write_text("{}\n")
    write_raw(tmp_path / "data" / "raw", "food-kitchen", food_kitchen_files())
    describe_datasets(tmp_path)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def prepared_listing(repo: Path) -> list[str]:
    return sorted(p.name for p in (repo / "data" / "prepared").iterdir())


def test_outputs_replace_the_old_folder_as_a_whole(repo):
    out = repo / "data" / "prepared" / "food-kitchen"
    stats = prepare.run("food-kitchen", PARAMS)
    assert stats["items"] == {"A": 4, "B": 5}
    first = snapshot(out)
    assert set(first) == {"items.parquet", "dataset.json", "sequences.parquet", "candidates.parquet", "stats.json",
                          "figures/history_lengths.png", "figures/item_popularity.png"}
    (out / "left-over.txt").write_text("from an older version")
    (repo / "data" / "prepared" / ".food-kitchen.tmp-999999").mkdir()  # what a killed run leaves
    prepare.run("food-kitchen", PARAMS)
    assert snapshot(out) == first  # the same bytes, and nothing of the old folder kept
    assert prepared_listing(repo) == ["food-kitchen"]


def test_largest_candidate_count_a_domain_allows(repo):
    """3 = the 4 items of domain A minus the target: the bound that tema.protocols.sample_candidates needs."""
    prepare.run("food-kitchen", with_value("evaluate.n_candidates", 3))


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("evaluate.n_candidates", 4, "params.yaml: 'evaluate.n_candidates' is 4, but domain A (Grocery & Gourmet Food) "
         "of food-kitchen has 4 items; expected fewer than 4"),
        ("evaluate.n_candidates", 0, "params.yaml: evaluate.n_candidates: expected an integer >= 1, got 0"),
        ("prepare.subsample.train_users", 0, "params.yaml: prepare.subsample.train_users: expected null or an integer >= 1, got 0"),
        ("prepare.subsample.eval_users", -3, "params.yaml: prepare.subsample.eval_users: expected null or an integer >= 1, got -3"),
        ("prepare.subsample.eval_users", "all", "params.yaml: prepare.subsample.eval_users: expected null or an integer >= 1, got 'all'"),
    ],
)
def test_bad_parameters_fail_before_anything_is_written(repo, key, value, message):
    out = repo / "data" / "prepared" / "food-kitchen"
    prepare.run("food-kitchen", PARAMS)
    before = snapshot(out)
    with pytest.raises(config.ParamsError) as err:
        prepare.run("food-kitchen", with_value(key, value))
    assert message in str(err.value)
    assert snapshot(out) == before
    assert prepared_listing(repo) == ["food-kitchen"]


def test_too_many_candidates_for_domain_b(repo):
    """art-office's domain B is the smaller one here: 3 items, so at most 2 candidates."""
    write_raw(repo / "data" / "raw", "art-office", art_office_files(**{
        "item_listA_F.csv": b"idBefore,item_title,idAfter,item_attribute\n" + b"".join(b"%d,t,%d,x\n" % (i, i) for i in range(5)),
        "item_listO_AA_F.csv": b"idBefore,item_title,idAfter,item_attribute\n0,p,5,y\n1,q,6,y\n2,r,7,y\n",
    }))
    with pytest.raises(config.ParamsError, match=r"'evaluate\.n_candidates' is 3, but domain B \(Office Products\) of art-office has 3 items"):
        prepare.run("art-office", with_value("evaluate.n_candidates", 3))
    assert not (repo / "data" / "prepared").exists()


def test_failure_while_writing_leaves_the_old_outputs(repo, monkeypatch):
    out = repo / "data" / "prepared" / "food-kitchen"
    prepare.run("food-kitchen", PARAMS)
    before = snapshot(out)
    written = []

    def fail(dataset, figures):  # by now the parquet files and stats.json of the new run are written
        written.extend(p.name for p in figures.parent.iterdir())
        raise RuntimeError("disk full")

    monkeypatch.setattr(prepare, "plot_statistics", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        prepare.run("food-kitchen", with_value("evaluate.candidate_seed", 7))
    assert {"sequences.parquet", "candidates.parquet", "stats.json"} <= set(written)
    assert snapshot(out) == before
    assert prepared_listing(repo) == ["food-kitchen"]  # no temporary folder left behind


def test_failure_on_first_run_leaves_nothing(repo, monkeypatch):
    monkeypatch.setattr(prepare, "statistics", lambda dataset: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        prepare.run("food-kitchen", PARAMS)
    assert prepared_listing(repo) == []
