"""The tags stage never replaces what it has with something worse: an endpoint that cannot be reached, a run that tags
too few items, a limited run, a full disk and SIGTERM all leave the committed tags and answer caches as they were (what
was answered before stays cached)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import copy_worktree, describe_datasets, food_kitchen_files, write_raw
from stub_llm import StubLLM
from test_tagging import cache_lines, closed_port_url, fill_the_disk
from test_tags_stage import bag_encoder

from tema import artifacts, cli, config, tags
from tema.tagging import CacheWriteError, EndpointError, TagCache


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file() and p.suffix != ".lock"}


@pytest.fixture
def tiny_repo(tmp_path, monkeypatch, root):
    """A repository root with the tiny food-kitchen raw data, earlier tag outputs in data/tags, and default params."""
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    params = config.load_params(root / "profiles" / "default.yaml")
    params["tags"]["refine"].update(min_count=1, llm_merge=False)
    params["tags"]["sources"]["food-kitchen"]["pass2"] = {"mode": "map"}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    write_raw(tmp_path / "data" / "raw", "food-kitchen", food_kitchen_files())
    describe_datasets(tmp_path)
    out = tmp_path / "data" / "tags" / "food-kitchen"
    out.mkdir(parents=True)
    for name in artifacts.TAG_FILES:
        (out / name).write_text(f"the committed {name}\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tags, "text_encoder", lambda params: bag_encoder)
    monkeypatch.setenv("TEMA_PROGRESS", "0")
    return tmp_path, params


def test_a_run_below_the_coverage_threshold_writes_nothing(tiny_repo, monkeypatch):
    repo, params = tiny_repo
    before = snapshot(repo / "data" / "tags")
    # items 2 and 3 of the 9 never get a usable answer (answer failures: recorded, not an endpoint fault)
    with StubLLM(faults={"item 2": ["no_tags"] * 10, "item 3": ["no_tags"] * 10}) as stub:
        monkeypatch.setenv("OPENAI_BASE_URL", stub.base_url)
        params["llm"].update(max_retries=1, backoff_s=0.0)
        with pytest.raises(tags.CoverageError, match=r"food-kitchen pass 1: 7 of 9 items tagged \(77\.8%\), below "
                                                     r"tags.min_coverage 99%; nothing was written \(failures: no_tag_list 2\)"):
            tags.run("food-kitchen", params)
        assert snapshot(repo / "data" / "tags") == before
        params["tags"]["min_coverage"] = 0.7  # a threshold the run meets: the outputs are replaced, whole
        tags.run("food-kitchen", params)
    out = repo / "data" / "tags" / "food-kitchen"
    assert sorted(p.name for p in out.iterdir()) == sorted(artifacts.TAG_FILES)  # no temporary files left behind
    assert len(artifacts.load_item_tags(out)) == 7
    assert json.loads((out / "accounting.json").read_text())["failed"] == 2


def test_an_unreachable_endpoint_stops_the_stage_before_anything_is_written(tiny_repo, monkeypatch):
    repo, params = tiny_repo
    before = snapshot(repo / "data")
    url = closed_port_url()
    monkeypatch.setenv("OPENAI_BASE_URL", url)
    params["llm"].update(max_retries=1, backoff_s=0.0)
    with pytest.raises(EndpointError) as caught:
        tags.run("food-kitchen", params)
    message = str(caught.value)
    assert url in message and "unreachable" in message and "\n" not in message
    assert snapshot(repo / "data") == before  # neither the outputs nor the answer cache changed


def test_a_limited_run_must_write_elsewhere(tiny_repo):
    repo, params = tiny_repo
    params["tags"]["limit_items"] = 2
    with pytest.raises(config.ParamsError, match=r"tags.out_dir: a limited run \(tags.limit_items: 2\) must not write to data/tags"):
        tags.run("food-kitchen", params)
    params["tags"]["out_dir"] = "data/tags-smoke"
    with StubLLM() as stub:
        os.environ["OPENAI_BASE_URL"] = stub.base_url
        try:
            tags.run("food-kitchen", params)
        finally:
            del os.environ["OPENAI_BASE_URL"]
    assert len(artifacts.load_item_tags(repo / "data" / "tags-smoke" / "food-kitchen")) == 4  # 2 items per domain
    assert (repo / "data" / "tags" / "food-kitchen" / "item_tags.tsv").read_text() == "the committed item_tags.tsv\n"


def cli_env(tmp_path: Path, url: str) -> dict[str, str]:
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "TEMA_PROGRESS": "0",
            "OPENAI_BASE_URL": url, "TEMA_CACHE_DIR": str(tmp_path / "cache")}


@pytest.mark.slow
def test_an_unreachable_endpoint_fails_loudly_and_keeps_the_committed_tags(tmp_path, root):
    """As a new user would meet it: `tema tags generate` and the tags stage under `dvc repro`, on a closed port."""
    repo = tmp_path / "repo"
    copy_worktree(root, repo, skip=("reports/", "data/runs"))
    subprocess.run(["tema", "profile", "default"], cwd=repo, env=cli_env(tmp_path, ""), check=True, capture_output=True)
    before = {**snapshot(repo / "data" / "tags"), **{f"cache/{k}": v for k, v in snapshot(repo / "data" / "tags-cache").items()}}
    url = closed_port_url()
    env = cli_env(tmp_path, url)
    proc = subprocess.run(["tema", "tags", "generate", "food-kitchen", "--limit", "1"], cwd=repo, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"tema: error: {url}: unreachable (connection_error"), proc.stderr
    proc = subprocess.run(["dvc", "repro", "tags@food-kitchen"], cwd=repo, env=env, capture_output=True, text=True)
    assert proc.returncode != 0
    assert f"{url}: unreachable" in proc.stdout + proc.stderr
    after = {**snapshot(repo / "data" / "tags"), **{f"cache/{k}": v for k, v in snapshot(repo / "data" / "tags-cache").items()}}
    assert after == before


@pytest.fixture
def signals_restored():
    """cli.main's `tags` command routes SIGINT and SIGTERM to KeyboardInterrupt (tema.cli.stop_on_signals): undone."""
    before = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    yield
    for signum, handler in before.items():
        signal.signal(signum, handler)


def test_a_full_disk_ends_tags_generate_and_the_stage_in_one_line(tiny_repo, monkeypatch, capsys, signals_restored):
    """No space left while an answer is appended: one line naming the cache, nothing torn, the answers before kept."""
    repo, params = tiny_repo
    (repo / "params.yaml").write_text(yaml.safe_dump({**params, "llm": {**params["llm"], "concurrency": 1}}))
    cache = repo / "data" / "tags-cache" / "food-kitchen" / "pass1.jsonl"
    real_write = os.write
    with StubLLM() as stub:
        monkeypatch.setenv("OPENAI_BASE_URL", stub.base_url)
        fill_the_disk(monkeypatch, at=3)
        assert cli.main(["tags", "generate", "food-kitchen"]) == 2
        err = capsys.readouterr().err
        assert err.splitlines() == [f"tema: error: {cache}: could not append an answer (No space left on device); the "
                                    "answers cached before are kept, free some space and run the same command again to go on"]
        assert [r["item_id"] for r in cache_lines(cache)] == [0, 1] and cache.read_bytes().endswith(b"\n")
        before = snapshot(repo / "data" / "tags")
        monkeypatch.setattr(os, "write", real_write)
        fill_the_disk(monkeypatch, at=2)  # the stage (the notebook calls tags.run): the same error, no output written
        params["llm"]["concurrency"] = 1
        with pytest.raises(CacheWriteError, match=f"^{cache}: could not append an answer"):
            tags.run("food-kitchen", params)
        assert snapshot(repo / "data" / "tags") == before
        assert [r["item_id"] for r in cache_lines(cache)] == [0, 1, 2]


def test_sigterm_stops_tags_generate_within_seconds_while_the_endpoint_hangs(tiny_repo, tmp_path):
    """SIGTERM to `tema tags generate` with four requests hanging on the endpoint (llm.timeout_s is 120 s): the run
    stops within seconds, in one line, with the answers finished before cached and the cache's lock released."""
    repo, params = tiny_repo
    assert params["llm"]["timeout_s"] >= 60 and params["llm"]["concurrency"] == 4
    cache = repo / "data" / "tags-cache" / "food-kitchen" / "pass1.jsonl"
    with StubLLM(faults={"item 0": ["ok"], "item 4": ["ok"]}, default="hang") as stub:
        proc = subprocess.Popen(["tema", "tags", "generate", "food-kitchen"], cwd=repo, env=cli_env(tmp_path, stub.base_url),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.time() + 120
            while time.time() < deadline and (len(stub.requests) < 6 or len(cache_lines(cache)) < 2):
                assert proc.poll() is None, proc.communicate()
                time.sleep(0.1)
            assert len(stub.requests) == 6  # two answered, four hanging
            started = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=60)
            took = time.monotonic() - started
        finally:
            proc.kill()
        assert len(stub.requests) == 6  # nothing asked again, nothing more asked
    assert took < 8, f"took {took:.1f} s to stop"
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == "stopped (signal 15); finished answers are cached, run the same command to resume"
    assert sorted(r["item_id"] for r in cache_lines(cache)) == [0, 4]
    TagCache(cache).close()  # the run lock was released
