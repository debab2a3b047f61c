"""Profiles (tema.profiles): overlays, the keys `tema profile` derives for dvc.yaml, and the checks made when a profile
is written rather than hours later: unknown datasets, the evaluation reference, models reading what a dataset lacks."""

from __future__ import annotations

import contextlib
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
    # smoke serves these tests as a second profile written in place; its workspace has tests of its own
    # (test_a_test_scale_profile_is_written_into_its_workspace, tests/test_pipeline.py)
    smoke = tmp_path / "profiles" / "smoke.yaml"
    smoke.write_text("".join(line for line in smoke.read_text().splitlines(keepends=True) if not line.startswith("workspace:")))
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
    # only mine's tags stage runs (the benchmarks' sources are not the profile's datasets); mine has no tag source:
    # none, written as such
    assert params["tag_datasets"] == {"mine": "tema/datasets/generic.py"}
    assert params["tags"]["sources"]["mine"] == {"kind": "none"}
    assert params["tags"]["sources"]["food-kitchen"] == smoke["tags"]["sources"]["food-kitchen"]
    assert params["runs"] == {f"mine-{m}": {"dataset": "mine", "model": m} for m in ["popularity", "sasrec", "tema-no-tags"]}
    schema.validate(params)
    assert config.reference(params, "mine") is None  # no TEMA in the table, none named: no paired tests


def test_a_profile_runs_only_the_tags_stages_of_its_own_datasets(repo):
    """A profile for a new dataset that sets llm.model must not re-run food-kitchen's tags stage (which would ask the
    new endpoint for food-kitchen's items and append them to its committed cache)."""
    profile(repo, "mine-llm", {"datasets": ["mine"], "models": ["popularity"], "llm": {"model": "another-model"},
                               "tags": {"other_sources": {"food-kitchen": {"small": {"kind": "none"}}}}})
    params = profiles.profile_params("mine-llm")
    assert set(params["tag_datasets"]) == {"mine"} and params["tag_sources"] == {}
    assert set(profiles.profile_params("default")["tag_datasets"]) == {"food-kitchen"}
    assert set(profiles.profile_params("full")["tag_datasets"]) == {"food-kitchen", "art-office"}


@pytest.mark.parametrize("fault", ["full disk", "kill"])
def test_tema_profile_writes_params_yaml_whole_or_not_at_all(repo, monkeypatch, capsys, fault):
    import errno
    import os

    profiles.apply_profile("smoke")
    edited = (repo / "params.yaml").read_text().replace("max_epochs: 2", "max_epochs: 3")  # a hand edit to keep
    (repo / "params.yaml").write_text(edited)
    before = {p: (repo / p).read_bytes() for p in ("params.yaml", profiles.RECORD)}
    real_replace, real_fsync = os.replace, os.fsync
    calls = []
    if fault == "full disk":
        def failing(fd):  # the second file's data does not fit
            calls.append(fd)
            if len(calls) == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(os, "fsync", failing)
        with pytest.raises(OSError, match=r"could not write it \(No space left on device\)"):
            profiles.apply_profile("default")
        calls.clear()
        capsys.readouterr()
        assert cli.main(["profile", "default"]) == 2  # the command: one line naming the file, no traceback
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and err[0].startswith("tema: error: ") and "(No space left on device)" in err[0]
    else:
        def killed(*args):
            raise KeyboardInterrupt
        monkeypatch.setattr(os, "replace", killed)
        with pytest.raises(KeyboardInterrupt):
            profiles.apply_profile("default")
    monkeypatch.setattr(os, "replace", real_replace)
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert {p: (repo / p).read_bytes() for p in before} == before
    assert sorted(p.name for p in repo.iterdir() if ".tmp" in p.name) == []
    written = profiles.apply_profile("smoke")  # the hand edit is still there to keep
    assert written.kept == {"train.max_epochs": 3}


def test_a_test_scale_profile_is_written_into_its_workspace(repo, capsys):
    shutil.copy2(ROOT / "profiles" / "smoke.yaml", repo / "profiles" / "smoke.yaml")  # with its workspace
    (repo / "profiles" / "mine-smoke.yaml").write_text("extends: smoke\ndatasets: [mine]\nmodels: [popularity]\n")
    (repo / "tema").mkdir()
    (repo / "tema" / "code.py").write_text("x = 1\n")
    assert cli.main(["profile", "default"]) == 0
    before = {p: p.read_bytes() for p in sorted(repo.rglob("*")) if p.is_file()}
    capsys.readouterr()
    assert cli.main(["profile", "mine-smoke"]) == 0
    out = capsys.readouterr().out.splitlines()
    workspace = repo / "build" / "smoke"
    assert out == [f"wrote {workspace / 'params.yaml'}",
                   "profile mine-smoke runs in its own workspace, build/smoke/ (the repository's params.yaml, dvc.lock, "
                   "reports/ and data/ stay as they are); run it with: cd build/smoke && dvc repro"]
    assert {p: p.read_bytes() for p in sorted(repo.rglob("*")) if p.is_file() and "build" not in p.parts} == before
    assert config.load_params(workspace / "params.yaml") == profiles.profile_params("mine-smoke")
    assert (workspace / "data/raw/mine/dataset.yaml").read_bytes() == (repo / "data/raw/mine/dataset.yaml").read_bytes()
    assert "no_scm = true" in (workspace / ".dvc" / "config").read_text()
    (repo / "tema" / "code.py").write_text("x = 2\n")  # a code edit reaches the workspace with the next tema profile
    (repo / "tema" / "gone.py").write_text("")
    assert cli.main(["profile", "smoke"]) == 0
    (repo / "tema" / "gone.py").unlink()
    assert cli.main(["profile", "smoke"]) == 0
    assert (workspace / "tema" / "code.py").read_text() == "x = 2\n" and not (workspace / "tema" / "gone.py").exists()
    (repo / "profiles" / "mine-smoke.yaml").unlink()  # profiles/ mirrors the repository's: it goes from the workspace
    assert cli.main(["profile", "smoke"]) == 0 and not (workspace / "profiles" / "mine-smoke.yaml").exists()
    (repo / "profiles" / "mine-smoke.yaml").write_text("extends: smoke\ndatasets: [mine]\nmodels: [popularity]\n")
    assert cli.main(["profile", "smoke"]) == 0
    with contextlib.chdir(workspace):  # inside the workspace, tema profile writes the workspace's params.yaml
        assert cli.main(["profile", "mine-smoke"]) == 0
    assert config.load_params(workspace / "params.yaml")["datasets"] == ["mine"]
    (repo / "profiles" / "outside.yaml").write_text("extends: default\nworkspace: ../elsewhere\n")
    assert cli.main(["profile", "outside"]) == 2
    assert "profiles/outside.yaml: 'workspace' must be a folder under build/" in capsys.readouterr().err


def test_runs_are_the_models_each_dataset_is_compared_on(repo):
    full = profiles.profile_params("full")
    # the tag-noise experiment and the tagger comparison run on art-office only
    noise = {"tema-tag-noise-50", "tema-tag-noise-100", "tema-embedded-tags"}
    assert set(full["runs"]) == {f"{d}-{m}" for d in ("food-kitchen", "art-office") for m in full["models"]
                                 if d == "art-office" or m not in noise}
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


# -- edits of params.yaml (by hand, `dvc exp run -S`) over `tema profile` ------------------------------------------

def dvc_set(repo, *overrides: str) -> None:
    """What `dvc exp run -S` does to params.yaml before it runs (DVC's own code: Hydra overrides, comments kept)."""
    from dvc.utils.hydra import apply_overrides

    apply_overrides(repo / "params.yaml", list(overrides))


def written(repo) -> tuple[bytes, bytes]:
    return (repo / "params.yaml").read_bytes(), (repo / profiles.RECORD).read_bytes()


def old_bytes(name: str) -> bytes:
    """params.yaml as `tema profile` wrote it before edits were kept: the header and the profile's values."""
    return (profiles.header(name, {}) + yaml.safe_dump(profiles.profile_params(name), sort_keys=False)).encode()


def test_without_edits_params_yaml_is_the_profile_byte_for_byte(repo, capsys):
    assert cli.main(["profile", "default"]) == 0
    assert capsys.readouterr().out.splitlines() == [f"wrote {repo / 'params.yaml'}"]
    assert (repo / "params.yaml").read_bytes() == old_bytes("default") == (ROOT / "params.yaml").read_bytes()
    first = written(repo)
    assert cli.main(["profile", "default"]) == 0 and written(repo) == first  # idempotent, the record too
    assert cli.main(["profile", "smoke"]) == 0 and (repo / "params.yaml").read_bytes() == old_bytes("smoke")
    assert cli.main(["profile", "default"]) == 0 and written(repo) == first  # switching back: no edit in between


def test_a_dvc_exp_run_set_survives_tema_profile_and_reset_drops_it(repo, capsys):
    cli.main(["profile", "default"])
    pure = written(repo)
    dvc_set(repo, "train.max_epochs=5", "+model_params.tema-no-tags={dim: 32}")
    capsys.readouterr()
    assert cli.main(["profile", "default"]) == 0
    assert capsys.readouterr().out.splitlines()[:2] == [
        "kept train.max_epochs=5 from params.yaml (set by hand or dvc exp run -S); --reset drops it",
        "kept model_params.tema-no-tags={dim: 32} from params.yaml (set by hand or dvc exp run -S); --reset drops it"]
    params = config.load_params(repo / "params.yaml")
    expected = profiles.profile_params("default")
    expected["train"]["max_epochs"] = 5
    expected["model_params"]["tema-no-tags"] = {"dim": 32}
    assert params == expected
    assert "# drops them): train.max_epochs=5, model_params.tema-no-tags={dim: 32}" in (repo / "params.yaml").read_text()
    # idempotent: the kept values stay kept (they are not edits any more, but overrides), byte for byte
    kept = written(repo)
    assert cli.main(["profile", "default"]) == 0 and written(repo) == kept
    # over another profile too: smoke's 2 epochs give way to the edit
    assert cli.main(["profile", "smoke"]) == 0
    smoke = config.load_params(repo / "params.yaml")
    assert smoke["train"]["max_epochs"] == 5 and smoke["train"]["seeds"] == [1, 2]
    capsys.readouterr()
    assert cli.main(["profile", "default", "--reset"]) == 0
    assert "kept" not in capsys.readouterr().out
    assert written(repo) == pure


def test_an_edit_set_back_to_the_profile_value_is_no_override(repo, capsys):
    cli.main(["profile", "default"])
    pure = written(repo)
    dvc_set(repo, "train.max_epochs=5")
    cli.main(["profile", "default"])
    dvc_set(repo, "train.max_epochs=40")
    capsys.readouterr()
    assert cli.main(["profile", "default"]) == 0
    assert "kept" not in capsys.readouterr().out and written(repo) == pure


def test_a_change_of_the_profile_is_not_taken_for_an_edit(repo, capsys):
    """The record holds what was written, so a profile edited since (the way to change a value for good) wins over
    the old value, while params.yaml's own edit is kept."""
    cli.main(["profile", "default"])
    dvc_set(repo, "train.max_epochs=5")
    text = (repo / "profiles" / "default.yaml").read_text()
    assert "  patience: 4 " in text
    (repo / "profiles" / "default.yaml").write_text(text.replace("  patience: 4 ", "  patience: 7 "))
    capsys.readouterr()
    assert cli.main(["profile", "default"]) == 0
    assert [line for line in capsys.readouterr().out.splitlines() if line.startswith("kept")] == [
        "kept train.max_epochs=5 from params.yaml (set by hand or dvc exp run -S); --reset drops it"]
    train = config.load_params(repo / "params.yaml")["train"]
    assert train["max_epochs"] == 5 and train["patience"] == 7


def test_an_override_the_new_profile_has_no_place_for_is_an_error_naming_it(repo, capsys):
    profile(repo, "with-x", {"model_params": {"tema-no-tags": {"dim": 32}}})
    cli.main(["profile", "with-x"])
    dvc_set(repo, "model_params.tema-no-tags.dim=16")
    before = written(repo)
    capsys.readouterr()
    assert cli.main(["profile", "default"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == ["tema: error: params.yaml: model_params.tema-no-tags.dim=16 was set in params.yaml since `tema profile "
                   "with-x` wrote it, but profile default has no model_params.tema-no-tags to keep it in; drop it with "
                   "`tema profile default --reset`"]
    assert written(repo) == before  # nothing written
    assert cli.main(["profile", "with-x"]) == 0  # where it has a place, it is kept
    assert config.load_params(repo / "params.yaml")["model_params"]["tema-no-tags"] == {"dim": 16}
    assert cli.main(["profile", "default", "--reset"]) == 0 and (repo / "params.yaml").read_bytes() == old_bytes("default")


def test_an_override_that_no_longer_validates_or_a_removed_key_is_an_error_naming_it(repo, capsys):
    cli.main(["profile", "default"])
    dvc_set(repo, "train.max_epochs=-1")
    before = written(repo)
    capsys.readouterr()
    assert cli.main(["profile", "smoke"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("tema: error: params.yaml: the values kept from an edited params.yaml (train.max_epochs=-1) "
                             "do not fit profile smoke")
    assert err[1:] == ["tema: error: params.yaml: train.max_epochs: expected an integer >= 1, got -1"]
    assert written(repo) == before
    cli.main(["profile", "default", "--reset"])
    dvc_set(repo, "~train.patience")
    assert cli.main(["profile", "default"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("tema: error: params.yaml: train.patience was removed since `tema profile default`")


def test_edits_of_derived_keys_are_recomputed_and_said_so(repo, capsys):
    cli.main(["profile", "default"])
    pure = written(repo)
    dvc_set(repo, "runs.food-kitchen-tema.model=sasrec")
    capsys.readouterr()
    assert cli.main(["profile", "default"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("dropped the edit of runs.food-kitchen-tema.model in params.yaml: `tema profile` derives it")
    assert written(repo) == pure
    # an edit of what they derive from is kept, and they follow it
    dvc_set(repo, "datasets=[food-kitchen, mine]", "models=[popularity, sasrec]")
    assert cli.main(["profile", "default"]) == 0
    params = config.load_params(repo / "params.yaml")
    assert list(params["runs"]) == [f"{d}-{m}" for d in ("food-kitchen", "mine") for m in ("popularity", "sasrec")]
    assert params["tags"]["sources"]["mine"] == {"kind": "none"}
    assert profiles.differences(params, profiles.profile_params("default"))[0][:2] == [
        (("datasets",), ["food-kitchen", "mine"]), (("models",), ["popularity", "sasrec"])]


def test_a_params_yaml_without_a_record_is_compared_with_the_profile_its_header_names(repo, capsys):
    """A params.yaml written before the record existed (or a record of another profile than params.yaml's header, left
    by an older tema): the profile the header names, as it reads now, stands in for what was written."""
    (repo / "params.yaml").write_bytes(old_bytes("smoke"))
    dvc_set(repo, "train.max_epochs=5")
    assert cli.main(["profile", "default"]) == 0
    assert capsys.readouterr().out.startswith("kept train.max_epochs=5 from params.yaml")
    (repo / "params.yaml").write_bytes(old_bytes("smoke"))  # the record says default (with the override): stale
    assert cli.main(["profile", "smoke"]) == 0
    assert "kept" not in capsys.readouterr().out and (repo / "params.yaml").read_bytes() == old_bytes("smoke")


def test_a_dataset_has_named_tag_sources_side_by_side_and_models_choose_one(repo):
    two = {"extends": "full", "tags": {"sources": {"art-office": {"name": "external-large"}},
                                       "other_sources": {"art-office": {"embedded": {"kind": "llm"}}}},
           "evaluations": {"art-office-taggers": {"dataset": "art-office",
                                                  "models": ["tema", "tema-embedded-tags", "tema-no-tags", "sasrec-text"]}},
           "pages": {"full": ["art-office-taggers"]}}
    profile(repo, "taggers", two)
    params = profiles.profile_params("taggers")
    schema.validate(params)
    assert params["tag_sources"] == {"art-office-embedded": {"dataset": "art-office", "source": "embedded",
                                                             "reader": "tema/datasets/art_office.py"}}
    assert config.source_names(params, "art-office") == ["external-large", "embedded"]
    assert config.tags_dir(params, "art-office", "embedded").relative_to(repo).as_posix() == "data/tags/art-office/embedded"
    assert config.tags_dir(params, "art-office", "external-large") == config.tags_dir(params, "art-office")
    assert "art-office-tema-embedded-tags" in params["runs"]
    assert profiles.profile_params("default")["tag_sources"] == {}  # no further source: no such stage
    # the full profile tags art-office a second time, with the embedded model, and compares the two taggers
    full = profiles.profile_params("full")
    assert full["tag_sources"] == {"art-office-embedded": {"dataset": "art-office", "source": "embedded",
                                                           "reader": "tema/datasets/art_office.py"}}
    assert config.source_names(full, "art-office") == ["external-large", "embedded"]  # both named in its tables
    assert full["evaluations"]["art-office-taggers"]["models"] == ["tema", "tema-embedded-tags", "tema-no-tags", "sasrec-text"]
    assert "art-office-taggers" in full["pages"]["full"] and "food-kitchen-tema-embedded-tags" not in full["runs"]
    # a model that names a source its dataset lacks, and a bad source name, are refused when the profile is written
    profile(repo, "lacking", {**two, "tags": {"other_sources": {"art-office": {"Big Model": {"kind": "llm"}}}}})
    found = errors("lacking")
    assert any("tags.other_sources.art-office.Big Model: expected a name of lower-case" in e for e in found), found
    profile(repo, "lacking", {**two, "extends": "art-office", "tags": {"other_sources": {}}})  # full has the source
    found = errors("lacking")
    assert any("tema-embedded-tags reads the tags of source 'embedded' (tags_from), but art-office's tag sources are "
               "['external-large']" in e for e in found), found
