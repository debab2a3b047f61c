"""One parameter schema for params.yaml: every bad key named with its value and what was expected, before any work."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import yaml
from conftest import describe_datasets

from tema import cli, config, schema


@pytest.fixture(scope="module")
def default(root) -> dict:
    params = config.load_params(root / "profiles" / "default.yaml")
    params["evaluations"], params["pages"] = config.evaluations(params), config.pages(params)
    return params


def errors_of(params: dict) -> list[str]:
    with pytest.raises(config.ParamsError) as caught:
        schema.validate(params)
    return str(caught.value).splitlines()


def with_change(params: dict, dotted: str, value) -> dict:
    out = copy.deepcopy(params)
    *path, last = dotted.split(".")
    node = out
    for part in path:
        node = node[part]
    if value is KeyError:
        del node[last]
    else:
        node[last] = value
    return out


def test_every_profile_passes(root):
    for path in sorted((root / "profiles").glob("*.yaml")):
        schema.validate(cli.profile_params(path.stem))
    schema.validate(config.load_params(root / "params.yaml"))


# (dotted key, bad value, what the one-line message must say after "params.yaml: ")
CASES = [
    ("model_params.sasrec.lr", -0.002, "model_params.sasrec.lr: expected a number > 0, got -0.002"),
    ("model_params.sasrec.lr", "fast", "model_params.sasrec.lr: expected a number > 0, got 'fast'"),
    ("model_params.tema.dropout", -0.1, "model_params.tema.dropout: expected a number >= 0 and < 1, got -0.1"),
    ("model_params.gru4rec.dim", 0, "model_params.gru4rec.dim: expected an integer >= 1, got 0"),
    ("model_params.sasrec.heads", 3, "model_params.sasrec.heads: expected a divisor of dim (64), got 3"),
    ("model_params.c2dsr.colour", 1, "model_params.c2dsr.colour: unknown key; c2dsr accepts ['blocks', 'dim'"),
    ("model_params.tema.tags", "bag", "model_params.tema.tags: expected one of ['weighted', 'mean', 'none'], got 'bag'"),
    ("model_params.tema-no-tags", {"tags": "weighted"}, "model_params.tema-no-tags.tags: this ablation fixes tags = 'none'"),
    # an ablation's entry holds what differs from its base's: heads 3 does not divide the dim of 64 it inherits
    ("model_params.tema-no-tags", {"heads": 3}, "model_params.tema-no-tags.heads: expected a divisor of dim (64), got 3"),
    ("model_params.tema-no-tags", {"colour": 1}, "model_params.tema-no-tags.colour: unknown key; tema-no-tags accepts"),
    ("model_params.tema.features", "food-kitchen", "model_params.tema.features: the trainer passes each dataset's features"),
    ("model_params.sasrec", KeyError, "model_params.sasrec: missing; expected the hyper-parameters of sasrec"),
    ("llm.timeout_s", "soon", "llm.timeout_s: expected a number > 0, got 'soon'"),
    ("llm.k", "five", "llm.k: expected an integer >= 1 and <= 20, got 'five'"),
    ("llm.k", 0, "llm.k: expected an integer >= 1 and <= 20, got 0"),
    ("llm.colour", "red", "llm.colour: unknown key; expected one of"),
    ("train.device", "cuda:7", "train.device: expected 'auto', 'cpu', 'mps', 'cuda' or 'cuda:<index>' of a device this machine has"),
    ("train.device", "gpu", "train.device: expected 'auto', 'cpu', 'mps', 'cuda' or 'cuda:<index>', got 'gpu'"),
    ("train.seeds", [], "train.seeds: expected a non-empty list without repeats of integers, got []"),
    ("train.loss", "softmax", "train.loss: expected one of ['full', 'sampled'], got 'softmax'"),
    ("prepare.subsample.train_users", -5, "prepare.subsample.train_users: expected null or an integer >= 1, got -5"),
    ("tags.limit_items", -3, "tags.limit_items: expected null or an integer >= 1, got -3"),
    ("tags.limit_items", 0, "tags.limit_items: expected null or an integer >= 1, got 0"),
    ("tags.limit_items", 40, "tags.out_dir: a limited run (tags.limit_items: 40) must not write to data/tags"),
    ("tags.refine.vocab_size", KeyError, "tags.refine.vocab_size: missing; expected an integer >= 1"),
    ("tags.refine.vocab", 10, "tags.refine.vocab: unknown key; expected one of"),
    ("tags.min_coverage", 1.5, "tags.min_coverage: expected a number >= 0 and <= 1, got 1.5"),
    ("tags.sources.food-kitchen.pass2.mode", "all", "tags.sources.food-kitchen.pass2.mode: expected one of ['map', 'fill', 'retag']"),
    ("tags.sources.art-office.file", KeyError, "tags.sources.art-office.file: missing; an external source names its tag file"),
    ("evaluate.reference", "gru5rec", "evaluate.reference: expected one of the models of table"),
    ("evaluate.n_candidates", "many", "evaluate.n_candidates: expected an integer >= 1, got 'many'"),
    ("datasets", ["food-kitchen", "mine"], "datasets: unknown dataset 'mine'; expected one of ['art-office', 'food-kitchen']"),
    ("models", ["sasrec", "sasrec"], "models: expected a non-empty list without repeats of non-empty strings"),
    ("models", ["sasrec", "bert4rec"], "models: unknown model 'bert4rec'; expected one of"),
    ("tune.space.lr", [0.001, -1], "tune.space.lr: expected a non-empty list without repeats of numbers > 0"),
    ("tune.model_space.tema.depth", [1, 2], "tune.model_space.tema.depth: unknown key; tema accepts"),
    ("colour", "red", "colour: unknown key; expected one of"),
]


@pytest.mark.parametrize("dotted,value,message", CASES, ids=[f"{c[0]}={c[1]!r}" for c in CASES])
def test_a_bad_parameter_is_named_with_its_value_and_what_was_expected(default, dotted, value, message):
    lines = errors_of(with_change(default, dotted, value))
    assert any(line.startswith("params.yaml: " + message) for line in lines), lines


def test_an_ablation_needs_no_entry_of_its_own_but_its_base_does(default):
    with_ablations = with_change(default, "models", [*default["models"], "tema-no-tags", "tema-no-text"])
    assert not {"tema-no-tags", "tema-no-text"} & set(with_ablations["model_params"])
    schema.validate(with_ablations)  # they inherit tema's
    assert errors_of(with_change(with_ablations, "model_params.tema", KeyError)) == [
        "params.yaml: model_params.tema: missing; expected the hyper-parameters of tema, which tema-no-tags, tema-no-text "
        "inherit (an empty mapping {} for none)"]
    only_ablation = with_change(with_change(default, "models", ["sasrec", "tema-no-tags"]), "evaluate.reference", "sasrec")
    only_ablation["evaluations"] = config.evaluations({**only_ablation, "evaluations": None})
    assert errors_of(with_change(only_ablation, "model_params.tema", KeyError)) == [
        "params.yaml: model_params.tema: missing; expected the hyper-parameters of tema, which tema-no-tags inherits "
        "(an empty mapping {} for none)"]


def test_every_problem_is_listed_one_line_each(default):
    params = with_change(with_change(default, "llm.k", 0), "train.patience", "long")
    lines = errors_of(params)
    assert lines == ["params.yaml: train.patience: expected an integer >= 1, got 'long'",
                     "params.yaml: llm.k: expected an integer >= 1 and <= 20, got 0"]


def test_a_limited_run_may_write_elsewhere(default):
    schema.validate(with_change(with_change(default, "tags.limit_items", 40), "tags.out_dir", "data/tags-smoke"))


def repo_with_profile(tmp_path, root, profile: dict):
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(root / name, tmp_path / name)
    shutil.copytree(root / "profiles", tmp_path / "profiles")
    (tmp_path / "profiles" / "mine.yaml").write_text(yaml.safe_dump(profile))
    describe_datasets(tmp_path)
    return tmp_path / "params.yaml"


def test_tema_profile_refuses_a_bad_profile_and_leaves_params_yaml_alone(tmp_path, root, monkeypatch, capsys):
    params_yaml = repo_with_profile(tmp_path, root, {"model_params": {"sasrec": {"lr": -0.002}}, "tags": {"limit_items": -3}})
    before = params_yaml.read_bytes()
    monkeypatch.chdir(tmp_path)
    assert cli.main(["profile", "mine"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == ["tema: error: params.yaml: tags.limit_items: expected null or an integer >= 1, got -3"]
    assert params_yaml.read_bytes() == before
    assert cli.main(["profile", "nosuch"]) == 2
    assert "unknown profile 'nosuch': profiles/nosuch.yaml not found" in capsys.readouterr().err
    assert params_yaml.read_bytes() == before


def test_the_cli_checks_params_before_any_work(tmp_path, root, monkeypatch, capsys):
    params_yaml = repo_with_profile(tmp_path, root, {})
    params = yaml.safe_load(params_yaml.read_text())
    params["llm"]["timeout_s"] = "soon"
    params_yaml.write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    # no raw data, no endpoint: the run would fail later; the schema must stop it first with one line
    assert cli.main(["tags", "generate", "food-kitchen", "--limit", "1"]) == 2
    assert capsys.readouterr().err.strip() == "tema: error: params.yaml: llm.timeout_s: expected a number > 0, got 'soon'"
    for bad in ("-3", "0", "x"):
        with pytest.raises(SystemExit):
            cli.main(["tags", "generate", "food-kitchen", "--limit", bad])
        assert "argument --limit: expected an integer >= 1" in capsys.readouterr().err


def trained_seed(tmp_path, monkeypatch, root):
    """A synthetic study with GRU4Rec's seed 1 trained: (params, its run folder, the folder's files)."""
    from test_training import study_root

    from tema import train

    params = study_root(tmp_path, monkeypatch, root, workers=1)
    params["train"]["seeds"] = [1]
    train.run("synthetic", "gru4rec", params)
    run_dir = tmp_path / "data" / "runs" / "synthetic" / "gru4rec" / "seed1"
    return params, run_dir, {p.name: p.read_bytes() for p in run_dir.iterdir()}


def test_a_bad_hyper_parameter_leaves_a_finished_run_alone(tmp_path, monkeypatch, root):
    from tema import train

    params, run_dir, before = trained_seed(tmp_path, monkeypatch, root)
    params["model_params"]["gru4rec"]["lr"] = -0.002
    with pytest.raises(config.ParamsError, match=r"model_params.gru4rec.lr: expected a number > 0, got -0.002"):
        train.run("synthetic", "gru4rec", params)
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before
    params["model_params"]["gru4rec"]["lr"] = 0.01
    again = train.run("synthetic", "gru4rec", params)  # reused, not retrained
    assert json.loads((run_dir / "run.json").read_text())["fingerprint"] == json.loads(before["run.json"])["fingerprint"]
    assert list(again["seed"]) == [1]


def test_a_run_that_fails_keeps_the_previous_run(tmp_path, monkeypatch, root):
    """Not only a bad parameter: any failure of a retraining run (an interrupt, a crash) keeps the old run's files."""
    import torch

    from tema import train

    params, run_dir, before = trained_seed(tmp_path, monkeypatch, root)
    params["model_params"]["gru4rec"]["lr"] = 0.02  # a valid change: this seed retrains

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("stopped mid-run")

    monkeypatch.setattr(torch.optim.Adam, "step", crash)
    with pytest.raises(KeyboardInterrupt):
        train.run("synthetic", "gru4rec", params)
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before
