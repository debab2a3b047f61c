"""What the notebooks and the report show: tables and figures without torch, explanations rendered from saved JSON."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd

from tema import views


def test_the_notebook_helpers_load_neither_torch_nor_pyplot():
    code = "import sys, tema.views; print(sorted(m for m in ('torch', 'matplotlib.pyplot', 'tema.models') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def summary() -> pd.DataFrame:
    rows = []
    for protocol in ("sampled-999", "full"):  # the evaluate stage's order, not alphabetical
        for domain in ("A", "B"):
            for model, base in (("m1", 0.1), ("m2", 0.2)):
                rows.append({"model": model, "protocol": protocol, "domain": domain, "seeds": 2,
                             "mean_MRR": base, "std_MRR": 0.01, "mean_HR@10": 2 * base, "std_HR@10": 0.02})
    return pd.DataFrame(rows)


def test_tables_follow_the_results_they_show():
    table = views.format_table(summary())
    assert list(table.index) == ["m1", "m2"]
    assert [c[0] for c in table.columns][:4] == ["sampled-999"] * 4 and table.columns[0] == ("sampled-999", "A", "MRR")
    assert table.loc["m2", ("full", "B", "HR@10")] == "0.4000 ± 0.0200"
    fig = views.plot_results(summary(), labels={"m1": "Model one"}, marks={("m1", "full", "A"): "**"}, reference="m2")
    assert [ax.get_title() for ax in fig.axes][:2] == ["full, domain A", "full, domain B"]  # full ranking first
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["m2", "Model one"]  # first model on top
    assert [t.get_text().strip() for t in fig.axes[0].texts] == ["**"] and not fig.axes[1].texts
    png = fig._repr_png_()  # a notebook shows the figure from this, whatever backend is active
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png == views.figure_png(fig)  # and renders it the same twice


def test_the_report_renders_saved_explanations_without_a_model():
    from tema import report

    item = lambda i, tags, domain="A": {"item": i, "domain": domain, "title": f"item {i}", "tags": tags}  # noqa: E731
    history = [{**item(1, ["tea", "green"]), "self_attention": 0.75, "tag_attention": 0.5, "cross_attention": None},
               {**item(7, ["mug"], "B"), "self_attention": 0.25, "tag_attention": 0.5, "cross_attention": None}]
    saved = {"model": "tema", "seed": 1, "top": 2, "users": [
        {"user": "u1", "target_domain": "B", "target": item(9, ["mug"], "B"), "history": history,
         "recommended": [item(9, ["mug", "steel"], "B"), item(8, ["pan"], "B")]}]}
    page = report.explanations_section(saved)
    assert "<h3>Explanations (TEMA, seed 1)</h3>" in page and "top 2 items" in page
    assert "<b>mug</b>, steel" in page and "item 9 (the target)" in page and "item 8</td>" in page
    assert page.count("0.75") == 1 and report.explanations_section(None) == ""
    # nowrap cells with long item titles must scroll inside their box, not widen the whole page
    assert page.count("<table") == page.count("<div class='wide'><table") == 2


def significance() -> pd.DataFrame:
    """tema.evaluate.significance's columns: the reference r against baselines b1, b2 and an ablation a1."""
    rows = []
    for protocol in ("sampled-999", "full"):
        for domain in ("A", "B"):
            for model, group, mean, p in (("b1", "baseline", 0.30, 0.01), ("b2", "baseline", 0.10, 0.001),
                                          ("a1", "ablation", 0.40, 0.2 if domain == "A" else 0.001)):
                rows.append({"protocol": protocol, "domain": domain, "reference": "r", "model": model, "group": group,
                             "metric": "MRR", "reference_mean": 0.25, "model_mean": mean, "difference": 0.25 - mean,
                             "pairs": 10, "p_value": p, "p_holm": min(1.0, 4 * p)})
    return pd.DataFrame(rows)


def test_findings_compare_the_reference_with_the_strongest_baseline_of_each_cell():
    best = views.best_opponents(significance())
    assert list(best["protocol"])[:2] == ["full", "full"]  # full ranking first
    assert set(best["model"]) == {"b1"}  # the highest mean among baselines, not the ablation a1
    assert set(best["verdict"]) == {"below (Holm)"}  # r 0.25 < b1 0.30, p 0.01, Holm 0.04
    ablation = views.against(significance(), "a1")
    assert views.count_verdicts(ablation) == {"cells": 4, "above": 0, "below": 2, "tied": 2}
    assert views.verdict(0.1, 0.001, 0.004) == "above (Holm)" and views.verdict(-0.1, 0.2, 0.8) == "tied"


def test_the_headline_metrics_are_few_and_named_for_a_terminal():
    rows = []
    for protocol in ("sampled-999", "full"):
        for domain in ("A", "B"):
            for model, base in (("r", 0.25), ("b1", 0.3), ("b2", 0.1)):
                rows.append({"model": model, "protocol": protocol, "domain": domain, "mean_MRR": base + (protocol == "full"),
                             "std_MRR": 0.0, "mean_NDCG@10": base, "std_NDCG@10": 0.0})
    got = views.headline(pd.DataFrame(rows), significance(), "r")
    assert got == {"MRR_A": 1.25, "NDCG@10_A": 0.25, "MRR_B": 1.25, "NDCG@10_B": 0.25,
                   "rival_MRR_A": 0.3, "rival_MRR_B": 0.3}  # full-ranking MRR of r; b1's from the tests
    assert views.headline(pd.DataFrame(rows), pd.DataFrame(), None) == {}


def test_provenance_renders_as_a_table_of_dotted_keys():
    table = views.provenance_table({"llm": {"model": "m", "k": 5}, "domains": ["A", "B"], "note": "x" * 300})
    assert table.loc["llm.model", "value"] == "m" and table.loc["domains", "value"] == "A, B"
    assert len(table.loc["note", "value"]) == 200


def test_the_report_lists_every_trial_of_the_validation_search(tmp_path, monkeypatch):
    from tema import report

    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "params.yaml").write_text("{}\n")
    monkeypatch.chdir(tmp_path)
    reports = tmp_path / "reports" / "tuning"
    reports.mkdir(parents=True)
    gate = {"dim": 64, "gate": True, "side_info": "noninvasive"}
    pd.DataFrame({
        "model": ["tema", "tema", "sasrec"], "trial": [0, 1, 0],
        "tuned": ['{}', '{"gate": true, "side_info": "noninvasive"}', '{"lr": 0.002}'],
        "valid_MRR": [0.0701, 0.0745, 0.069], "best_epoch": [7, 9, 8], "epochs_run": [11, 13, 12],
        "train_seconds": [1.0, 1.0, 1.0], "params": ['{"dim": 64}', json.dumps(gate), '{"lr": 0.002}'],
        "best": [False, True, True], "fingerprint": ["a", "b", "c"],
    }).to_csv(reports / "mine.csv", index=False)
    # the profile runs trial 0's configuration (gate: false spelled out, as the default): marked, though not the best here
    params = {"model_params": {"tema": {"dim": 64, "gate": False}}}
    section = report.tuning_section(params, "mine", ["tema"])
    assert "gate=True, side_info=noninvasive" in section and "(as configured)" in section and "0.0745" in section
    assert "SASRec" not in section and section.count("yes") == 2  # only the shown models: best here, and runs here
    rows = section.split("<tr")
    runs = [r for r in rows if "(as configured)" in r][0]
    assert runs.count("yes") == 1 and "0.0701" in runs
    assert "joint score" not in section
    pd.DataFrame({"model": ["tema", "tema"], "params": ['{"dim": 64}', json.dumps(gate)], "trial (mine)": [0, 1],
                  "trial (yours)": [3, 4], "joint_score": [0.9812, 0.9431], "best": [True, False]}).to_csv(reports / "joint.csv", index=False)
    section = report.tuning_section(params, "mine", ["tema"])
    assert "joint score" in section and "0.9812" in section and "0.9431" in section
    assert report.tuning_section(params, "other", ["tema"]) == ""


def test_the_leaderboard_keeps_every_main_model_of_a_dataset_with_several_tables(monkeypatch):
    from tema import report

    params = {"datasets": ["one", "two"], "models": ["sasrec", "tema"], "evaluations": {
        "one": {"dataset": "one", "models": ["sasrec", "sasrec-text", "tema"]},
        "one-ablations": {"dataset": "one", "models": ["tema", "tema-no-tags"]},
        "two": {"dataset": "two", "models": ["sasrec", "tema"]},
        "two-taggers": {"dataset": "two", "models": ["tema", "sasrec-text"]}}}
    mrr = {("one", "sasrec"): 0.09, ("one", "sasrec-text"): 0.08, ("one", "tema"): 0.07, ("one", "tema-no-tags"): 0.05,
           ("two", "sasrec"): 0.01, ("two", "tema"): 0.02, ("two", "sasrec-text"): 0.015}

    def results_of(table):
        spec = params["evaluations"][table]
        return pd.DataFrame([{"model": m, "protocol": "full", "domain": d, "mean_MRR": mrr[(spec["dataset"], m)]}
                             for m in spec["models"] for d in "AB"])

    monkeypatch.setattr(report, "results_of", results_of)
    board = report.leaderboard_section(list(params["evaluations"]), params)
    rows = {r.split("</th>")[0].rsplit(">", 1)[-1]: r for r in board.split("<tr")[1:]}
    # a later table of the same dataset neither blanks the first table's models nor adds its ablations
    assert "0.0900" in rows["SASRec"] and "0.0800" in rows["SASRec+text"] and "0.0150" in rows["SASRec+text"]
    assert "<b>0.0900</b>" in rows["SASRec"] and "<b>0.0200</b>" in rows["TEMA"]
    assert not any("w/o tags" in name for name in rows)


def test_a_table_around_another_model_states_its_comparisons_not_a_best_baseline(monkeypatch):
    from tema import report

    rows = [{"protocol": proto, "domain": d, "reference": "tema-no-tags", "model": m, "group": g, "metric": metric,
             "reference_mean": 0.10, "model_mean": mean, "difference": 0.10 - mean, "p_value": p, "p_holm": p * 4}
            for proto in ("full", "sampled-999") for d in "AB" for metric in ("MRR", "NDCG@10")
            for m, g, mean, p in (("tema", "baseline", 0.12, 0.001), ("tema-tag-noise-100", "ablation", 0.11, 0.4))]
    monkeypatch.setattr(report, "significance_of", lambda name: pd.DataFrame(rows))
    monkeypatch.setattr(report, "inputs_of", lambda name: {"stats": {"domains": {"A": "a", "B": "b"}}})
    box = report.findings_section(["noise"], {})
    assert "best baseline</th>" not in box and "the best baseline in" not in box
    assert "TEMA w/o tags is significantly below TEMA in 8 of 8 cells" in box
    assert "not significantly different from" in box and "random tags in any of the 8 cells" in box
    # a count that not every cell survives Holm's correction says how many do
    counts = {"cells": 4, "above": 0, "below": 3, "tied": 1, "above_holm": 0, "below_holm": 1}
    assert report.tally(counts, "the best baseline") == "significantly below the best baseline in 3 of 4 cells (1 after Holm)"
    assert report.holm_note("below") == " (not after Holm)" and report.holm_note("above (Holm)") == " (after Holm)"


def test_the_findings_count_the_cells_that_survive_holm():
    from tema import report

    counts = report.counted(views.against(significance(), "a1"))  # B: p 0.001, Holm 0.004; A: p 0.2
    assert counts["below"] == 2 and counts["below_holm"] == 2 and counts["above_holm"] == 0
    assert report.tally(counts, "a1") == "significantly below a1 in 2 of 4 cells"
