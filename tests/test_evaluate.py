"""Paired significance tests between models over per-user metrics."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from tema import config
from tema.evaluate import significance


def per_user(n_users=60, seeds=(1, 2)) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    base = rng.uniform(0.0, 0.5, n_users)
    rows = []
    for seed in seeds:
        for model, values in {"ref": base + 0.1, "same": base + 0.1, "worse": base,
                              "noisy": base + 0.1 + rng.normal(0, 0.3, n_users)}.items():
            for u, v in enumerate(values):
                rows.append({"model": model, "seed": seed, "split": "test", "protocol": "full", "domain": "A",
                             "user": f"u{u}", "MRR": v, "NDCG@10": v / 2})
    return pd.DataFrame(rows)


def test_wilcoxon_separates_a_consistent_gain_from_ties_and_noise():
    sig = significance(per_user(), "ref").set_index(["model", "metric"])
    assert sig.loc[("worse", "MRR"), "p_value"] < 1e-6 and sig.loc[("worse", "MRR"), "difference"] == pytest.approx(0.1)
    assert sig.loc[("same", "MRR"), "p_value"] == 1.0 and sig.loc[("same", "MRR"), "difference"] == 0
    assert sig.loc[("noisy", "MRR"), "p_value"] > 0.05
    assert set(sig["pairs"]) == {60} and set(sig["reference"]) == {"ref"}


def test_unknown_reference_names_the_parameter():
    with pytest.raises(config.ParamsError, match="the reference model 'tema' is not among the evaluated models"):
        significance(per_user(), "tema")


def test_holm_matches_the_step_down_procedure():
    from tema.evaluate import holm

    adjusted = holm(pd.Series([0.01, 0.04, 0.03, 0.005]))
    # sorted: 0.005 x 4 = 0.02, 0.01 x 3 = 0.03, 0.03 x 2 = 0.06, 0.04 x 1 = 0.04 -> monotone 0.06
    assert adjusted.tolist() == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm(pd.Series([0.6, 0.9])).tolist() == [1.0, 1.0]


def test_holm_families_are_baselines_and_ablations_apart():
    rows = per_user()
    ablation = rows[rows["model"] == "worse"].assign(model="tema-no-tags")
    sig = significance(pd.concat([rows, ablation]), "ref")
    groups = dict(zip(sig["model"], sig["group"]))
    assert groups == {"same": "baseline", "worse": "baseline", "noisy": "baseline", "tema-no-tags": "ablation"}
    from tema.evaluate import holm

    for _, family in sig.groupby("group"):
        assert family["p_holm"].tolist() == pytest.approx(holm(family["p_value"]).tolist())
    # the ablation family has 2 tests (MRR, NDCG@10), the baseline one 6: the same raw p is scaled differently
    worse, no_tags = (sig[(sig["model"] == m) & (sig["metric"] == "MRR")].iloc[0] for m in ("worse", "tema-no-tags"))
    assert worse["p_value"] == pytest.approx(no_tags["p_value"])
    assert no_tags["p_holm"] < worse["p_holm"] and worse["p_holm"] >= worse["p_value"]


def test_report_names_the_best_baseline_of_each_cell():
    from tema.views import significance_table

    rows = per_user()
    sig = significance(pd.concat([rows, rows[rows["model"] == "worse"].assign(model="tema-no-tags")]), "ref")
    table = significance_table(sig, ["same", "worse", "noisy", "tema-no-tags"])
    assert list(table.index) == ["same", "worse", "noisy", "tema-no-tags", "best baseline"]
    best = sig[(sig["group"] == "baseline") & (sig["metric"] == "MRR")].sort_values("model_mean").iloc[-1]
    assert table.loc["best baseline", "full A MRR"].startswith(f"{best['model']}: ")
    assert table.loc["worse", "full A MRR"].endswith("**")  # p < 1e-6 survives the correction


def test_evaluation_tables_default_to_one_per_dataset_and_profiles_can_name_more():
    params = {"datasets": ["d1", "d2"], "models": ["sasrec", "tema", "tema-no-text"]}
    assert config.evaluations(params) == {"d1": {"dataset": "d1", "models": ["sasrec", "tema", "tema-no-text"]},
                                          "d2": {"dataset": "d2", "models": ["sasrec", "tema", "tema-no-text"]}}
    named = {"main": {"dataset": "d1", "models": ["sasrec", "tema"]}, "abl": {"dataset": "d1", "models": ["tema", "tema-no-text"]}}
    assert config.evaluations({**params, "evaluations": named}) == named


@pytest.mark.parametrize("spec, message", [
    ({"dataset": "d3", "models": ["tema"]}, "'evaluations.t.dataset' is 'd3', which is not among 'datasets'"),
    ({"dataset": "d1", "models": ["tema", "c2dsr"], "reference": "sasrec"}, "'evaluations.t.reference' is 'sasrec', which is not among its models"),
    ({"dataset": "d1", "models": []}, "'evaluations.t' must be a mapping with 'dataset'"),
    ({"dataset": "d1", "model": ["tema"]}, "'evaluations.t' must be a mapping with 'dataset'"),
    (["d1"], "'evaluations.t' must be a mapping with 'dataset'"),
])
def test_bad_evaluation_table_names_the_parameter(spec, message):
    params = {"datasets": ["d1"], "models": ["tema"], "evaluations": {"t": spec}}
    with pytest.raises(config.ParamsError, match="'evaluations' has the name 'a/b'"):
        config.evaluations({**params, "evaluations": {"a/b": {"dataset": "d1", "models": ["tema"]}}})
    with pytest.raises(config.ParamsError) as err:
        config.evaluations(params)
    assert message in str(err.value)


def test_profiles_write_their_tables_and_the_full_profile_shares_the_default_main_table():
    from tema.cli import profile_params
    from tema.models import registry

    default, full, art = (profile_params(p) for p in ("default", "full", "art-office"))
    for params in (default, full, art):
        keys = list(params)
        assert keys[keys.index("models") + 1:keys.index("models") + 3] == ["evaluations", "pages"]  # what dvc.yaml iterates over
        assert params["evaluations"] == config.evaluations(params)
    assert list(default["evaluations"]) == ["food-kitchen"] and list(art["evaluations"]) == ["art-office"]
    # the same table (models) under both profiles: one dvc.lock entry, so switching profiles re-runs nothing there
    assert full["evaluations"]["food-kitchen"] == default["evaluations"]["food-kitchen"]
    assert full["evaluations"]["art-office"] == art["evaluations"]["art-office"]
    ablations = full["evaluations"]["food-kitchen-ablations"]["models"]
    noise = set(full["evaluations"]["art-office-tag-noise"]["models"]) - {"tema", "tema-no-tags"}  # art-office's experiment
    taggers = set(full["evaluations"]["art-office-taggers"]["models"]) - {"tema", "tema-no-tags", "sasrec-text"}
    assert taggers == {"tema-embedded-tags"}  # art-office's second tag source, against its first
    assert ablations[0] == "tema" and set(ablations[1:]) == set(full["models"]) & set(registry.ablations_of("tema")) - noise - taggers
    assert noise == {"tema-tag-noise-50", "tema-tag-noise-100"} and config.reference(full, "art-office-tag-noise") == "tema-no-tags"
    # pages likewise: the full and art-office profiles leave the default profile's index.html as it is
    assert default["pages"] == {"index": ["food-kitchen"]} and full["pages"]["index"] == default["pages"]["index"]
    assert full["pages"]["full"] == list(full["evaluations"]) and "index" not in art["pages"]


def test_pages_default_to_one_index_and_bad_pages_name_the_parameter():
    params = {"datasets": ["d1"], "models": ["tema", "tema-no-text"],
              "evaluations": {"main": {"dataset": "d1", "models": ["tema"]}, "abl": {"dataset": "d1", "models": ["tema", "tema-no-text"]}}}
    assert config.pages(params) == {"index": ["main", "abl"]}
    assert config.pages({**params, "pages": {"index": ["main"], "more": ["abl", "main"]}}) == {"index": ["main"], "more": ["abl", "main"]}
    for pages, message in [({"index": ["other"]}, "'pages.index' has ['other'], which are not tables of 'evaluations'"),
                           ({"index": []}, "'pages.index' must be a non-empty list"),
                           ({"../x": ["main"]}, "'pages' has the name '../x'")]:
        with pytest.raises(config.ParamsError) as err:
            config.pages({**params, "pages": pages})
        assert message in str(err.value)


def test_unknown_table_names_the_parameter():
    from tema.evaluate import table_spec

    with pytest.raises(config.ParamsError, match="no evaluation table 'x' under 'evaluations'"):
        table_spec({"datasets": ["d1"], "models": ["tema"]}, "x")


def _item_tags(rows):
    return pd.DataFrame({"item_id": [r[0] for r in rows], "domain": [r[1] for r in rows],
                         "tags": [[[t, k + 1] for k, t in enumerate(r[2])] for r in rows]})


def test_two_tag_sources_compare_per_domain_in_canonical_form():
    from tema.tags import compare_sources

    items = pd.DataFrame({"item_id": [0, 1, 2, 3], "domain": ["A", "A", "A", "B"]})
    large = _item_tags([(0, "A", ["Art Supplies", "paint"]), (1, "A", ["canvas"]), (3, "B", ["pen", "ink"])])
    small = _item_tags([(0, "A", ["art supply", "brush"]), (1, "A", ["easel"]), (2, "A", ["glue"]), (3, "B", ["pens", "ink"])])
    out = compare_sources(items, large, small, ("large", "small"))
    a, b = out.loc["A"], out.loc["B"]
    assert a["items"] == 3 and a["tagged (large)"] == 2 and a["tagged (small)"] == 3
    assert a["vocabulary (large)"] == 3 and a["vocabulary (small)"] == 4 and a["tags in both"] == 1  # "art supply"
    assert a["items both tag"] == 2
    assert a["mean Jaccard per item"] == pytest.approx((1 / 3 + 0) / 2)  # item 0: {art supply} of 3 tags; item 1: none
    assert a["share with a tag in common"] == pytest.approx(0.5)
    assert a["tags per item (small)"] == pytest.approx(4 / 3)
    assert b["mean Jaccard per item"] == pytest.approx(1.0) and b["tags in both"] == 2  # "pens" is "pen"


def test_a_table_whose_model_reads_another_tag_source_compares_it_with_the_datasets_own(tmp_path, monkeypatch):
    from tema.evaluate import tag_source_comparison

    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "params.yaml").write_text("{}\n")
    own, other = tmp_path / "data" / "tags" / "art-office", tmp_path / "data" / "tags" / "art-office" / "embedded"
    other.mkdir(parents=True)
    for folder, rows in ((own, [(0, "A", ["craft"]), (1, "B", ["office product"])]),
                         (other, [(0, "A", ["crafts", "glue"]), (1, "B", ["stapler"])])):
        table = _item_tags(rows)
        table.assign(tags=table["tags"].map(json.dumps)).to_csv(folder / "item_tags.tsv", sep="\t", index=False, quoting=3)
    prepared = tmp_path / "data" / "prepared" / "art-office"
    prepared.mkdir(parents=True)
    pd.DataFrame({"item_id": [0, 1], "domain": ["A", "B"]}).to_parquet(prepared / "items.parquet")
    monkeypatch.chdir(tmp_path)
    params = {"tags": {"out_dir": "data/tags", "sources": {"art-office": {"kind": "external", "name": "external-large"}},
                       "other_sources": {"art-office": {"embedded": {"kind": "llm"}}}},
              "model_params": {"tema": {"dim": 8}, "sasrec-text": {"dim": 8}}}
    assert tag_source_comparison(params, "art-office", ["tema", "sasrec-text"]).empty  # all read the own tags
    out = tag_source_comparison(params, "art-office", ["tema", "tema-embedded-tags", "sasrec-text"])
    assert list(out.index) == [("embedded", "A"), ("embedded", "B")]
    assert out.loc[("embedded", "A"), "mean Jaccard per item"] == pytest.approx(0.5)
    assert out.loc[("embedded", "B"), "share with a tag in common"] == 0.0
    assert "tagged (external-large)" in out.columns and "tagged (embedded)" in out.columns
