"""Profiles (tema.profiles): overlays, the keys `tema profile` derives for dvc.yaml, and the checks made when a profile
is written rather than hours later: unknown datasets, the evaluation reference, models reading what a dataset lacks."""

from __future__ import annotations

import shutil

import pytest
import yaml
from conftest import ROOT, describe_datasets
from test_generic import SPEC, write

from tema import cli, config, profiles, schema


@pytest.fixture
def repo(tmp_path, monkeypatch):
    """The profiles and the benchmarks' descriptions, plus 'mine' (generic, titles, no tag source) and 'bare' (no text)."""
    shutil.copytree(ROOT / "profiles", tmp_path / "profiles")
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "params.yaml").write_text("{}\n")
    describe_datasets(tmp_path)
    write(tmp_path / "data" / "raw" / "mine")
    write(tmp_path / "data" / "raw" / "bare", {**SPEC, "items": {"file": "items.csv", "id": "item", "domain": "kind"}})
    monkeypatch.chdir(tmp_path)
    return tmp_path


def profile(repo, name: str, body: dict) -> None:
    (repo / "profiles" / f"{name}.yaml").write_text(yaml.safe_dump(body))


def errors(name: str) -> list[str]:
    with pytest.raises(config.ParamsError) as err:
        schema.validate(profiles.profile_params(name))
    return str(err.value).splitlines()


def test_a_profile_extends_another_and_the_derived_keys_follow_its_tables(repo):
    profile(repo, "mine-smoke", {"extends": "smoke", "datasets": ["mine"],
                                 "evaluations": {"mine": {"dataset": "mine", "models": ["popularity", "sasrec", "tema-no-tags"]}},
                                 "pages": {"mine": ["mine"]}})
    params = profiles.profile_params("mine-smoke")
    smoke = profiles.profile_params("smoke")
    assert params["train"] == smoke["train"] and params["prepare"] == smoke["prepare"]  # the smoke settings, for any dataset
    assert "extends" not in params and params["datasets"] == ["mine"]
    assert params["readers"] == {"mine": "tema/datasets/generic.py"}
    # the benchmarks keep their tags stages; mine has no tag source: none, written as such
    assert params["tag_datasets"] == {"mine": "tema/datasets/generic.py", "food-kitchen": "tema/datasets/food_kitchen.py",
                                      "art-office": "tema/datasets/art_office.py"}
    assert params["tags"]["sources"]["mine"] == {"kind": "none"}
    assert params["tags"]["sources"]["food-kitchen"] == smoke["tags"]["sources"]["food-kitchen"]
    assert params["runs"] == {f"mine-{m}": {"dataset": "mine", "model": m} for m in ["popularity", "sasrec", "tema-no-tags"]}
    schema.validate(params)
    assert config.reference(params, "mine") is None  # no TEMA in the table, none named: no paired tests


def test_runs_are_the_models_each_dataset_is_compared_on(repo):
    full = profiles.profile_params("full")
    assert set(full["runs"]) == {f"{d}-{m}" for d in ("food-kitchen", "art-office") for m in full["models"]}
    profile(repo, "two", {"datasets": ["food-kitchen", "mine"], "evaluations": {
        "food-kitchen": {"dataset": "food-kitchen", "models": ["sasrec", "tema"]},
        "mine": {"dataset": "mine", "models": ["gru4rec", "tema-no-tags"], "reference": "tema-no-tags"}}})
    params = profiles.profile_params("two")
    assert list(params["runs"]) == ["food-kitchen-sasrec", "food-kitchen-tema", "mine-gru4rec", "mine-tema-no-tags"]
    assert config.reference(params, "food-kitchen") == "tema" and config.reference(params, "mine") == "tema-no-tags"


def test_extends_in_a_circle_and_unknown_profiles_are_refused(repo):
    profile(repo, "a", {"extends": "b"})
    profile(repo, "b", {"extends": "a"})
    with pytest.raises(config.ParamsError, match=r"'extends' runs in a circle: a -> b -> a"):
        profiles.profile_params("a")
    profile(repo, "c", {"extends": "nosuch"})
    with pytest.raises(config.ParamsError, match=r"unknown profile 'nosuch'"):
        profiles.profile_params("c")


def test_an_unknown_dataset_is_refused_when_the_profile_is_written(repo, capsys):
    profile(repo, "typo", {"datasets": ["food-kitchn"]})
    before = (repo / "params.yaml").read_bytes()
    assert cli.main(["profile", "typo"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown dataset 'food-kitchn'" in err[0] and "tema dataset add <name> <folder>" in err[0]
    assert (repo / "params.yaml").read_bytes() == before


def test_the_reference_is_checked_against_every_table(repo):
    profile(repo, "ref", {"datasets": ["food-kitchen", "mine"], "evaluate": {"reference": "tema"}, "evaluations": {
        "food-kitchen": {"dataset": "food-kitchen", "models": ["sasrec", "tema"]},
        "mine": {"dataset": "mine", "models": ["sasrec", "tema-no-tags"]}}})
    assert errors("ref") == [
        "params.yaml: evaluate.reference: expected one of the models of table 'mine' ['sasrec', 'tema-no-tags'], or null (TEMA "
        "where a table has it; a table may name its own, evaluations.mine.reference), got 'tema'"]


def test_a_model_that_reads_what_the_dataset_lacks_is_refused_before_training(repo):
    profile(repo, "lacks", {"datasets": ["mine", "bare"], "models": ["sasrec", "sasrec-text", "tema"]})
    lines = errors("lacks")
    assert ("params.yaml: runs: tema reads tags, but mine has no tag source (tags.sources.mine.kind: none); give it one "
            "(docs/datasets.md) or leave tema out of mine's tables, or compare tema-no-tags") in lines
    assert ("params.yaml: runs: sasrec-text reads item text, but bare has none (its dataset.yaml names no title or text "
            "column); leave sasrec-text out of bare's tables") in lines
    assert any(line.startswith("params.yaml: runs: tema reads item text, but bare has none") and "compare tema-no-text" in line
               for line in lines)
    assert len(lines) == 4  # and tema's tags on bare; sasrec reads neither


def test_params_yaml_edited_past_its_derived_keys_is_refused(repo):
    params = profiles.profile_params("default")
    schema.validate(params)
    params["datasets"] = ["food-kitchen", "art-office"]  # as `dvc exp run -S` or a hand edit would, without `tema profile`
    with pytest.raises(config.ParamsError, match=r"readers: expected \{.*'art-office': 'tema/datasets/art_office.py'\}.*`tema profile <name>`"):
        schema.validate(params)
