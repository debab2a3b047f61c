"""Faults of the LLM endpoint and of the answer cache: Retry-After, bodies that are not chat completions
(or not UTF-8), an endpoint that cannot be reached (the run stops, nothing is cached for it), the cache's
run lock, torn and malformed cache lines said on load (and never served), answers stored capped in size,
and no piece of the API key in any message or file."""

from __future__ import annotations

import email.utils
import json
import os
import subprocess
import sys
import time
from dataclasses import replace

import pytest
from stub_llm import GARBAGE, HUGE_CHARS, StubLLM
from test_tagging import FOOD, cache_lines, client_for, closed_port_url, items

from tema import llm, tagging, tags
from tema.tagging import EndpointError, Settings, TagCache, tag_items

FAST = Settings(timeout_s=2.0, max_retries=3, backoff_s=0.01, concurrency=4)


def run(url, its, cache, settings=FAST, sleep=lambda s: None, key="test"):
    return tag_items(its, lambda: client_for(url, settings, key), "stub", "sha-x", settings, cache, progress=False, sleep=sleep)


# ---------------------------------------------------------------- Retry-After


def test_retry_after_is_waited_instead_of_the_backoff_and_capped(tmp_path):
    soon = email.utils.formatdate(time.time() + 30, usegmt=True)
    faults = {"number3 ": [{"status": 429, "headers": {"Retry-After": "5"}},
                           {"status": 503, "headers": {"Retry-After": "10000"}},
                           {"status": 429, "headers": {"Retry-After": soon}},  # an HTTP date
                           {"status": 429, "headers": {"Retry-After": "whenever"}}]}  # unparseable: the backoff
    slept = []
    with StubLLM(faults=faults) as stub:
        found, failures, acct = run(stub.base_url, items(), TagCache(tmp_path / "c.jsonl"),
                                    replace(FAST, max_retries=4), sleep=slept.append)
    assert not failures and found[3][:2] == ["product", "number"]
    assert acct.retry_reasons == {"http_429": 3, "http_503": 1}
    assert slept[:2] == [5.0, 60.0]  # as asked; 10000 s capped at llm.max_retry_after_s
    assert 25 <= slept[2] <= 30 and slept[3] < 1


def test_max_retry_after_is_a_setting_outside_the_cache_key():
    assert Settings().max_retry_after_s == 60.0 and "max_retry_after_s" not in Settings().cache_part()
    key = tagging.cache_key("m", None, FOOD, "t", "", Settings())
    assert tagging.cache_key("m", None, FOOD, "t", "", Settings(max_retry_after_s=1.0)) == key
    assert tags.settings_from_params({"llm": {"model": "m", "max_retry_after_s": 2.5}}).max_retry_after_s == 2.5


# ---------------------------------------------------------------- bodies that are not chat completions


@pytest.mark.parametrize("fault", ["garbage", "not_completion", {"status": 200, "body": "<html>sent as json</html>"}])
def test_an_unparseable_200_is_retried_as_bad_response(tmp_path, fault):
    with StubLLM(faults={"number3 ": [fault, fault]}) as stub:
        found, failures, acct = run(stub.base_url, items(), TagCache(tmp_path / "c.jsonl"))
    assert not failures and found[3][:2] == ["product", "number"]
    assert acct.retry_reasons == {"bad_response": 2}


def test_an_endpoint_answering_only_garbage_stops_the_run_and_says_what_came_back(tmp_path):
    key = "sk-canary-4242424242"
    body = f"<html>oops, your key is {key}</html>"
    with StubLLM(default={"status": 200, "body": body, "headers": {"Content-Type": "text/html"}}) as stub:
        with pytest.raises(EndpointError) as err:
            run(stub.base_url, items(), TagCache(tmp_path / "c.jsonl"), key=key)
    message = str(err.value)
    assert err.value.reason == "bad_response" and message.startswith(f"{stub.base_url}: answers that are not chat completions")
    assert "<html>oops, your key is ***" in message and key not in message  # the body, never the key it echoed
    assert cache_lines(tmp_path / "c.jsonl") == []


def test_bad_response_detail_is_short_and_our_own():
    with pytest.raises(tagging.AnswerError) as err:
        tagging.completion_parts(GARBAGE.decode() * 50)
    assert err.value.reason == "bad_response" and err.value.detail.startswith("the HTTP 200 body is not a chat completion: ")
    assert len(err.value.detail) < 140


# ---------------------------------------------------------------- an endpoint that keeps failing


def test_an_endpoint_answering_only_503_stops_the_run_early(tmp_path):
    settings = replace(FAST, max_retries=1)
    with StubLLM(default="http_503") as stub:
        with pytest.raises(EndpointError) as err:
            run(stub.base_url, items(40), TagCache(tmp_path / "c.jsonl"), settings)
    assert str(err.value).startswith(f"{stub.base_url}: keeps failing (http_503 after 2 attempt(s))")
    assert len(stub.requests) < 24  # four failed in a row, four more in flight at most: the rest never went out
    assert cache_lines(tmp_path / "c.jsonl") == []


def test_answers_finished_before_the_stop_stay_cached(tmp_path):
    its = items(12)
    slow_ok = {f"number{i} ": ["ok"] for i in range(4)}
    settings = replace(FAST, concurrency=1, max_retries=0)
    with StubLLM(faults=slow_ok, default="http_503") as stub:  # the first four answer, then the endpoint is gone
        with pytest.raises(EndpointError):
            run(stub.base_url, its, TagCache(tmp_path / "c.jsonl"), settings)
    assert sorted(r["item_id"] for r in cache_lines(tmp_path / "c.jsonl")) == [0, 1, 2, 3]
    assert all(r["status"] == "ok" for r in cache_lines(tmp_path / "c.jsonl"))
    assert 4 + 4 <= len(stub.requests) <= 4 + 4 + 1  # the next item may have gone out, the rest never did


def test_a_single_item_run_that_cannot_reach_the_endpoint_raises(tmp_path):
    url = closed_port_url()
    with pytest.raises(EndpointError, match=f"^{url}: unreachable"):
        run(url, items(1), TagCache(tmp_path / "c.jsonl"))


def test_transport_failures_that_do_not_persist_leave_the_run_going_and_uncached(tmp_path):
    faults = {f"number{i} ": ["http_503"] * 10 for i in (3, 4, 5)}  # three items, never four in a row
    faults["number8 "] = ["malformed"] * 10  # and one bad answer
    with StubLLM(faults=faults) as stub:
        found, failures, acct = run(stub.base_url, items(), TagCache(tmp_path / "c.jsonl"))
    assert failures == {3: "http_503", 4: "http_503", 5: "http_503", 8: "malformed_json"} and len(found) == 8
    recorded = [(r["item_id"], r["reason"]) for r in cache_lines(tmp_path / "c.jsonl") if r["status"] == "failed"]
    assert recorded == [(8, "malformed_json")]  # the answer's fault is cached, the endpoint's is not


def test_an_unreachable_endpoint_stops_the_refinement(tmp_path):
    url = closed_port_url()
    vocabulary = [f"tag {i:02d}" for i in range(12)]
    with pytest.raises(EndpointError, match=f"^{url}: unreachable"):
        tags.llm_refine(lambda: client_for(url, FAST), "m", None, "Food", vocabulary, 3, FAST, TagCache(tmp_path / "r.jsonl"),
                        sleep=lambda s: None)
    assert cache_lines(tmp_path / "r.jsonl") == []


def test_the_refinement_shares_the_request_loop(tmp_path):
    """Retry-After honoured, a 200 that is not a chat completion retried, an endpoint that keeps failing raising."""
    vocabulary = [f"tag {i:02d}" for i in range(6)]
    slept = []
    faults = {"- tag 00\n": [{"status": 429, "headers": {"Retry-After": "7"}}, "garbage"]}
    with StubLLM(faults=faults) as stub:
        merges, drops, counts = tags.llm_refine(lambda: client_for(stub.base_url, FAST), "m", None, "Food", vocabulary, 3, FAST,
                                                TagCache(tmp_path / "r.jsonl"), sleep=slept.append)
    assert counts["failed_chunks"] == 0 and len(stub.requests) == 2 + 2 and slept[0] == 7.0 and len(slept) == 2
    with StubLLM(default="http_503") as stub:
        with pytest.raises(EndpointError, match="http_503"):
            tags.llm_refine(lambda: client_for(stub.base_url, FAST), "m", None, "Food", vocabulary + ["tag 99"], 3, FAST,
                            TagCache(tmp_path / "r.jsonl"), sleep=lambda s: None)
    assert len(cache_lines(tmp_path / "r.jsonl")) == 2  # only the two answers of the first run


# ---------------------------------------------------------------- the cache's run lock

HOLDER = """
import sys
from pathlib import Path
from tema.tagging import CacheBusyError, TagCache
try:
    TagCache(Path(sys.argv[1]))
except CacheBusyError as err:
    print(err)
    sys.exit(3)
reader = TagCache(Path(sys.argv[1]), lock=False)  # a read-only snapshot needs no lock
print("ok", len(reader.entries))
"""


def take_lock_in_another_process(path):
    return subprocess.run([sys.executable, "-c", HOLDER, str(path)], capture_output=True, text=True, timeout=120)


def test_a_second_process_cannot_write_to_a_cache_in_use(tmp_path):
    path = tmp_path / "pass1.jsonl"
    first = TagCache(path)
    first.put({"key": "k", "status": "ok", "tags": ["a"]})
    assert tagging.lock_path(path).read_text() == f"{os.getpid()}\n"
    again = TagCache(path)  # the same process, again (the stage does): no deadlock
    again.close()
    proc = take_lock_in_another_process(path)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert proc.stdout.strip() == (f"{path}: another run (pid {os.getpid()}) is writing to this answer cache; "
                                   "wait for it to finish or stop it, then run again")
    first.close()
    proc = take_lock_in_another_process(path)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok 1", proc.stdout + proc.stderr


def test_a_read_only_snapshot_takes_the_lock_to_write(tmp_path):
    path = tmp_path / "pass1.jsonl"
    with TagCache(path, lock=False) as reader:
        assert take_lock_in_another_process(path).returncode == 0  # a reader does not hold it
        reader.put({"key": "k", "status": "ok", "tags": ["a"]})  # a write takes it
        assert take_lock_in_another_process(path).returncode == 3
    assert take_lock_in_another_process(path).returncode == 0


def test_the_lock_file_is_not_committed(root):
    proc = subprocess.run(["git", "check-ignore", "-q", "data/tags-cache/food-kitchen/pass1.jsonl.lock"], cwd=root)
    assert proc.returncode == 0


# ---------------------------------------------------------------- what is said and stored


def test_torn_and_bad_lines_are_said_on_load(tmp_path, capsys):
    path = tmp_path / "c.jsonl"
    good = [json.dumps({"key": k, "status": "ok", "tags": ["x"]}) for k in "ab"]
    path.write_text(f"{good[0]}\n{{\"key\": \"c\", \"sta")
    with TagCache(path) as cache:
        assert (cache.bad_lines, cache.torn_lines) == (0, 1)
    assert capsys.readouterr().err == f"{path}: cut 1 torn last line; their items are asked again\n"
    with TagCache(path) as cache:  # cut: nothing more to say
        assert (cache.bad_lines, cache.torn_lines) == (0, 0)
    assert capsys.readouterr().err == ""
    path.write_text(f"{good[0]}\nnot json\n{{\"no key\": 1}}\n\n{good[1]}\n{{\"key\": \"c\", \"sta")
    with TagCache(path) as cache:
        assert (cache.bad_lines, cache.torn_lines, sorted(cache.entries)) == (3, 1, ["a", "b"])
    assert capsys.readouterr().err == (f"{path}: skipped 3 malformed line(s), the first at line 2 (not JSON), and cut 1 "
                                       "torn last line; their items are asked again\n")


def test_malformed_cache_records_are_counted_never_served_and_asked_again(tmp_path, capsys):
    """A record that is not what TagCache writes (an ok one without tags, tags that are not a list of strings, a
    number that is text...) neither crashes the run nor is served: it is counted, said, and its item asked again."""
    its = items(9)
    keys = [tagging.pass1_request(item, "stub", "sha-x", FAST).key for item in its]
    bad = [{"status": "ok"}, {"status": "ok", "tags": "crunchy"}, {"status": "ok", "tags": None},
           {"status": "ok", "tags": [1, 2]}, {"status": "ok", "tags": []},
           {"status": "ok", "tags": ["a"], "tokens_in": "many"}, {"status": "done", "tags": ["a"]},
           {"status": "failed"}]
    records = [{"key": key, "item_id": i, **fields} for i, (key, fields) in enumerate(zip(keys, bad))]
    records.append({"key": keys[8], "item_id": 8, "status": "ok", "tags": ["cached"], "tokens_in": 3, "tokens_out": 2})
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    cache = TagCache(path)
    assert (cache.bad_lines, cache.first_bad, sorted(cache.entries)) == (8, (1, "an ok record without tags"), [keys[8]])
    assert capsys.readouterr().err == (f"{path}: skipped 8 malformed line(s), the first at line 1 (an ok record "
                                       "without tags); their items are asked again\n")
    with StubLLM() as stub:
        found, failures, acct = run(stub.base_url, its, cache)
        assert len(stub.requests) == 8  # every item but the one sound record's
    assert not failures and acct.cached == 1 and found[8] == ["cached"] and found[1][:2] == ["product", "number"]
    accounting = tags.cache_accounting(cache, its, "stub", "sha-x", FAST)
    assert accounting["malformed_cache_lines"] == 8 and accounting["answered"] == 9
    cache.close()
    assert TagCache(path, lock=False).bad_lines == 8  # skipped, never cut out of the file: the new answers come after
    assert "malformed_cache_lines" not in tags.cache_accounting(TagCache(tmp_path / "sound.jsonl", lock=False), its,
                                                                "stub", "sha-x", FAST)


def test_every_record_of_the_committed_caches_is_valid_and_served_as_written(root):
    files = sorted((root / "data" / "tags-cache").glob("*/*.jsonl"))
    assert len(files) >= 6
    for path in files:
        data = path.read_bytes()  # read, never opened as a cache: nothing here may touch the committed files
        scan = tagging.scan_cache(data)
        assert (scan.bad_lines, scan.first_bad, scan.tail) == (0, None, b""), path
        plain = {r["key"]: r for r in map(json.loads, data.splitlines())}  # what the loader before validation served
        assert scan.entries == plain, path


# ---------------------------------------------------------------- bodies that are not UTF-8


@pytest.mark.parametrize("fault", ["not_utf8", "surrogate"])
def test_an_answer_that_is_not_utf8_is_an_endpoint_fault(tmp_path, fault):
    with StubLLM(faults={"number3 ": [fault, fault]}) as stub:
        found, failures, acct = run(stub.base_url, items(), TagCache(tmp_path / "c.jsonl"))
    assert not failures and found[3][:2] == ["product", "number"]
    assert acct.retry_reasons == {"bad_response": 2}  # retried like any body that is not a chat completion
    with StubLLM(default=fault) as stub:
        with pytest.raises(EndpointError) as err:
            run(stub.base_url, items(12), TagCache(tmp_path / "d.jsonl"), replace(FAST, max_retries=1))
    assert err.value.reason == "bad_response" and "\n" not in str(err.value)
    assert ("not UTF-8" if fault == "not_utf8" else "not Unicode text") in str(err.value)
    assert cache_lines(tmp_path / "d.jsonl") == []  # never cached as the items' failures


# ---------------------------------------------------------------- no piece of the API key anywhere

KEY = "sk-live-5Ab9XcQ2rT7uW1yZ3mN8pL4kJ6"


def key_pieces_in(text: str, key: str = KEY) -> list[str]:
    """The pieces of `key` of 4 characters found in `text` (any longer piece holds one)."""
    return [key[i:i + 4] for i in range(len(key) - 3) if key[i:i + 4] in text]


def completion(content: str) -> dict:
    return {"status": 200, "body": {"id": "x", "object": "chat.completion", "created": 0, "model": "stub",
                                    "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                                 "finish_reason": "stop"}]}}


def test_redaction_removes_every_piece_of_the_key(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert len(KEY) == 34
    assert llm.redact(f"body: {KEY[:30]}", KEY) == "body: ***"  # a snippet cut inside the key
    assert llm.redact(f"{KEY[-4:]} and {KEY[9:13]}!", KEY) == "*** and ***!"
    assert llm.redact(f"x{KEY}y{KEY}z", KEY) == "x***y***z"
    assert llm.redact(f"abc {KEY[:3]}", KEY) == f"abc {KEY[:3]}"  # under 4 characters: nothing of it is said
    assert llm.redact("nothing secret here", KEY) == "nothing secret here"
    assert llm.redact("not-needed and test", "not-needed", "test") == "not-needed and test"  # placeholders, no keys
    monkeypatch.setenv("OPENAI_API_KEY", KEY)  # the environment's key, without being named
    assert llm.redact(f"[{KEY[3:21]}]") == "[***]"
    text = ("lorem ipsum " * 100_000) + KEY[5:25]
    started = time.perf_counter()
    assert llm.redact(text).endswith(" ***")
    assert time.perf_counter() - started < 5


def test_an_error_snippet_cut_inside_the_key_says_none_of_it(tmp_path):
    body = "<html>" + "x" * 45 + KEY + "</html>"  # the snippet's 80 characters end 29 characters into the key
    with StubLLM(default={"status": 200, "body": body, "headers": {"Content-Type": "text/html"}}) as stub:
        with pytest.raises(EndpointError) as err:
            run(stub.base_url, items(), TagCache(tmp_path / "c.jsonl"), key=KEY)
    assert "<html>xxxx" in str(err.value) and not key_pieces_in(str(err.value))


def test_cached_failures_and_answers_say_no_piece_of_the_key(tmp_path, monkeypatch):
    monkeypatch.setattr(tagging, "MAX_STORED_CHARS", 40)
    faults = {"number3 ": [completion(json.dumps({"labels": "the key " + KEY[:20]}))] * 10,  # no_tag_list, quoted
              "number5 ": [completion(json.dumps({"tags": ["salt"], "note": "x" * 14 + KEY}))]}  # stored cut in the key
    with StubLLM(faults=faults) as stub:
        found, failures, _ = run(stub.base_url, items(6), TagCache(tmp_path / "c.jsonl"), key=KEY)
    assert failures == {3: "no_tag_list"} and found[5] == ["salt"]
    text = (tmp_path / "c.jsonl").read_text()
    assert "the key ***" in text and not key_pieces_in(text)


def test_a_huge_answer_is_parsed_whole_and_stored_cut(tmp_path):
    with StubLLM(faults={"number3 ": ["huge"]}) as stub:
        found, failures, _ = run(stub.base_url, items(4), TagCache(tmp_path / "c.jsonl"))
    assert not failures and found[3][:2] == ["product", "number"]  # parsed from the whole answer
    record = next(r for r in cache_lines(tmp_path / "c.jsonl") if r["item_id"] == 3)
    assert len(record["raw"]) < tagging.MAX_STORED_CHARS + 60 < HUGE_CHARS
    assert record["raw"].startswith('{"tags": ["product", "number"') and record["raw"].endswith("characters in all]")
    assert len((tmp_path / "c.jsonl").read_text()) < 4 * 400 + tagging.MAX_STORED_CHARS


def test_a_failure_detail_is_stored_cut(tmp_path, monkeypatch):
    monkeypatch.setattr(tagging, "MAX_DETAIL_CHARS", 30)
    with StubLLM(faults={"number1 ": ["malformed"] * 10}) as stub:
        _, failures, _ = run(stub.base_url, items(2), TagCache(tmp_path / "c.jsonl"))
    assert failures == {1: "malformed_json"}
    (record,) = [r for r in cache_lines(tmp_path / "c.jsonl") if r["status"] == "failed"]
    assert record["detail"].endswith("characters in all]") and len(record["detail"]) < 30 + 40
    assert tagging.clip("abc", 3) == "abc" and tagging.clip("abcd", 3) == "abc...[cut: 4 characters in all]"
