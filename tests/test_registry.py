"""The model registry: each model's metadata, and the hyper-parameters an ablation inherits from its base."""

from __future__ import annotations

import copy

import pandas as pd
import pytest

from tema import cli, config, evaluate, schema, training, tune
from tema.models import registry
from tema.models.sasrec import SASRec
from tema.train import model_params

TEMA_ABLATIONS = ["tema-no-tags", "tema-mean-tags", "tema-no-tag-attention", "tema-no-cross-attention", "tema-no-text",
                  "tema-no-visual", "tema-tag-noise-50", "tema-tag-noise-100", "tema-embedded-tags"]


def test_every_model_says_what_it_is():
    assert registry.names("baseline") == ["sasrec", "c2dsr", "gru4rec", "popularity", "sasrec-text"]
    assert registry.names("ours") == ["tema"] and registry.names("ablation") == TEMA_ABLATIONS
    assert [registry.display(n) for n in ("sasrec-text", "tema", "tema-no-tags", "c2dsr")] == \
        ["SASRec+text", "TEMA", "TEMA w/o tags", "C2DSR"]
    assert registry.group("tema") == "ours" and registry.group("tema-no-text") == "ablation"
    with pytest.raises(KeyError, match="unknown model 'bert4rec'"):
        registry.info("bert4rec")


def test_ablations_name_their_base_and_the_switch_they_fix():
    assert registry.ablations_of("tema") == TEMA_ABLATIONS and registry.ablations_of("sasrec") == []
    assert {n: dict(registry.info(n).fixed) for n in TEMA_ABLATIONS} == {
        "tema-no-tags": {"tags": "none"}, "tema-mean-tags": {"tags": "mean"}, "tema-no-tag-attention": {"tag_attention": False},
        "tema-no-cross-attention": {"cross_attention": False}, "tema-no-text": {"text": False}, "tema-no-visual": {"visual": False},
        "tema-tag-noise-50": {"tag_noise": 0.5}, "tema-tag-noise-100": {"tag_noise": 1.0},
        "tema-embedded-tags": {"tags_from": "embedded"}}
    assert all(registry.info(n).base == "tema" for n in TEMA_ABLATIONS)
    assert all(registry.info(n).base is None and not registry.info(n).fixed for n in registry.names() if n not in TEMA_ABLATIONS)


def test_features_readers_and_deviations():
    readers = {n for n in registry.names() if registry.info(n).reads_features}
    assert readers == {"tema", "sasrec-text", *TEMA_ABLATIONS}
    assert all(training.reads_features(n) == (n in readers) for n in registry.names())  # what the trainer acts on
    tema, c2dsr = registry.info("tema").deviations, registry.info("c2dsr").deviations
    assert tema and c2dsr and all(isinstance(d, str) and d for d in tema + c2dsr)
    assert all(registry.info(n).deviations == tema for n in TEMA_ABLATIONS)  # an ablation shares its base's
    assert not any(registry.info(n).deviations for n in ("popularity", "gru4rec", "sasrec", "sasrec-text"))
    assert dict(registry.info("tema-no-tags").choices) == {"tags": ("weighted", "mean", "none"), "side_info": ("fused", "noninvasive")}
    c2dsr = registry.info("c2dsr")  # the published settings beside ours, and why they differ
    assert c2dsr.paper_hyper["dim"] == 256 and set(c2dsr.why_different) <= set(c2dsr.paper_hyper)
    assert not registry.info("tema").paper_hyper and not registry.info("tema-no-tags").paper_hyper


def test_an_ablation_inherits_its_base_hyper_parameters_and_keeps_its_own():
    params = {"model_params": {"tema": {"dim": 32, "dropout": 0.1, "lr": 0.01}, "tema-no-text": {"dropout": 0.3}}}
    assert model_params(params, "tema-no-tags") == {"dim": 32, "dropout": 0.1, "lr": 0.01}
    assert model_params(params, "tema-no-text") == {"dim": 32, "dropout": 0.3, "lr": 0.01}
    params["model_params"]["tema"]["lr"] = 0.02  # a change to the base reaches every ablation
    assert model_params(params, "tema-no-tags")["lr"] == model_params(params, "tema-no-text")["lr"] == 0.02
    assert model_params({"model_params": {"tema": None}}, "tema-mean-tags") == {}


def test_an_ablation_takes_its_fixed_switch_not_the_base_one():
    params = {"model_params": {"tema": {"dim": 32, "tags": "mean", "text": False}}}
    assert model_params(params, "tema-no-tags") == {"dim": 32, "text": False}
    assert model_params(params, "tema-no-text") == {"dim": 32, "tags": "mean"}
    schema_errors = schema.hyper_errors("tema-no-tags", {"tags": "weighted"}, "model_params.tema-no-tags")
    assert schema_errors == ["model_params.tema-no-tags.tags: this ablation fixes tags = 'none'; remove the key or set it "
                             "to 'none', got 'weighted'"]


def test_a_missing_entry_names_it():
    with pytest.raises(config.ParamsError, match=r"missing parameter 'model_params\.tema' \(tema-no-tags inherits"):
        model_params({"model_params": {"sasrec": {}}}, "tema-no-tags")
    with pytest.raises(config.ParamsError, match=r"missing parameter 'model_params\.sasrec'"):
        model_params({"model_params": {"tema": {}}}, "sasrec")
    with pytest.raises(config.ParamsError, match=r"'model_params\.tema-no-tags' must be dict or NoneType"):
        model_params({"model_params": {"tema": {}, "tema-no-tags": [1]}}, "tema-no-tags")


@pytest.mark.parametrize("profile", ["default", "smoke", "full", "art-office"])
def test_in_every_profile_each_ablation_runs_with_its_base_settings(profile):
    """No profile gives an ablation settings of its own: each runs with its base's, as when profiles/default.yaml
    copied TEMA's block for each (so the runs' fingerprints did not change when the copies went)."""
    params = cli.profile_params(profile)
    for name in registry.names("ablation"):
        base = registry.info(name).base
        assert name not in params["model_params"]
        assert model_params(params, name) == model_params(params, base) != {}


@pytest.fixture
def toy_ablation(monkeypatch):
    """A registry with one more ablation, of SASRec, registered the way a newcomer would: generic code must pick it up."""
    monkeypatch.setattr(registry, "_INFO", dict(registry._INFO))
    monkeypatch.setattr(registry, "MODELS", dict(registry.MODELS))
    one_block = type("SASRecOneBlock", (SASRec,), {"__module__": __name__})
    registry.register("sasrec-one-block", display="SASRec, one block", group="ablation", base="sasrec",
                      fixed={"blocks": 1})(one_block)
    return "sasrec-one-block"


def test_generic_code_asks_the_registry(toy_ablation):
    params = copy.deepcopy(cli.profile_params("default"))
    params["models"].append(toy_ablation)
    schema.validate(params)  # no model_params entry: it inherits sasrec's
    assert model_params(params, toy_ablation) == {k: v for k, v in params["model_params"]["sasrec"].items() if k != "blocks"}
    with pytest.raises(config.ParamsError, match=r"\['sasrec-one-block'\]: an ablation .* tune `sasrec`"):
        tune.run("food-kitchen", params, models=[toy_ablation])  # refused before any data is read
    rows = pd.DataFrame([{"model": m, "seed": 1, "split": "test", "protocol": "full", "domain": "A", "user": f"u{u}",
                          "MRR": (u % 7) / 10 + bonus, "NDCG@10": 0.0}
                         for m, bonus in (("sasrec", 0.1), ("gru4rec", 0.0), (toy_ablation, 0.0)) for u in range(20)])
    sig = evaluate.significance(rows, "sasrec")
    assert dict(zip(sig["model"], sig["group"])) == {"gru4rec": "baseline", toy_ablation: "ablation"}  # Holm families
    params["model_params"][toy_ablation] = {"blocks": 2}
    with pytest.raises(config.ParamsError, match=r"model_params\.sasrec-one-block\.blocks: this ablation fixes blocks = 1"):
        schema.validate(params)


@pytest.mark.parametrize("kwargs, message", [
    ({"group": "mine"}, "group must be one of"),
    ({"group": "ablation"}, "an ablation \\(and only an ablation\\) names its base"),
    ({"group": "baseline", "base": "sasrec", "fixed": {"blocks": 1}}, "an ablation \\(and only an ablation\\)"),
    ({"group": "ablation", "base": "tema-no-tags", "fixed": {"text": False}}, "must be registered before it and not be an ablation"),
    ({"group": "ablation", "base": "sasrec", "fixed": {"tags": "none"}}, "fixes \\['tags'\\], which SASRec does not take"),
])
def test_a_bad_registration_is_refused_and_registers_nothing(kwargs, message):
    before = registry.names()
    with pytest.raises(ValueError, match=message):
        registry.register("mine", display="Mine", **kwargs)(SASRec)
    assert registry.names() == before


def test_a_name_is_registered_once():
    with pytest.raises(ValueError, match="'sasrec' is registered twice: tema.models.sasrec.SASRec and .*Other"):
        registry.register("sasrec", display="SASRec", group="baseline")(type("Other", (SASRec,), {}))
    assert registry.info("sasrec").cls is SASRec
    registry.register("sasrec", display="SASRec", group="baseline")(SASRec)  # the same class again: a module reload
