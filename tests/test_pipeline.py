"""End to end: the smoke profile through `dvc repro` (papermill executing every stage notebook)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import copy_worktree

from tema.protocols import METRICS, PROTOCOLS

MODELS = ["popularity", "gru4rec", "sasrec", "sasrec-text", "c2dsr", "tema", "tema-no-tags"]
DATASETS = ["food-kitchen", "art-office"]


def sh(*args: str, cwd: Path) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "TEMA_PROGRESS": "0"}
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc.stdout + proc.stderr


def report_files(repo: Path) -> dict[str, bytes]:
    return {str(p.relative_to(repo)): p.read_bytes() for p in sorted((repo / "reports").rglob("*")) if p.is_file()}


def tree(repo: Path) -> dict[str, bytes]:
    """Every file of a clone outside build/ (where the test-scale profiles' workspaces are) and .git/."""
    return {str(p.relative_to(repo)): p.read_bytes() for p in sorted(repo.rglob("*"))
            if p.is_file() and p.relative_to(repo).parts[0] not in ("build", ".git", ".dvc")}


@pytest.fixture(scope="module")
def clone(tmp_path_factory, root) -> tuple[Path, dict[str, bytes]]:
    """A copy of the working tree with its committed reports and dvc.lock, and its files before anything ran."""
    repo = tmp_path_factory.mktemp("clone")
    copy_worktree(root, repo, skip=())
    shutil.copy2(root / "dvc.lock", repo / "dvc.lock")
    return repo, tree(repo)


@pytest.fixture(scope="module")
def smoke_repo(clone) -> Path:
    """The smoke profile reproduced, as the README says: `tema profile smoke`, then `dvc repro` in its workspace."""
    repo, _ = clone
    out = sh("tema", "profile", "smoke", cwd=repo)
    assert "cd build/smoke && dvc repro" in out
    sh("dvc", "repro", cwd=repo / "build" / "smoke")
    return repo / "build" / "smoke"


@pytest.mark.slow
def test_test_scale_profiles_write_nothing_of_the_repository(clone, smoke_repo):
    """The smoke run, and a profile for a new dataset that extends smoke, run in build/smoke/: the clone's params.yaml,
    dvc.lock, committed reports, tags, answer cache and raw data are byte for byte as before, and the default profile
    has nothing to re-run that it had up to date."""
    repo, before = clone
    assert (smoke_repo / "reports" / "index.html").is_file() and (smoke_repo / "dvc.lock").is_file()
    (repo / "profiles" / "mine-smoke.yaml").write_text("extends: smoke\ntrain: {max_epochs: 1}\n")
    out = sh("tema", "profile", "mine-smoke", cwd=repo)
    assert "build/smoke" in out
    assert "max_epochs: 1" in (smoke_repo / "params.yaml").read_text()
    (repo / "profiles" / "mine-smoke.yaml").unlink()
    assert tree(repo) == before
    sh("tema", "profile", "default", cwd=repo)  # the default profile as committed: written again, byte for byte
    assert tree(repo) == before
    assert sh("tema", "profile", "smoke", cwd=repo)  # the workspace's params.yaml back to smoke for the other tests


@pytest.mark.slow
def test_smoke_pipeline_reports_every_model_protocol_and_domain(smoke_repo):
    index = (smoke_repo / "reports/index.html").read_text()
    for needle in [*MODELS, *DATASETS, "sampled-999", "full", "Dataset statistics", "Training curves", "data:image/png;base64"]:
        assert needle in index
    for dataset in DATASETS:
        metrics = json.loads((smoke_repo / f"reports/{dataset}/metrics.json").read_text())
        assert sorted(metrics) == sorted(MODELS)
        for model in MODELS:
            assert sorted(metrics[model]) == sorted(PROTOCOLS)
            for protocol in PROTOCOLS:
                for domain in ("A", "B"):
                    keys = metrics[model][protocol][domain]
                    assert {m.replace("@", "_") for m in METRICS} <= set(keys)
                    assert all(0.0 <= v <= 1.0 for v in keys.values())
        for stage in ["prepare", "evaluate", *(f"train-{m}" for m in MODELS)]:
            assert f'href="{dataset}/{stage}.html"' in index
            assert (smoke_repo / f"reports/{dataset}/{stage}.html").stat().st_size > 10_000
    # a dataset's second table (the profile's `evaluations`): its own reports and section, only its models
    ablations = json.loads((smoke_repo / "reports/food-kitchen-ablations/metrics.json").read_text())
    assert sorted(ablations) == ["tema", "tema-no-tags"]
    assert ablations["tema"] == json.loads((smoke_repo / "reports/food-kitchen/metrics.json").read_text())["tema"]
    sig = (smoke_repo / "reports/food-kitchen-ablations/significance.csv").read_text().splitlines()
    assert len(sig) == 1 + 2 * 2 * 2 and all(",tema-no-tags,ablation," in line for line in sig[1:])
    assert '<h2 id="food-kitchen-ablations">food-kitchen-ablations (food-kitchen)</h2>' in index
    assert 'href="food-kitchen-ablations/evaluate.html"' in index
    assert 'alt="food-kitchen-ablations test MRR"' in index and 'alt="food-kitchen-ablations curves"' in index
    assert index.count("<h3>Dataset statistics</h3>") == len(DATASETS)
    # a second page (the profile's `pages`): only its table, and links that work from reports/
    page = (smoke_repo / "reports/ablations.html").read_text()
    assert '<h2 id="food-kitchen-ablations">' in page and '<h2 id="food-kitchen">' not in page and '<h2 id="art-office">' not in page
    assert 'href="food-kitchen-ablations/evaluate.html"' in page and 'href="report-ablations.html"' in page
    assert (smoke_repo / "reports/report-ablations.html").is_file() and (smoke_repo / "reports/report-index.html").is_file()
    # executed notebooks carry outputs but no machine paths and no progress-bar noise
    for path, content in report_files(smoke_repo).items():
        text = content.decode("utf-8", errors="ignore")
        assert str(smoke_repo) not in text, path
    nb = json.loads((smoke_repo / "reports/food-kitchen/train-sasrec.ipynb").read_text())
    outputs = [o for c in nb["cells"] if c["cell_type"] == "code" for o in c["outputs"]]
    assert outputs and not any(o.get("name") == "stderr" for o in outputs)
    # ... but the epoch log as a table and the curves as an image (figures show in stage reports)
    html_outputs = "".join("".join(o.get("data", {}).get("text/html", "")) for o in outputs)
    assert "(kept)" in html_outputs and "checkpoint epoch" in html_outputs
    assert any("image/png" in o.get("data", {}) for o in outputs)
    tema_report = (smoke_repo / "reports/food-kitchen/train-tema.html").read_text()  # TEMA's tag path, diagnosed
    assert "tag_attention: normalised_entropy_mean" in tema_report and "scale: tags (g)" in tema_report
    tags_nb = json.loads((smoke_repo / "reports/food-kitchen/tags.ipynb").read_text())
    cell = next(c for c in tags_nb["cells"] if "display(provenance_table" in "".join(c["source"]))
    html_out = "".join("".join(o.get("data", {}).get("text/html", "")) for o in cell["outputs"])
    assert "<th>endpoint_model</th>" in html_out and "<th>settings.k</th>" in html_out  # a table of dotted keys
    assert not any(o.get("output_type") == "stream" for o in cell["outputs"])  # not printed JSON


@pytest.mark.slow
def test_the_first_screen_states_the_finding_and_links_every_page(smoke_repo):
    index = (smoke_repo / "reports/index.html").read_text()
    first_section = index.index('<h2 id="')
    box = index.index('<div class="findings">')
    assert box < first_section and index.index('<nav class="pages">') < box
    findings = index[box:first_section]
    assert "full ranking, per domain and metric: TEMA is" in findings and "the best baseline" in findings
    assert "TEMA without tags" in findings  # the smoke tables compare tema-no-tags
    assert 'class="provenance"' in index and "profile <code>smoke</code>" in index and "seeds 1, 2" in index
    assert 'href="full.html"' in index and 'href="art-office.html"' in index  # the other profiles' pages
    assert 'href="food-kitchen/tags.html"' in index and 'href="food-kitchen/features.html"' in index
    assert "SASRec+text" in index and "sasrec-text</th>" not in index  # display names
    assert re.search(r"<th>split</th>\s*<th>examples</th>", index)  # the index's name heads its column, no empty row
    assert index.index("Main results, full") < index.index("Main results, sampled-999")  # full ranking first
    assert '<h2 id="leaderboard">' in index  # a page of two datasets


@pytest.mark.slow
def test_dvc_metrics_and_plots_show_headline_numbers_and_offline_curves(smoke_repo):
    headline = json.loads((smoke_repo / "reports/food-kitchen/headline.json").read_text())
    assert sorted(headline) == sorted(["MRR_A", "MRR_B", "NDCG@10_A", "NDCG@10_B", "rival_MRR_A", "rival_MRR_B"])
    shown = sh("dvc", "metrics", "show", cwd=smoke_repo).splitlines()
    assert len(shown) == 1 + 3 and max(map(len, shown)) <= 120, shown  # a row per table of the smoke profile
    curves = (smoke_repo / "reports/curves/food-kitchen.csv").read_text().splitlines()
    assert curves[0] == "model,epoch,valid_score,loss" and {line.split(",")[0] for line in curves[1:]} >= {"SASRec", "TEMA"}
    sh("dvc", "plots", "show", "-o", "plots-out", cwd=smoke_repo)
    page = (smoke_repo / "plots-out/index.html").read_text()
    assert "<script src=" not in page and "vega-embed" in page  # Vega inlined: the page needs no network
    for table in ("food-kitchen", "food-kitchen-ablations", "art-office"):
        assert f"reports/curves/{table}.csv" in page
    assert '"field": "model"' in page or '"field":"model"' in page  # a line per model


@pytest.mark.slow
def test_a_failed_prepare_keeps_the_prepared_data(smoke_repo):
    """DVC deletes a stage's outputs before running it; a prepare that fails must still leave data/prepared/<d>."""
    params = (smoke_repo / "params.yaml").read_text()
    prepared = {p: p.read_bytes() for p in sorted((smoke_repo / "data/prepared/food-kitchen").rglob("*")) if p.is_file()}
    assert prepared
    (smoke_repo / "params.yaml").write_text(params.replace("n_candidates: 999", "n_candidates: 999999"))
    try:
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "TEMA_PROGRESS": "0"}
        failed = subprocess.run(["dvc", "repro", "--single-item", "prepare@food-kitchen"], cwd=smoke_repo, env=env,
                                capture_output=True, text=True)
        assert failed.returncode != 0 and "n_candidates" in failed.stdout + failed.stderr
        assert {p: p.read_bytes() for p in sorted((smoke_repo / "data/prepared/food-kitchen").rglob("*")) if p.is_file()} == prepared
    finally:
        (smoke_repo / "params.yaml").write_text(params)
    # the failed run's report (with its traceback) replaced the stage report, so DVC runs prepare once more; it writes
    # the same data, so nothing downstream of it runs again
    out = sh("dvc", "repro", "--single-item", "prepare@food-kitchen", cwd=smoke_repo)
    assert "Running stage 'prepare@food-kitchen'" in out
    assert {p: p.read_bytes() for p in sorted((smoke_repo / "data/prepared/food-kitchen").rglob("*")) if p.is_file()} == prepared
    assert "Running stage" not in sh("dvc", "repro", "--dry", "train@food-kitchen-popularity", cwd=smoke_repo)


@pytest.mark.slow
def test_the_smoke_run_leaves_the_full_data_tags_alone(smoke_repo, root):
    from tema.artifacts import TAG_FILES

    for dataset in DATASETS:  # the smoke profile tags 40 items per domain: into data/tags-smoke, never data/tags
        for name in TAG_FILES:
            assert (smoke_repo / "data/tags" / dataset / name).read_bytes() == (root / "data/tags" / dataset / name).read_bytes()
        assert len((smoke_repo / "data/tags-smoke" / dataset / "item_tags.tsv").read_text().splitlines()) <= 1 + 2 * 40


@pytest.mark.slow
def test_second_repro_does_nothing_and_forced_repro_is_byte_identical(smoke_repo):
    before = report_files(smoke_repo)
    out = sh("dvc", "repro", cwd=smoke_repo)
    assert "Running stage" not in out and "up to date" in out
    # every kind of stage once more, on the same inputs, along food-kitchen's ablation table: prepare, tags (from the LLM
    # answer cache), features, TEMA's training (the model that reads every feature), evaluate, the table's report page;
    # the profile's other stages run the same code on other data or models
    chain = ["prepare@food-kitchen", "tags@food-kitchen", "features@food-kitchen", "train@food-kitchen-tema",
             "evaluate@food-kitchen-ablations", "report@ablations"]
    forced = sh("dvc", "repro", "--force", "--single-item", *chain, cwd=smoke_repo)
    for stage in chain:
        assert f"Running stage '{stage}'" in forced, stage
    after = report_files(smoke_repo)
    assert sorted(after) == sorted(before)
    changed = [p for p in before if before[p] != after[p]]
    assert not changed, f"reports differ after re-running on the same inputs: {changed}"


@pytest.mark.slow
def test_the_result_pages_render_from_the_committed_table_summaries_alone(smoke_repo):
    """The report stage reads only reports/tables/<table>.json (and the registry): with the runs, the per-user
    metrics, the prepared data and the features gone, as on a fresh clone or on a machine that evaluated another
    table of the profile, `dvc repro -s report@...` renders the same pages byte for byte."""
    tables = json.loads((smoke_repo / "reports/tables/food-kitchen.json").read_text())
    assert tables["dataset"] == "food-kitchen" and tables["models"] == MODELS
    assert {(r["model"], r["seed"]) for r in tables["runs"]} == {(m, s) for m in MODELS for s in tables["seeds"]}
    assert {r["model"] for r in tables["curves"]} == set(MODELS) and tables["explanations"]["model"] == "tema"
    pages = ["reports/index.html", "reports/ablations.html"]
    before = {p: (smoke_repo / p).read_bytes() for p in pages}
    moved = [smoke_repo / "data" / d for d in ("runs", "eval", "prepared", "features")]
    for folder in moved:
        folder.rename(folder.with_name(folder.name + ".away"))
    try:
        out = sh("dvc", "repro", "--force", "--single-item", "report@index", "report@ablations", cwd=smoke_repo)
        assert "Running stage 'report@index'" in out and "Running stage 'report@ablations'" in out
    finally:
        for folder in moved:
            folder.with_name(folder.name + ".away").rename(folder)
    assert {p: (smoke_repo / p).read_bytes() for p in pages} == before


@pytest.mark.slow
def test_tune_command_writes_a_profile_fragment_the_profiles_accept(smoke_repo):
    out = sh("tema", "tune", "food-kitchen", "--models", "popularity", "sasrec-text", "--trials", "2", cwd=smoke_repo)
    assert "reports/tuning/food-kitchen-params.yaml" in out
    import pandas as pd
    import yaml

    table = pd.read_csv(smoke_repo / "reports/tuning/food-kitchen.csv")
    assert list(table["model"]) == ["popularity", "sasrec-text", "sasrec-text"] and table["valid_MRR"].between(0, 1).all()
    fragment = yaml.safe_load((smoke_repo / "reports/tuning/food-kitchen-params.yaml").read_text())
    trials = table[table["model"] == "sasrec-text"]
    top = trials[trials["valid_MRR"] >= trials["valid_MRR"].max() - 1e-6]  # the CSV rounds to 6 decimals
    assert fragment["model_params"]["sasrec-text"] in [json.loads(p) for p in top["params"]]
    assert "features_id" not in fragment["model_params"]["sasrec-text"]  # per-dataset identity, not a setting
    # the fragment is a profile: its values (here one made distinctive) replace the defaults' in params.yaml
    fragment["model_params"]["sasrec-text"]["lr"] = 0.0123
    (smoke_repo / "profiles/tuned.yaml").write_text(yaml.safe_dump(fragment))
    sh("tema", "profile", "tuned", cwd=smoke_repo)
    params = yaml.safe_load((smoke_repo / "params.yaml").read_text())
    assert params["model_params"]["sasrec-text"] == fragment["model_params"]["sasrec-text"]
    sh("tema", "profile", "smoke", cwd=smoke_repo)
    (smoke_repo / "profiles/tuned.yaml").unlink()


@pytest.mark.slow
def test_a_new_dataset_runs_end_to_end_and_leaves_the_other_datasets_alone(smoke_repo):
    """README 'Your own data': the example folder, `tema dataset add`, a profile, `dvc repro` and nothing else. The
    existing datasets' stages stay up to date and their runs keep their fingerprints; only the result pages, which
    read every table's outputs (data/prepared, data/eval, ...), render again."""
    import yaml

    runs = {str(p.relative_to(smoke_repo)): json.loads(p.read_text())["fingerprint"] for p in smoke_repo.glob("data/runs/*/*/seed*/run.json")}
    assert runs
    sh("tema", "dataset", "add", "kitchen-sample", "examples/kitchen-sample", "--origin", "examples/kitchen-sample", cwd=smoke_repo)
    smoke = yaml.safe_load((smoke_repo / "params.yaml").read_text())
    models = ["popularity", "gru4rec", "sasrec", "sasrec-text", "c2dsr", "tema-no-tags"]
    profile = {"extends": "smoke", "datasets": [*smoke["datasets"], "kitchen-sample"],
               "evaluations": {**smoke["evaluations"], "kitchen-sample": {"dataset": "kitchen-sample", "models": models,
                                                                          "reference": "tema-no-tags"}},
               "pages": {**smoke["pages"], "kitchen-sample": ["kitchen-sample"]}}
    (smoke_repo / "profiles" / "with-sample.yaml").write_text(yaml.safe_dump(profile))
    sh("tema", "profile", "with-sample", cwd=smoke_repo)
    new = {"prepare@kitchen-sample", "tags@kitchen-sample", "features@kitchen-sample", "evaluate@kitchen-sample",
           "report@kitchen-sample", *(f"train@kitchen-sample-{m}" for m in models)}
    # the other pages re-render (their navigation links every profile's pages, the new one's too); nothing of the
    # other datasets does
    pages = {f"report@{p}" for p in smoke["pages"]}
    assert set(json.loads(sh("dvc", "status", "--json", cwd=smoke_repo).strip().splitlines()[-1])) == new | pages
    out = sh("dvc", "repro", "report@kitchen-sample", cwd=smoke_repo)
    assert set(re.findall(r"Running stage '([^']+)'", out)) == new
    metrics = json.loads((smoke_repo / "reports/kitchen-sample/metrics.json").read_text())
    assert sorted(metrics) == sorted(models)
    assert all(0 <= v <= 1 for m in metrics.values() for p in m.values() for d in p.values() for v in d.values())
    assert (smoke_repo / "reports/kitchen-sample.html").stat().st_size > 10_000
    tags_report = (smoke_repo / "reports/kitchen-sample/tags.html").read_text()
    assert "no tag source: tags.sources.kitchen-sample.kind is none" in tags_report
    after = {str(p.relative_to(smoke_repo)): json.loads(p.read_text())["fingerprint"] for p in smoke_repo.glob("data/runs/*/*/seed*/run.json")}
    assert {k: v for k, v in after.items() if "/kitchen-sample/" not in k} == runs
    stale = set(json.loads(sh("dvc", "status", "--json", cwd=smoke_repo).strip().splitlines()[-1]))
    assert stale <= {"report@index", "report@ablations"}, stale
    sh("tema", "profile", "smoke", cwd=smoke_repo)


def test_a_dry_run_on_a_fresh_clone_lists_every_stage_with_force(tmp_path, root):
    """The documented dry run of a fresh clone (docs/dvc.md): `--force` skips DVC's stage-cache lookup, which hashes
    dependencies that do not exist yet (treeverse/dvc#9818), so it prints every stage's command and runs none."""
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(root), str(clone)], check=True)
    stages = [line.split(":", 1)[0] for line in sh("dvc", "stage", "list", "--name-only", cwd=clone).split()]
    for args in (["dvc", "repro", "--dry", "--force"], ["dvc", "exp", "run", "--dry", "--force"]):
        out = sh(*args, cwd=clone)
        assert sorted(re.findall(r"Running stage '([^']+)'", out)) == sorted(stages), args
    assert not (clone / "data" / "prepared").exists()
