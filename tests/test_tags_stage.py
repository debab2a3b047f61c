"""Self-refinement, pass-2 mapping, the tags stage end to end (stub endpoint, canary key) and a real run."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import openai
import pytest
import yaml
from conftest import copy_worktree
from stub_llm import StubLLM

from tema import cli, config, llm, profiles, tags
from tema.tagging import Item, Settings, TagCache, tag_items

CANARY = "sk-canary-7f3a9b1e5d"


def bag_encoder(texts):
    """A deterministic stand-in for the text encoder in unit tests: letter-trigram counts."""
    out = np.zeros((len(texts), 512), dtype=np.float32)
    for row, text in enumerate(texts):
        padded = f"  {text} "
        for i in range(len(padded) - 2):
            out[row, hash(padded[i:i + 3]) % 512] += 1
    return out


def test_canonical_forms():
    assert tags.canonical_form("Cookies") == "cookie"
    assert tags.canonical_form("Dish-Brushes") == "dish brush"
    assert tags.canonical_form("Glass") == "glass"
    assert tags.canonical_form("Berries!", known={"berry"}) == "berry"
    assert tags.canonical_form("Cookies", known={"cookie", "cooky"}) == "cooky"  # a seen singular wins, in rule order


def test_refinement_merges_drops_and_maps():
    pass1 = {
        0: ["dark chocolate", "snack", "cookies"], 1: ["dark chocolates", "snack"], 2: ["cookie", "snack", "dark chocolate"],
        3: ["skillet", "cast iron", "cookware"], 4: ["skillets", "cookware", "cast iron"], 5: ["skillet", "cookware", "snacks"],
        6: ["cookie", "zzz unique"],
    }
    domain_of = {0: "A", 1: "A", 2: "A", 6: "A", 3: "B", 4: "B", 5: "B"}
    refine = {"min_count": 2, "vocab_size": 10, "similarity": 0.99}

    def llm(domain, heads):
        if domain == "A":
            return {"cookie": "snack", "unknown tag": "snack"}, {"dark chocolate"}, {"merges": 1, "drops": 1, "ignored": 1}
        return {}, set(), {}

    vocab, merges, report = tags.refine_vocabulary(pass1, domain_of, refine, bag_encoder, llm)
    a = dict(zip(vocab[vocab.domain == "A"].tag, vocab[vocab.domain == "A"]["count"]))
    assert a == {"snack": 6}  # cookie(s) merged into snack (3 + 3); dark chocolate dropped as vague
    b = set(vocab[vocab.domain == "B"].tag)
    assert b == {"skillet", "cookware", "cast iron"}
    assert set(vocab[vocab.shared].tag) == set()  # 'snack' is only in A's vocabulary (B saw it once)
    item_tags, counts = tags.map_to_vocabulary(pass1, domain_of, vocab, merges, bag_encoder, threshold=0.99)
    loose, _ = tags.map_to_vocabulary(pass1, domain_of, vocab, merges, bag_encoder, threshold=-1.0)
    assert "dark chocolate" not in {t for t, _ in loose[1]} and loose[1] == [("snack", 2)]  # a dropped tag stays dropped
    assert item_tags[0] == [("snack", 2)]  # dark chocolate dropped, snack kept at rank 2, cookies -> snack (dup)
    assert item_tags[4] == [("skillet", 1), ("cookware", 2), ("cast iron", 3)]
    assert item_tags[6] == [("snack", 1)]
    assert counts["dropped"] >= 3 and counts["merged"] >= 1


def test_llm_synonym_pairs_must_also_be_close_by_embedding():
    pass1 = {0: ["cookie", "snack", "snacks bar"], 1: ["cookie", "snack", "snacks bar"], 2: ["cookie", "snack", "snacks bar"]}
    domain_of = {0: "A", 1: "A", 2: "A"}

    def llm(domain, heads):  # one unrelated pair, one near pair (letter trigrams shared)
        return ({"cookie": "snack", "snacks bar": "snack"} if domain == "A" else {}), set(), {"merges": 2 if domain == "A" else 0}

    refine = {"min_count": 2, "vocab_size": 10, "similarity": 0.99}
    trusted, _, report = tags.refine_vocabulary(pass1, domain_of, refine, bag_encoder, llm)
    assert list(trusted.tag) == ["snack"] and report["A"]["llm"] == {"merges": 2}
    gated, merges, report = tags.refine_vocabulary(pass1, domain_of, {**refine, "llm_merge_similarity": 0.3}, bag_encoder, llm)
    assert sorted(gated.tag) == ["cookie", "snack"] and merges["A"] == {"snacks bar": "snack"}
    assert report["A"]["llm"] == {"merges": 1, "below_similarity": 1}


class FakeClient:
    """An OpenAI-like client whose chat.completions.create is the subclass's `create`."""

    def __init__(self):
        self.chat = SimpleNamespace(completions=SimpleNamespace(create=self.create))

    @staticmethod
    def completion(content: str, usage=None) -> SimpleNamespace:
        """A chat completion with one finished choice."""
        choice = SimpleNamespace(message=SimpleNamespace(content=content), finish_reason="stop")
        return SimpleNamespace(choices=[choice], usage=usage)


class FakeMergeClient(FakeClient):
    """An OpenAI-like client for the refinement prompt: names each chunk's second and first tag as synonyms
    (in that order: the stage merges into the more frequent, earlier one), adds a self-pair and a pair with a
    tag outside the chunk (both ignored), calls the last tag vague, answers out of order (random delays), and
    scripts a fault per chunk by its first tag. Records the response formats asked for."""

    def __init__(self, faults: dict[str, list[str]]):
        super().__init__()
        self.faults, self.calls, self.lock = faults, [], threading.Lock()
        self.in_flight = self.most_in_flight = 0
        self.formats = []

    def create(self, model, messages, **kwargs):
        listed = [line[2:] for line in messages[-1]["content"].splitlines() if line.startswith("- ")]
        with self.lock:
            self.calls.append(listed[0])
            self.formats.append(kwargs.get("response_format"))
            fault = self.faults.get(listed[0], []).pop(0) if self.faults.get(listed[0]) else "ok"
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        time.sleep(0.01 + random.random() * 0.02)
        with self.lock:
            self.in_flight -= 1
        if fault == "http_503":
            request = httpx.Request("POST", "http://127.0.0.1/v1/chat/completions")
            raise openai.APIStatusError("busy", response=httpx.Response(503, request=request), body=None)
        answer = {"synonyms": [[listed[1], listed[0]], [listed[2], listed[2]], [listed[2], "not in the chunk"]],
                  "vague": [listed[-1]]}
        return self.completion('{"synonyms": [' if fault == "malformed" else json.dumps(answer))


def test_llm_refinement_is_concurrent_retried_ordered_and_cached(tmp_path):
    vocabulary = [f"tag {i:02d}" for i in range(40)]  # 10 chunks of 4
    serial = FakeMergeClient({})
    expected = tags.llm_refine(lambda: serial, "m", None, "Food", vocabulary, 4, Settings(concurrency=1),
                               TagCache(tmp_path / "serial.jsonl"))
    assert expected[0] == {f"tag {i + 1:02d}": f"tag {i:02d}" for i in range(0, 40, 4)}
    assert expected[1] == {f"tag {i + 3:02d}" for i in range(0, 40, 4)}  # the vague ones
    assert expected[2] == {"chunks": 10, "failed_chunks": 0, "merges": 10, "drops": 10, "trivial": 10, "ignored": 10}
    schema = serial.formats[0]["json_schema"]["schema"]  # a bounded answer over the chunk's own tags
    assert schema["properties"]["vague"]["items"]["enum"] == vocabulary[:4]
    assert schema["properties"]["synonyms"]["maxItems"] == tags.REFINE_MAX_PAIRS

    faults = {"tag 08": ["http_503", "http_503"], "tag 16": ["malformed"]}
    client = FakeMergeClient(faults)
    settings = Settings(concurrency=4, max_retries=4, backoff_s=0.0)
    merges, drops, counts = tags.llm_refine(lambda: client, "m", None, "Food", vocabulary, 4, settings,
                                            TagCache(tmp_path / "refine.jsonl"))
    assert serial.most_in_flight == 1 and client.most_in_flight > 1  # the slots are filled
    assert client.calls.count("tag 08") == 3  # two transient 503s, then the answer
    failed = [r for r in TagCache(tmp_path / "refine.jsonl").entries.values() if r["status"] == "failed"]
    assert [r["reason"] for r in failed] == ["malformed_json"]  # recorded with its reason, not retried
    assert counts["chunks"] == 10 and counts["failed_chunks"] == 1 and "tag 17" not in merges  # the bad answer's chunk
    assert merges == {k: v for k, v in expected[0].items() if k != "tag 17"}

    def no_client():
        raise AssertionError("every chunk is cached: no client may be made")

    # the failed chunk is asked again on the next run, the others come from the cache
    again = FakeMergeClient({})
    merges2, _, counts2 = tags.llm_refine(lambda: again, "m", None, "Food", vocabulary, 4, settings,
                                          TagCache(tmp_path / "refine.jsonl"))
    assert again.calls == ["tag 16"] and merges2 == expected[0] and counts2["failed_chunks"] == 0
    assert tags.llm_refine(no_client, "m", None, "Food", vocabulary, 4, settings, TagCache(tmp_path / "refine.jsonl"))[0] == expected[0]


class FakeRetagClient(FakeClient):
    """An OpenAI-like client for the pass-2 prompt: answers with tags of the item's list (and one outside it);
    titles with "Broken" get malformed JSON every time, titles with "Short" a single tag."""

    def __init__(self):
        super().__init__()
        self.calls, self.schemas = [], []

    def create(self, model, messages, **kwargs):
        prompt = messages[-1]["content"]
        title = prompt.split("title: ")[1].splitlines()[0]
        choices = prompt.split("List: ")[1].split(", ")
        self.calls.append(title)
        self.schemas.append(kwargs["response_format"]["json_schema"]["schema"])
        if "Broken" in title:
            content = '["half'
        elif "Short" in title:
            content = json.dumps(choices[:1])
        else:
            content = json.dumps([choices[2], "not in the list", choices[0], choices[1]])
        return self.completion(content, usage=SimpleNamespace(prompt_tokens=100, completion_tokens=12))


PASS2_VOCAB = tags.pd.DataFrame({"domain": ["A"] * 5 + ["B"] * 4,
                                 "tag": ["snack", "cookie", "dark chocolate", "candy", "tea", "skillet", "cookware", "cast iron", "pan"],
                                 "count": 1, "shared": False})
PASS2_ITEMS = [Item(0, "Food", "Chocolate Cookie Snack", ""), Item(1, "Food", "Dark Chocolate Bar", "rich cocoa"),
               Item(2, "Food", "Broken Candy", ""), Item(3, "Food", "Short Tea Tin", ""), Item(4, "Kitchen", "Cast Iron Pan", "")]
PASS2_DOMAIN_OF = {0: "A", 1: "A", 2: "A", 3: "A", 4: "B"}
PASS2_MAPPED = {0: [("cookie", 1), ("snack", 2), ("dark chocolate", 3)], 1: [("dark chocolate", 2)], 2: [("candy", 1)],
                3: [("tea", 1), ("snack", 4)]}  # item 4 failed pass 1: no tags at all
PASS2_FILL = {"mode": "fill", "min_tags": 3, "shortlist": 4}
PASS2_SETTINGS = Settings(k=3, max_retries=1, backoff_s=0.0)


def run_pass2(client, cache_path, vocab=PASS2_VOCAB, pass2=PASS2_FILL):
    """llm_pass2 over the items above through `client`, with the answer cache at `cache_path`."""
    return tags.llm_pass2(PASS2_ITEMS, PASS2_DOMAIN_OF, vocab, PASS2_MAPPED, bag_encoder, pass2, lambda: client, "m", None,
                          PASS2_SETTINGS, TagCache(cache_path), progress=False)


def test_llm_pass2_fills_under_tagged_items_from_the_vocabulary(tmp_path):
    client, mapped = FakeRetagClient(), PASS2_MAPPED
    out, report = run_pass2(client, tmp_path / "pass2.jsonl")
    assert sorted(set(client.calls)) == ["Broken Candy", "Cast Iron Pan", "Dark Chocolate Bar", "Short Tea Tin"]  # not item 0
    assert out[0] == mapped[0]
    # the shortlist: the mapped tags first, then the vocabulary tags of the item's own domain nearest its text
    lists = tags.shortlists(PASS2_ITEMS[1:2], PASS2_DOMAIN_OF, PASS2_VOCAB, mapped, bag_encoder, 4)
    assert lists[1][0] == "dark chocolate" and len(lists[1]) == 4 and set(lists[1]) <= set(PASS2_VOCAB.tag[PASS2_VOCAB.domain == "A"])
    assert out[1] == [(lists[1][2], 1), (lists[1][0], 2), (lists[1][1], 3)]  # ranked as answered; the unlisted tag dropped
    assert {t for t, _ in out[4]} <= {"skillet", "cookware", "cast iron", "pan"} and len(out[4]) == 3
    assert out[2] == mapped[2] and out[3] == mapped[3]  # a failed request, and a shorter answer, keep the mapping
    schema = client.schemas[0]
    assert schema["items"]["enum"] and schema["minItems"] == 3 and schema["maxItems"] == 3
    assert report["asked"] == 4 and report["answered"] == 3 and report["failed"] == 1 and report["replaced"] == 2
    assert report["kept_mapping"] == 1 and report["failure_reasons"] == {"malformed_json": 1}
    assert report["tokens_out"] == 3 * 12


def test_llm_pass2_asks_again_only_what_failed_or_changed(tmp_path):
    cache = tmp_path / "pass2.jsonl"
    out, report = run_pass2(FakeRetagClient(), cache)
    # a re-run asks only the failed item again and gives the same tags and report
    again = FakeRetagClient()
    assert run_pass2(again, cache) == (out, report) and set(again.calls) == {"Broken Candy"}
    # a changed vocabulary changes the shortlists, and exactly the items whose list changed are asked again
    grown = tags.pd.concat([PASS2_VOCAB, tags.pd.DataFrame({"domain": ["B"], "tag": ["iron pan"], "count": 1, "shared": False})])
    third = FakeRetagClient()
    run_pass2(third, cache, vocab=grown)
    assert set(third.calls) == {"Broken Candy", "Cast Iron Pan"}
    # "retag" asks for every item
    fourth = FakeRetagClient()
    run_pass2(fourth, tmp_path / "all.jsonl", pass2={**PASS2_FILL, "mode": "retag"})
    assert len(set(fourth.calls)) == 5


def test_pass2_settings_are_validated():
    assert tags.pass2_settings({"kind": "llm"}, "x", 5)["mode"] == "map"
    assert tags.pass2_settings({"pass2": {"mode": "fill"}}, "x", 5) == {"mode": "fill", "min_tags": 3, "shortlist": 20}
    with pytest.raises(Exception, match=r"tags\.sources\.x\.pass2\.mode must be one of"):
        tags.pass2_settings({"pass2": {"mode": "guess"}}, "x", 5)
    with pytest.raises(Exception, match=r"tags\.sources\.x\.pass2: unknown key\(s\) \['size'\]"):
        tags.pass2_settings({"pass2": {"size": 3}}, "x", 5)
    with pytest.raises(Exception, match=r"pass2\.shortlist must be an integer >= 5"):
        tags.pass2_settings({"pass2": {"shortlist": 4}}, "x", 5)


def test_external_tags_are_read_and_bad_rows_counted(tmp_path):
    path = tmp_path / "ext.tsv"
    path.write_text('item_id\ttags_json\n0\t["Arts", "Crafts"]\n1\tnot json\n2\t[]\n')
    found, failures = tags.read_external(path, 3)
    assert found == {0: ["arts", "crafts"]} and failures == {1: "malformed_json", 2: "no_valid_tag"}
    path.write_text('item_id\ttags_json\n7\t["a"]\n')
    with pytest.raises(Exception, match=r"ext\.tsv:2: item id 7 outside 0\.\.2"):
        tags.read_external(path, 3)


@pytest.mark.slow
def test_tags_stage_through_an_endpoint_never_leaks_the_key(tmp_path, root):
    repo = tmp_path / "repo"
    copy_worktree(root, repo, skip=("reports/", "data/tags", "data/runs"))
    params = yaml.safe_load((repo / "profiles" / "default.yaml").read_text())
    params["tags"]["limit_items"] = 6
    params["tags"]["out_dir"] = "data/tags-limited"  # a limited run never writes over data/tags
    params["tags"]["refine"].update(min_count=1, llm_chunk=10)
    params["tags"]["sources"]["food-kitchen"]["pass2"] = {"mode": "fill", "min_tags": 5, "shortlist": 6}
    params = profiles.derive(params)  # what `tema profile` adds: the keys dvc.yaml iterates over
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "TEMA_PROGRESS": "0",
           "OPENAI_API_KEY": CANARY, "TEMA_CACHE_DIR": str(tmp_path / "cache")}
    with StubLLM(faults={"Oatmeal": ["http_500"]}) as stub:
        env["OPENAI_BASE_URL"] = stub.base_url
        proc = subprocess.run(["dvc", "repro", "tags@food-kitchen"], cwd=repo, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert stub.requests and all(h.get("authorization") == f"Bearer {CANARY}" for h in stub.headers)
        n_requests = len(stub.requests)
        # forcing the stage again re-uses every cached answer: no request reaches the endpoint
        proc = subprocess.run(["dvc", "repro", "-f", "tags@food-kitchen"], cwd=repo, env=env, capture_output=True, text=True)
        assert proc.returncode == 0 and len(stub.requests) == n_requests
    out = repo / "data" / "tags-limited" / "food-kitchen"
    item_tags = tags.pd.read_csv(out / "item_tags.tsv", sep="\t", quoting=3)
    assert len(item_tags) == 12  # 6 items per domain
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["endpoint"] == "OPENAI_BASE_URL" and provenance["refinement"]["A"]["llm"]["chunks"] >= 1
    assert provenance["pass2"]["mode"] == "fill" and provenance["pass2"]["answered"] >= 1, provenance["pass2"]  # re-tagged
    assert any("\nList: " in r["messages"][-1]["content"] for r in stub.requests)
    scanned = [p for p in repo.rglob("*") if p.is_file() and not {".git", "tests"} & set(p.relative_to(repo).parts)]
    scanned += [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert any(p.name == "dvc.lock" for p in scanned) and any(p.suffix == ".html" for p in scanned)
    leaks = [str(p) for p in scanned if CANARY.encode() in p.read_bytes()]
    assert not leaks, f"the API key leaked into {leaks}"
    assert CANARY not in proc.stdout + proc.stderr


@pytest.mark.slow
def test_short_real_run_through_the_embedded_server(tmp_path, monkeypatch, root):
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    params = config.load_params(root / "profiles" / "default.yaml")
    params["llm"]["embedded"].update(n_parallel=2, threads=2)
    items = [Item(0, "Grocery & Gourmet Food", "Twinings English Breakfast Tea, 100 Tea Bags", ""),
             Item(1, "Home & Kitchen", "Pyrex Glass Measuring Cup, 2 Cup", ""),
             Item(2, "Home & Kitchen", "OXO Good Grips Salad Spinner", "")]
    settings = tags.settings_from_params(params)
    with llm.LazyEndpoint(params, settings.timeout_s) as ep:
        found, failures, acct = tag_items(items, ep.client, ep.model, ep.model_sha256, settings,
                                          TagCache(tmp_path / "c.jsonl"), progress=False)
        process_alive = ep.started is not None
    assert process_alive and not failures and len(found) == 3
    assert all(1 <= len(t) <= 5 for t in found.values())
    assert acct.tokens_out > 0 and acct.requests == 3
    assert any("tea" in tag for tag in found[0])
    # the server is gone: nothing listens on its port any more
    with pytest.raises(OSError):
        urllib.request.urlopen(ep.started.base_url.removesuffix("/v1") + "/health", timeout=2)


def test_a_further_named_source_is_tagged_beside_the_datasets_own_and_records_its_name(tmp_path, monkeypatch, root):
    import shutil

    from conftest import describe_datasets, food_kitchen_files, write_raw

    shutil.copy(root / "dvc.yaml", tmp_path / "dvc.yaml")
    write_raw(tmp_path / "data" / "raw", "food-kitchen", food_kitchen_files())
    describe_datasets(tmp_path)
    words = ["snack", "drink", "pan", "knife"]
    lines = ["item_id\ttags_json"] + [f"{i}\t{json.dumps([words[i % 2 + 2 * (i >= 3)], 'everyday'])}" for i in range(9)]
    (tmp_path / "large.tsv").write_text("\n".join(lines) + "\n")
    params = yaml.safe_load((root / "profiles" / "default.yaml").read_text())
    params["tags"]["refine"].update(min_count=1, llm_merge=False)
    params["tags"]["other_sources"] = {"food-kitchen": {"large": {"kind": "external", "file": "large.tsv",
                                                                  "model": "a-large-model", "pass2": {"mode": "map"}}}}
    params = profiles.derive(params)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    summary = tags.run("food-kitchen", config.load_params(), "large")
    out = tmp_path / "data" / "tags" / "food-kitchen" / "large"
    assert summary["provenance"]["source_name"] == "large" and summary["provenance"]["model"] == "a-large-model"
    assert {p.name for p in out.iterdir()} >= {"item_tags.tsv", "vocabulary.tsv", "provenance.json", "accounting.json"}
    assert not (tmp_path / "data" / "tags" / "food-kitchen" / "item_tags.tsv").exists()  # the dataset's own source untouched
    with pytest.raises(config.ParamsError, match=r"tags\.other_sources\.food-kitchen\.small: missing; food-kitchen's tag "
                                                 r"sources are \['default', 'large'\]"):
        tags.run("food-kitchen", config.load_params(), "small")
    # the same from the command line (`tema tags generate DATASET --all --source NAME`), into the same folder
    shutil.rmtree(out)
    assert cli.main(["tags", "generate", "food-kitchen", "--all", "--source", "large"]) == 0
    assert json.loads((out / "provenance.json").read_text())["source_name"] == "large"
    assert not (tmp_path / "data" / "tags" / "food-kitchen" / "item_tags.tsv").exists()
    with pytest.raises(SystemExit) as stop:  # --source names what --all writes: alone it would be silently ignored
        cli.main(["tags", "generate", "food-kitchen", "--source", "large"])
    assert stop.value.code == 2


def test_a_sources_own_llm_settings_reach_only_that_source(tmp_path, monkeypatch, root):
    """tags.sources.<dataset>.llm lays a model and settings over the llm section for that source alone: the endpoint
    is asked with them, and the schema checks them as it checks llm (a NaN or an unknown key is refused)."""
    import shutil

    from conftest import describe_datasets, food_kitchen_files, write_raw

    from tema import schema

    shutil.copy(root / "dvc.yaml", tmp_path / "dvc.yaml")
    write_raw(tmp_path / "data" / "raw", "food-kitchen", food_kitchen_files())
    describe_datasets(tmp_path)
    params = yaml.safe_load((root / "profiles" / "default.yaml").read_text())
    params["tags"]["sources"]["food-kitchen"]["llm"] = {"model": "the-sources-model", "temperature": 0.5}
    params = profiles.derive(params)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TEMA_CACHE_DIR", str(tmp_path / "cache"))
    with StubLLM() as stub:
        monkeypatch.setenv("OPENAI_BASE_URL", stub.base_url)
        tags.generate("food-kitchen", config.load_params(), limit=2)
    assert stub.requests and {(r["model"], r["temperature"]) for r in stub.requests} == {("the-sources-model", 0.5)}
    assert config.with_source_llm(params, params["tags"]["sources"]["art-office"])["llm"] == params["llm"]
    for bad, message in ((float("nan"), "expected a finite number"), ("hot", "expected a")):
        params["tags"]["sources"]["food-kitchen"]["llm"]["temperature"] = bad
        with pytest.raises(config.ParamsError, match=r"tags\.sources\.food-kitchen\.llm\.temperature: " + message):
            schema.validate(params)
    params["tags"]["sources"]["food-kitchen"]["llm"] = {"modle": "typo"}
    with pytest.raises(config.ParamsError, match=r"tags\.sources\.food-kitchen\.llm\.modle: unknown key"):
        schema.validate(params)
