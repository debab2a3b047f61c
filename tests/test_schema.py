"""One parameter schema for params.yaml: every bad key named with its value and what was expected, before any work."""

from __future__ import annotations

import copy
import json
import math
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
    ("train.seeds", [], "train.seeds: expected a non-empty list without repeats of integers >= 0 and <= 4294967295, got []"),
    # numpy's seeds (np.random.seed in training, default_rng in prepare, tune and the tag noise): 0..2^32-1
    ("train.seeds", [1, 2**32], "train.seeds: expected a non-empty list without repeats of integers >= 0 and <= 4294967295, "
                                "got [1, 4294967296]"),
    ("train.seeds", [-1], "train.seeds: expected a non-empty list without repeats of integers >= 0 and <= 4294967295, got [-1]"),
    ("prepare.seed", -1, "prepare.seed: expected an integer >= 0 and <= 4294967295, got -1"),
    ("evaluate.candidate_seed", 2**32, "evaluate.candidate_seed: expected an integer >= 0 and <= 4294967295, got 4294967296"),
    ("tune.seed", -7, "tune.seed: expected an integer >= 0 and <= 4294967295, got -7"),
    ("model_params.tema.tag_noise_seed", -1, "model_params.tema.tag_noise_seed: expected an integer >= 0 and <= 4294967295"),
    ("train.loss", "softmax", "train.loss: expected one of ['full', 'sampled'], got 'softmax'"),
    ("prepare.subsample.train_users", -5, "prepare.subsample.train_users: expected null or an integer >= 1, got -5"),
    ("tags.limit_items", -3, "tags.limit_items: expected null or an integer >= 1, got -3"),
    ("tags.limit_items", 0, "tags.limit_items: expected null or an integer >= 1, got 0"),
    ("tags.limit_items", 40, "tags.out_dir: a limited run (tags.limit_items: 40) must not write to data/tags"),
    ("tags.refine.vocab_size", KeyError, "tags.refine.vocab_size: missing; expected an integer >= 1"),
    ("tags.refine.vocab", 10, "tags.refine.vocab: unknown key; expected one of"),
    ("tags.min_coverage", 1.5, "tags.min_coverage: expected a number >= 0 and <= 1, got 1.5"),
    # NaN compares false with every bound: it passed any range (a coverage of 6 in 40 items replaced good tags)
    ("tags.min_coverage", math.nan, "tags.min_coverage: expected a finite number >= 0 and <= 1, got nan"),
    ("llm.backoff_s", math.nan, "llm.backoff_s: expected a finite number >= 0, got nan"),
    ("llm.backoff_s", math.inf, "llm.backoff_s: expected a finite number >= 0, got inf"),
    ("llm.timeout_s", -math.inf, "llm.timeout_s: expected a finite number > 0, got -inf"),
    ("model_params.sasrec.lr", math.inf, "model_params.sasrec.lr: expected a finite number > 0, got inf"),
    ("model_params.tema.dropout", math.nan, "model_params.tema.dropout: expected a finite number >= 0 and < 1, got nan"),
    ("tune.space.lr", [0.001, math.nan], "tune.space.lr: expected a non-empty list without repeats of numbers > 0"),
    # the tags stage writes only inside the repository (what DVC tracks)
    ("tags.out_dir", "/tmp/tags", "tags.out_dir: expected a folder inside the repository, relative to its root (e.g. "
                                  "data/tags-smoke), got '/tmp/tags'"),
    ("tags.out_dir", "../tags", "tags.out_dir: expected a folder inside the repository, relative to its root"),
    ("tags.out_dir", "data/../../tags", "tags.out_dir: expected a folder inside the repository, relative to its root"),
    ("tags.out_dir", "~/tags", "tags.out_dir: expected a folder inside the repository, relative to its root"),
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
    for same in ("data/tags/", "./data/tags", "data/x/../tags"):  # the full-data tags' folder, however it is written
        limited = with_change(with_change(default, "tags.limit_items", 40), "tags.out_dir", same)
        assert errors_of(limited)[0].startswith("params.yaml: tags.out_dir: a limited run (tags.limit_items: 40) must not write")


def test_every_float_parameter_refuses_nan_and_infinity(default):
    """At the number rule, not per key: every rule it makes, whatever its bounds, and the llm settings without a rule of
    their own (their type's rule, from tema.tagging.Settings' defaults)."""
    for rule in (schema.number(), schema.number(0), schema.number(0, 1, low_open=True), schema.number(-2, 2, high_open=True)):
        for bad in (math.nan, math.inf, -math.inf, float("nan")):
            assert rule(bad) is not None and "finite" in rule(bad)
        assert rule(0.5) is None
    floats = [name for name, key in schema.llm_section().items() if not isinstance(key.rule, dict) and key.rule(0.5) is None]
    assert {"temperature", "timeout_s", "backoff_s", "max_retry_after_s"} <= set(floats)
    assert [name for name in floats if schema.llm_section()[name].rule(math.nan) is None] == []
    for name, rule in schema.HYPER_RULES.items():
        assert rule(math.nan) is not None and rule(math.inf) is not None, name


def test_tags_out_dir_may_not_leave_the_repository_through_a_link(tmp_path, monkeypatch):
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "params.yaml").write_text("{}\n")
    (tmp_path / "data").mkdir()
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    outside.mkdir()
    (tmp_path / "data" / "elsewhere").symlink_to(outside, target_is_directory=True)
    (tmp_path / "data" / "inside").symlink_to(tmp_path / "data", target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    assert schema.repo_folder("data/tags-smoke") is None and schema.repo_folder("data/inside/tags") is None
    problem = schema.repo_folder("data/elsewhere/tags")
    assert problem == (f"a folder inside the repository, relative to its root (e.g. data/tags-smoke); it resolves to "
                       f"{(outside / 'tags').resolve()}")


DUPLICATED = """\
datasets: [food-kitchen]
llm:
  model: a-model
  k: 5
train:
  max_epochs: 3
llm:
  k: 8
"""


def test_a_key_given_twice_is_refused_in_params_yaml_and_profiles(tmp_path, root, monkeypatch, capsys):
    """The last one would win: a second `llm:` block reset every other llm key. DVC refuses such a file; so does tema,
    at any nesting level, naming the file, the key and its line."""
    path = tmp_path / "params.yaml"
    path.write_text(DUPLICATED)
    with pytest.raises(config.ParamsError) as caught:
        config.load_params(path)
    assert str(caught.value) == (f"{path}:7: duplicate key 'llm' (first at line 2); expected each key once in a mapping (YAML "
                                 "would keep the last one silently; DVC refuses such a file)")
    path.write_text("train:\n  max_epochs: 3\n  patience: 2\n  max_epochs: 5\n")
    with pytest.raises(config.ParamsError, match=r"params\.yaml:4: duplicate key 'max_epochs' \(first at line 2\)"):
        config.load_params(path)
    path.write_text("model_params: {sasrec: {lr: 0.1, lr: 0.2}}\n")  # a flow mapping: the same line
    with pytest.raises(config.ParamsError, match=r"params\.yaml:1: duplicate key 'lr' \(first at line 1\)"):
        config.load_params(path)
    path.write_text("base: &b {k: 5, seed: 1}\nllm:\n  <<: *b\n  k: 8\n")  # a merge key may be overridden, as YAML means
    assert config.load_params(path)["llm"] == {"k": 8, "seed": 1}
    # a profile: `tema profile` refuses it in one line, params.yaml left alone
    params_yaml = repo_with_profile(tmp_path / "repo", root, {})
    (tmp_path / "repo" / "profiles" / "mine.yaml").write_text("extends: smoke\ntrain:\n  max_epochs: 2\ntrain:\n  patience: 1\n")
    before = params_yaml.read_bytes()
    monkeypatch.chdir(tmp_path / "repo")
    assert cli.main(["profile", "mine"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("tema: error: ") and err[0].endswith(
        "profiles/mine.yaml:4: duplicate key 'train' (first at line 2); expected each key once in a mapping (YAML would keep "
        "the last one silently; DVC refuses such a file)"), err
    assert params_yaml.read_bytes() == before


def test_the_committed_parameter_files_have_no_key_twice(root):
    for path in [root / "params.yaml", *sorted((root / "profiles").glob("*.yaml"))]:
        config.load_params(path)


def repo_with_profile(tmp_path, root, profile: dict):
    tmp_path.mkdir(parents=True, exist_ok=True)
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
