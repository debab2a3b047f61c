"""`tema tune`: the same budget for every model, selection on validation only, resumable, clear errors."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
import yaml
from test_training import cfg, synthetic

from tema import config, tune

PARAMS = {
    "tune": {
        "trials": 4, "seed": 1,
        "space": {"lr": [0.001, 0.01], "dropout": [0.0, 0.2], "aux_weight": [0.5]},
        "model_space": {"gru4rec": {"layers": [1, 2]}},
    },
}


def test_trials_start_from_the_configured_model_and_draw_only_its_keys():
    base = {"dim": 16, "dropout": 0.2, "lr": 0.001}
    configs = tune.trial_configs(PARAMS, "gru4rec", base, 4, seed=1)
    assert configs[0] == base and len(configs) == 4
    assert len({json.dumps(c, sort_keys=True) for c in configs}) == 4  # distinct
    assert all(set(c) <= {"dim", "dropout", "lr", "layers"} for c in configs)  # no aux_weight: gru4rec has none
    assert all(c["dim"] == 16 for c in configs)  # untuned keys stay as configured
    assert tune.trial_configs(PARAMS, "gru4rec", base, 4, seed=1) == configs  # the same draw every time
    # the grid has 2 x 2 x 2 = 8 points; asking for more gives the base plus the other 7
    assert len(tune.trial_configs(PARAMS, "gru4rec", base, 50, seed=1)) == 8
    # a model without tunable keys gets its one configuration: the same budget, nothing to spend it on
    assert tune.trial_configs(PARAMS, "popularity", {}, 4, seed=1) == [{}]


def test_a_design_search_tries_the_listed_variants_within_the_same_budget():
    designs = [{"side_info": "noninvasive"}, {"gate": True}, {"gate": True, "tag_dropout": 0.3}]
    params = {"tune": {**PARAMS["tune"], "designs": {"tema": designs}}}
    base = {"dim": 16, "dropout": 0.2, "lr": 0.001}
    configs = tune.trial_configs(params, "tema", base, 3, seed=1)
    assert configs == [base, {**base, **designs[0]}, {**base, **designs[1]}]  # trial 0, then the designs in order
    assert len(tune.trial_configs(params, "tema", base, 10, seed=1)) == 4
    assert tune.trial_configs(params, "gru4rec", base, 3, seed=1)[0] == base  # other models keep their grid draw
    bad = {"tune": {**PARAMS["tune"], "designs": {"tema": [{"gates": True}]}}}
    with pytest.raises(config.ParamsError, match=r"tune\.designs\.tema'\[0\]\.gates is not a parameter of tema"):
        tune.trial_configs(bad, "tema", base, 3, seed=1)
    from tema import schema

    designs = {"tema": [{"side_info": "early"}], "nosuch": [{}]}
    errors = schema._model_checks({"models": [], "model_params": {}, "tune": {**PARAMS["tune"], "designs": designs}})
    assert any(e.startswith("tune.designs.tema[0].side_info") for e in errors), errors
    assert any(e.startswith("tune.designs.nosuch: unknown model") for e in errors), errors


def test_bad_tuning_params_name_the_parameter():
    bad = {"tune": {**PARAMS["tune"], "model_space": {"gru4rec": {"heads": [1, 2]}}}}
    with pytest.raises(config.ParamsError, match=r"tune\.model_space\.gru4rec\.heads' is not a parameter of gru4rec"):
        tune.trial_configs(bad, "gru4rec", {"dim": 16}, 3, seed=1)
    empty = {"tune": {**PARAMS["tune"], "space": {"lr": []}}}
    with pytest.raises(config.ParamsError, match=r"tune\.space\.lr' must be a non-empty list"):
        tune.trial_configs(empty, "gru4rec", {"lr": 0.001}, 3, seed=1)
    with pytest.raises(config.ParamsError, match=r"trials \(tune\.trials or --trials\) must be >= 1"):
        tune.trial_configs(PARAMS, "gru4rec", {}, 0, seed=1)
    text = {"tune": {**PARAMS["tune"], "space": {"weight_decay": [0.0, "1e-5"]}}}  # YAML reads 1e-5 as a string
    with pytest.raises(config.ParamsError, match=r"tune\.space\.weight_decay' holds '1e-5' \(str\); expected values like 0\.0"):
        tune.trial_configs(text, "gru4rec", {"weight_decay": 0.0}, 3, seed=1)
    assert len(tune.trial_configs({"tune": {"space": {"lr": [1, 0.01]}}}, "gru4rec", {"lr": 0.001}, 3, seed=1)) == 3
    typo = {"tune": {**PARAMS["tune"], "space": {"dropuot": [0.1]}}}
    with pytest.raises(config.ParamsError, match=r"tune\.space\.dropuot' is a parameter of no model"):
        tune.check_tune_params(typo, ["gru4rec"])
    unknown = {"tune": {**PARAMS["tune"], "model_space": {"GRU4rec": {"layers": [2]}}}}
    with pytest.raises(config.ParamsError, match=r"tune\.model_space\.GRU4rec' names no registered model"):
        tune.check_tune_params(unknown, ["gru4rec"])
    tune.check_tune_params(PARAMS, ["gru4rec"])  # aux_weight is TEMA's: a parameter of some model


def test_ablations_are_not_tuned_apart_but_inherit_their_base_models_tuned_settings():
    from tema.train import model_params

    with pytest.raises(config.ParamsError, match=r"tema-no-tags.*tune `tema`"):
        tune.run("food-kitchen", config.load_params(config.repo_root() / "profiles" / "default.yaml"), models=["tema-no-tags"])
    table = pd.DataFrame({"model": ["tema", "tema", "sasrec"], "trial": [0, 1, 0], "valid_MRR": [0.1, 0.2, 0.1],
                          "params": [json.dumps({"aux_weight": 0.5}), json.dumps({"aux_weight": 1.0}), json.dumps({"lr": 1})]})
    fragment = tune.best_params(table)  # what <dataset>-params.yaml holds: the tuned models only
    assert fragment == {"sasrec": {"lr": 1}, "tema": {"aux_weight": 1.0}}
    # copied into a profile, the fragment reaches the ablations through their base; their own differences stay
    profile = {"model_params": {"tema": {"dim": 16, "aux_weight": 0.5}, "tema-no-tags": {"dropout": 0.0}, "sasrec": {}}}
    tuned = config.deep_merge(profile, {"model_params": fragment})
    assert model_params(tuned, "tema-no-tags") == {"dim": 16, "aux_weight": 1.0, "dropout": 0.0}
    assert model_params(tuned, "tema-no-text") == {"dim": 16, "aux_weight": 1.0}


def test_search_selects_on_validation_never_reads_test_and_resumes(tmp_path, capsys):
    ds = synthetic(test_target=10**9)  # a test target no model could score: reading the test split would fail
    configs = [{"dim": 16, "dropout": 0.0, "lr": lr} for lr in (0.0001, 0.02)]
    table = tune.tune_model(ds, "sasrec", configs, cfg(max_epochs=4, patience=4), 1, tmp_path, "d")
    assert list(table["trial"]) == [0, 1] and json.loads(table["tuned"][0]) == {"lr": 0.0001}
    for row in table.itertuples():
        run = json.loads((tmp_path / "sasrec" / f"trial{row.trial}" / "run.json").read_text())
        assert row.valid_MRR == run["best_valid_score"]  # the score is the run's own validation selection
    assert table["valid_MRR"][1] > table["valid_MRR"][0]  # a 200x larger step learns the pattern in 4 epochs
    assert list(table["best"]) == [False, True]
    assert tune.best_params(table) == {"sasrec": configs[1]}
    capsys.readouterr()
    again = tune.tune_model(ds, "sasrec", configs, cfg(max_epochs=4, patience=4), 1, tmp_path, "d")
    assert capsys.readouterr().err.count("already trained") == 2
    assert again.drop(columns="train_seconds").equals(table.drop(columns="train_seconds"))


def test_ties_go_to_the_configured_trial():
    import pandas as pd

    table = pd.DataFrame({"model": ["m", "m"], "trial": [0, 1], "valid_MRR": [0.3, 0.3],
                          "params": [json.dumps({"lr": 1}), json.dumps({"lr": 2})]})
    assert tune.best_params(table) == {"m": {"lr": 1}}


def test_the_default_profile_has_a_valid_search_for_every_model(root):
    from tema.train import model_params

    params = yaml.safe_load((root / "profiles" / "default.yaml").read_text())
    for model in params["models"]:
        base = model_params(params, model)
        configs = tune.trial_configs(params, model, base, params["tune"]["trials"], params["tune"]["seed"])
        assert configs[0] == base and len(configs) == (1 if model == "popularity" else params["tune"]["trials"])


def tuning_study(tmp_path, monkeypatch, root, workers: int) -> dict:
    from test_training import study_root

    params = study_root(tmp_path, monkeypatch, root, workers=workers)
    params["tune"] = {"trials": 2, "seed": 1, "space": {"lr": [0.001, 0.05]}, "model_space": {}}
    params["model_params"]["sasrec"] = {"dim": 16, "dropout": 0.0, "lr": 0.01}
    return params


def test_trials_trained_in_parallel_equal_trials_trained_one_by_one(tmp_path, monkeypatch, root):
    serial_root, parallel_root = tmp_path / "serial", tmp_path / "parallel"
    serial_root.mkdir(), parallel_root.mkdir()
    serial = tune.run("synthetic", tuning_study(serial_root, monkeypatch, root, workers=1), models=["gru4rec", "sasrec"])
    parallel = tune.run("synthetic", tuning_study(parallel_root, monkeypatch, root, workers=3), models=["gru4rec", "sasrec"])
    assert list(zip(parallel["model"], parallel["trial"])) == [("gru4rec", 0), ("gru4rec", 1), ("sasrec", 0), ("sasrec", 1)]
    columns = ["model", "trial", "tuned", "valid_MRR", "best_epoch", "epochs_run", "params", "best"]
    pd.testing.assert_frame_equal(serial[columns], parallel[columns])  # the same runs: workers is not part of a trial
    for row in parallel.itertuples():
        trial = f"data/tuning/synthetic/{row.model}/trial{row.trial}"
        a = torch.load(serial_root / trial / "model.pt", weights_only=True)
        b = torch.load(parallel_root / trial / "model.pt", weights_only=True)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (parallel_root / "reports" / "tuning" / "synthetic-params.yaml").is_file()


def test_a_failing_parallel_trial_keeps_the_others_and_resumes(tmp_path, monkeypatch, root):
    params = tuning_study(tmp_path, monkeypatch, root, workers=2)
    trials = tmp_path / "data" / "tuning" / "synthetic" / "gru4rec"
    trials.mkdir(parents=True)
    (trials / "trial1").write_text("in the way")  # trial 1 cannot make its run folder
    with pytest.raises(RuntimeError, match=r"1 trial\(s\) failed \(finished trials are kept; a re-run resumes\): gru4rec trial 1"):
        tune.run("synthetic", params, models=["gru4rec", "sasrec"])
    done = {p.parent.relative_to(trials.parent).as_posix() for p in trials.parent.glob("*/trial*/run.json")}
    assert done == {"gru4rec/trial0", "sasrec/trial0", "sasrec/trial1"}
    (trials / "trial1").unlink()
    table = tune.run("synthetic", params, models=["gru4rec", "sasrec"])  # the three finished trials are reused
    assert len(table) == 4 and table["valid_MRR"].notna().all()


def test_tuning_models_one_at_a_time_keeps_the_earlier_rows_while_their_runs_stand(tmp_path, monkeypatch, root, capsys):
    params = tuning_study(tmp_path, monkeypatch, root, workers=1)
    reports = tmp_path / "reports" / "tuning"
    first = tune.run("synthetic", params, models=["gru4rec"])
    both = tune.run("synthetic", params, models=["sasrec"])
    assert list(zip(both["model"], both["trial"])) == [("gru4rec", 0), ("gru4rec", 1), ("sasrec", 0), ("sasrec", 1)]
    on_disk = pd.read_csv(reports / "synthetic.csv", dtype={"fingerprint": str})
    assert list(on_disk["fingerprint"][:2]) == list(first["fingerprint"])  # the gru4rec rows as found, not re-scored
    fragment = yaml.safe_load((reports / "synthetic-params.yaml").read_text())["model_params"]
    assert set(fragment) == {"gru4rec", "sasrec"}
    # re-tuning a model replaces its rows rather than adding to them
    assert len(tune.run("synthetic", params, models=["sasrec"])) == 4
    # an earlier row whose trial was re-trained since (here: another fingerprint) no longer stands
    run_json = tmp_path / "data" / "tuning" / "synthetic" / "gru4rec" / "trial1" / "run.json"
    run_json.write_text(json.dumps({**json.loads(run_json.read_text()), "fingerprint": "0000"}))
    table = tune.run("synthetic", params, models=["sasrec"])
    assert list(zip(table["model"], table["trial"])) == [("gru4rec", 0), ("sasrec", 0), ("sasrec", 1)]
    assert "dropping the earlier rows of ['gru4rec']" in capsys.readouterr().err
    # a fresh clone: the committed table's rows stand although no trial run of theirs is on this machine
    import shutil

    shutil.rmtree(tmp_path / "data" / "tuning" / "synthetic" / "gru4rec")
    table = tune.run("synthetic", params, models=["sasrec"])
    assert list(zip(table["model"], table["trial"])) == [("gru4rec", 0), ("sasrec", 0), ("sasrec", 1)]


def _rows(model, trials):
    return [{"model": model, "trial": k, "valid_MRR": v, "params": json.dumps(p, sort_keys=True)} for k, (p, v) in enumerate(trials)]


def test_the_joint_selection_scores_configurations_tried_on_every_dataset_on_one_scale():
    base = {"dim": 64, "dropout": 0.5}
    gate = {**base, "gate": True}
    # food: MRR around 0.07; art: around 0.02. The gate config is second best on food but far best on art.
    food = pd.DataFrame(_rows("tema", [(base, 0.080), (gate, 0.068), ({**base, "tag_dropout": 0.3}, 0.072)])
                        + _rows("sasrec", [({"dropout": 0.2}, 0.06)]))
    art = pd.DataFrame(_rows("tema", [({**gate}, 0.025), ({**base, "gate": False, "tag_dropout": 0.0}, 0.018)]))
    table = tune.joint_table({"food": food, "art": art})
    assert set(table["model"]) == {"tema"}  # sasrec was not searched on art: left out
    # {base} on food and {base, gate: False, tag_dropout: 0.0} on art are one configuration (defaults filled in);
    # tag_dropout 0.3 was tried on food only and is not a candidate
    assert len(table) == 2
    best = table[table["best"]].iloc[0]
    assert json.loads(best["params"]) == gate
    assert best["ratio (art)"] == 1.0 and best["joint_score"] == round((0.068 / 0.080 + 1.0) / 2, 4)
    # raw means would let food's larger MRR decide (base 0.049 against gate 0.0465); the ratios do not
    other = table[~table["best"]].iloc[0]
    assert other["valid_MRR (food)"] + other["valid_MRR (art)"] > best["valid_MRR (food)"] + best["valid_MRR (art)"]
    assert other["joint_score"] < best["joint_score"]
    with pytest.raises(config.ParamsError, match="two datasets or more"):
        tune.joint_table({"food": food})
    lone = pd.DataFrame(_rows("tema", [({**base, "tag_dropout": 0.5}, 0.02)]))
    with pytest.raises(config.ParamsError, match="no configuration of tema was tried on every one"):
        tune.joint_table({"food": food, "art": lone})


def test_tune_joint_writes_the_table_and_the_profile_fragment(tmp_path, monkeypatch):
    monkeypatch.setattr(config, "repo_root", lambda: tmp_path)
    for name, mrr in (("food", (0.07, 0.06)), ("art", (0.01, 0.02))):
        (tmp_path / "reports" / "tuning").mkdir(parents=True, exist_ok=True)
        pd.DataFrame(_rows("sasrec", [({"dropout": 0.2}, mrr[0]), ({"dropout": 0.5}, mrr[1])])).to_csv(
            tmp_path / "reports" / "tuning" / f"{name}.csv", index=False)
    table = tune.run_joint(["food", "art"])
    assert (tmp_path / "reports" / "tuning" / "joint.csv").exists()
    fragment = yaml.safe_load((tmp_path / "reports" / "tuning" / "joint-params.yaml").read_text())
    # dropout 0.2: 1.0 on food, 0.5 on art (0.75); dropout 0.5: 0.857 and 1.0 (0.929)
    assert fragment == {"model_params": {"sasrec": {"dropout": 0.5}}}
    assert table.loc[table["best"], "joint_score"].item() == round((0.06 / 0.07 + 1.0) / 2, 4)
    with pytest.raises(config.ParamsError, match=r"reports/tuning/nosuch.csv: not found; run `tema tune nosuch` first"):
        tune.run_joint(["food", "nosuch"])
