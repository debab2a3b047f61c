"""The generic dataset format (tema.datasets.generic, docs/datasets.md): its split rules, the errors bad input gets,
and `tema dataset add`, which vendors a folder only when it reads."""

from __future__ import annotations

import gzip
import hashlib
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

from tema import cli, datasets
from tema.data import DataError
from tema.datasets.add import add

SPEC = {
    "format": "generic",
    "description": "books and films",
    "domains": {"A": {"id": "book", "name": "Books", "guide": "genre, era, audience"},
                "B": {"id": "film", "name": "Movies & TV"}},
    "items": {"file": "items.csv", "id": "item", "domain": "kind", "title": "title", "text": "blurb"},
    "interactions": {"file": "events.csv", "user": "user", "item": "item", "timestamp": "when"},
    "split": {"rule": "leave-one-out"},
}
ITEMS = "item,kind,title,blurb\nb1,book,Dune,sand\nb2,book,Emma,\nf1,film,Alien,space\nb3,book,Ulysses,\nf2,film,Heat,\n"
# u1: b1 f1 b2 f2 b3 in time order (written shuffled); u2: three items; u3: two (too few for leave-one-out)
EVENTS = ("user,item,when\n"
          "u1,f1,2014-01-02\nu1,b1,2014-01-01\nu1,b2,2014-01-03T10:00:00\nu1,b3,2014-02-01\nu1,f2,1391126400\n"
          "u2,b2,100\nu2,f1,200\nu2,f2,300\n"
          "u3,b1,5\nu3,f1,6\n")


def write(folder: Path, spec: dict | None = None, files: dict[str, str] | None = None, sums: dict[str, str] | None = None) -> Path:
    """A dataset folder: dataset.yaml, the files gzipped, and a SHA256SUMS (`sums` replaces a file's listed content)."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {"items.csv": ITEMS, "events.csv": EVENTS} if files is None else files
    (folder / "dataset.yaml").write_text(yaml.safe_dump(SPEC if spec is None else spec))
    lines = []
    for name, text in files.items():
        (folder / f"{name}.gz").write_bytes(gzip.compress(text.encode(), mtime=0))
        lines.append(f"{hashlib.sha256((sums or {}).get(name, text).encode()).hexdigest()}  {name}")
    (folder / "SHA256SUMS").write_text("\n".join(lines) + "\n")
    return folder


def read(tmp_path: Path, spec: dict | None = None, **kwargs):
    write(tmp_path / "raw" / "mine", spec, **kwargs)
    return datasets.read_raw("mine", tmp_path / "raw")


def with_split(**rule) -> dict:
    return {**SPEC, "split": rule}


def examples(ds) -> dict[str, tuple[list[str], str]]:
    ids = ds.items["source_id"].tolist()
    return {r.user: ([ids[i] for i in r.history], ids[r.target]) for r in ds.sequences.itertuples()}


def test_items_are_ordered_by_domain_and_keep_their_ids_titles_and_text(tmp_path):
    ds = read(tmp_path)
    assert ds.items["source_id"].tolist() == ["b1", "b2", "b3", "f1", "f2"]  # domain A (book) first, file order within
    assert ds.items["domain"].tolist() == ["A", "A", "A", "B", "B"] and ds.items["local_id"].tolist() == [0, 1, 2, 0, 1]
    assert ds.items["title"].tolist()[:2] == ["Dune", "Emma"] and ds.items["text"].tolist()[:2] == ["sand", ""]
    assert ds.domain_names == {"A": "Books", "B": "Movies & TV"} and ds.domain_range("B") == (3, 5)


def test_leave_one_out_sorts_by_time_and_drops_users_with_too_few_interactions(tmp_path):
    ds = read(tmp_path)
    assert examples(ds) == {
        "train:u1": (["b1", "f1"], "b2"), "valid:u1": (["b1", "f1", "b2"], "f2"), "test:u1": (["b1", "f1", "b2", "f2"], "b3"),
        "valid:u2": (["b2"], "f1"), "test:u2": (["b2", "f1"], "f2"),  # one item left to train on: no train row
    }
    assert ds.provenance["import"]["users_dropped"] == 1  # u3
    assert ds.sequences.set_index("user")["target_domain"]["test:u1"] == "A"


def test_history_keeps_the_most_recent_items(tmp_path):
    ds = read(tmp_path, with_split(rule="leave-one-out", history=2))
    got = examples(ds)
    assert got["test:u1"] == (["b2", "f2"], "b3") and got["train:u1"] == (["b1", "f1"], "b2")  # train: history + target = 3


def test_time_split_by_dates_and_by_shares(tmp_path):
    # cuts 2014-01-03 (valid) and 2014-02-01 (test): u1 trains on b1 f1, validates on its first item of the window
    # (b2; then f2, 1391126400 = 2014-01-31 UTC), is tested on b3 (Feb 1); u2 and u3 (unix times in 1970) only train
    ds = read(tmp_path, with_split(rule="time", valid_from="2014-01-03", test_from="2014-02-01"))
    got = examples(ds)
    assert got["train:u1"] == (["b1"], "f1") and got["valid:u1"] == (["b1", "f1"], "b2")
    assert got["test:u1"] == (["b1", "f1", "b2", "f2"], "b3")
    assert got["train:u2"] == (["b2", "f1"], "f2") and got["train:u3"] == (["b1"], "f1")
    assert {k for k in got if not k.startswith("train:")} == {"valid:u1", "test:u1"}
    by_share = read(tmp_path / "q", with_split(rule="time", valid_from="60%", test_from="90%"))
    assert by_share.provenance["import"]["valid_from"] < by_share.provenance["import"]["test_from"]


def test_given_splits_are_read_as_they_are(tmp_path):
    spec = {**SPEC, "split": {"rule": "given"}, "sequences": {"file": "seqs.tsv", "user": "user", "split": "split", "items": "items"}}
    spec.pop("interactions")
    seqs = "user\tsplit\titems\nu1\ttrain\tb1 f1 b2\nu1\tvalid\tb1 f1\nu1\ttest\tb1 f1 b2 f2\n"
    ds = read(tmp_path, spec, files={"items.csv": ITEMS, "seqs.tsv": seqs})
    assert examples(ds) == {"train:u1": (["b1", "f1"], "b2"), "valid:u1": (["b1"], "f1"), "test:u1": (["b1", "f1", "b2"], "f2")}


def given(seqs: str) -> tuple[dict, dict]:
    spec = {**SPEC, "split": {"rule": "given"}, "sequences": {"file": "seqs.tsv", "user": "user", "split": "split", "items": "items"}}
    spec.pop("interactions")
    return spec, {"items.csv": ITEMS, "seqs.tsv": "user\tsplit\titems\n" + seqs}


BAD = [
    # (what, spec, files, the message: file:line and what was expected)
    ("malformed line", SPEC, {"items.csv": ITEMS + "f3,film\n", "events.csv": EVENTS},
     r"items\.csv\.gz:7: expected 4 fields as in the header, got 2"),
    ("unknown item", SPEC, {"items.csv": ITEMS, "events.csv": EVENTS + "u4,x9,7\n"},
     r"events\.csv\.gz:12: unknown item 'x9'; expected an id of the items file"),
    ("unknown domain", SPEC, {"items.csv": ITEMS + "m1,music,Blue,\n", "events.csv": EVENTS},
     r"items\.csv\.gz:7: unknown domain 'music' for item 'm1'; expected one of \['book', 'film'\]"),
    ("bad timestamp", SPEC, {"items.csv": ITEMS, "events.csv": EVENTS.replace("2014-01-02", "yesterday")},
     r"events\.csv\.gz:2: expected a timestamp \(unix seconds, or an ISO 8601 date .*got 'yesterday'"),
    ("duplicate item", SPEC, {"items.csv": ITEMS + "b1,book,Dune again,\n", "events.csv": EVENTS},
     r"items\.csv\.gz:7: duplicated item id 'b1' \(first at .*items\.csv\.gz:2\)"),
    ("missing column", SPEC, {"items.csv": ITEMS.replace("blurb", "summary"), "events.csv": EVENTS},
     r"items\.csv\.gz:1: expected a header with the column\(s\) \['blurb'\]"),
    ("empty title and text", SPEC, {"items.csv": ITEMS + "f3,film,,\n", "events.csv": EVENTS},
     r"items\.csv\.gz:7: item 'f3' has an empty title and text; expected one of them, or set items\.allow_missing_text"),
    ("duplicate user", *given("u1\ttest\tb1 f1\nu1\ttest\tb2 f2\n"), r"seqs\.tsv\.gz:3: duplicated user 'u1' in split test"),
    ("empty history", *given("u1\ttrain\tb1 f1\nu1\tvalid\tb1 f1\nu1\ttest\tf2\n"),
     r"seqs\.tsv\.gz:4: an empty history \(a target alone\) for user 'u1'; expected at least 2 items"),
    ("unknown split", *given("u1\tdev\tb1 f1\n"), r"seqs\.tsv\.gz:2: expected the split 'train', 'valid' or 'test', got 'dev'"),
    ("bad rule", with_split(rule="random"), None, r"dataset\.yaml: split\.rule: expected one of \['leave-one-out', 'time', 'given'\]"),
    ("cuts reversed", with_split(rule="time", valid_from="2014-02-01", test_from="2014-01-01"), None,
     r"split\.valid_from: expected a cut before split\.test_from"),
    ("no test example", with_split(rule="time", valid_from=300, test_from=2 * 10**9), None,
     r"split: the rule 'time' leaves no test example"),
    ("one domain", {**SPEC, "domains": {"A": SPEC["domains"]["A"]}}, None, r"domains: expected a mapping with exactly the keys A and B"),
]


@pytest.mark.parametrize(("what", "spec", "files", "message"), BAD, ids=[b[0] for b in BAD])
def test_bad_input_names_the_file_the_line_and_what_was_expected(tmp_path, what, spec, files, message):
    with pytest.raises(DataError, match=message):
        read(tmp_path, spec, files=files)


def test_a_file_that_does_not_match_its_checksum_is_refused(tmp_path):
    with pytest.raises(DataError, match=r"events\.csv\.gz: checksum mismatch, expected sha256 [0-9a-f]{64} \(.*SHA256SUMS\), got"):
        read(tmp_path, sums={"events.csv": EVENTS + "u9,b1,1\n"})
    (tmp_path / "raw" / "mine" / "SHA256SUMS").write_text("")
    with pytest.raises(DataError, match=r"items\.csv\.gz: no sha256 listed for 'items\.csv' in .*mine/SHA256SUMS"):
        datasets.read_raw("mine", tmp_path / "raw")


def test_missing_text_is_allowed_only_when_declared_and_a_dataset_without_text_says_so(tmp_path):
    allowed = {**SPEC, "items": {**SPEC["items"], "allow_missing_text": True}}
    ds = read(tmp_path, allowed, files={"items.csv": ITEMS + "f3,film,,\n", "events.csv": EVENTS})
    assert ds.items.set_index("source_id").loc["f3", "title"] == ""
    bare = {**SPEC, "items": {"file": "items.csv", "id": "item", "domain": "kind"}}
    write(tmp_path / "raw" / "bare", bare)
    assert not datasets.spec("bare", tmp_path / "raw").has_text and datasets.spec("mine", tmp_path / "raw").has_text
    assert (datasets.read_raw("bare", tmp_path / "raw").items["title"] == "").all()


def test_an_unknown_dataset_says_how_to_add_one(tmp_path):
    (tmp_path / "raw").mkdir()
    with pytest.raises(DataError, match=r"unknown dataset 'nope'.*To add one: `tema dataset add <name> <folder>`"):
        datasets.read_raw("nope", tmp_path / "raw")


def source_folder(tmp_path: Path) -> Path:
    """A folder as a researcher has it: dataset.yaml and plain (not gzipped) files, no SHA256SUMS."""
    folder = tmp_path / "incoming"
    folder.mkdir()
    (folder / "dataset.yaml").write_text("# my data\n" + yaml.safe_dump(SPEC))
    (folder / "items.csv").write_text(ITEMS)
    (folder / "events.csv").write_text(EVENTS)
    return folder


def test_dataset_add_vendors_checksums_and_provenance_and_reads_the_same(tmp_path):
    folder, raw = source_folder(tmp_path), tmp_path / "raw"
    ds = add("mine", folder, raw, origin="https://example.org/books-films")
    stored = sorted(p.name for p in (raw / "mine").iterdir())
    assert stored == ["SHA256SUMS", "dataset.yaml", "events.csv.gz", "items.csv.gz"]
    sums = dict(reversed(line.split()) for line in (raw / "mine" / "SHA256SUMS").read_text().splitlines())
    assert sums == {"events.csv": hashlib.sha256(EVENTS.encode()).hexdigest(), "items.csv": hashlib.sha256(ITEMS.encode()).hexdigest()}
    described = (raw / "mine" / "dataset.yaml").read_text()
    assert "# my data" in described  # the description as written, comments kept
    assert yaml.safe_load(described)["source"]["origin"] == "https://example.org/books-films"
    again = datasets.read_raw("mine", raw)
    assert examples(again) == examples(ds) == examples(read(tmp_path / "direct"))


def test_dataset_add_leaves_nothing_behind_on_bad_input_and_replaces_only_when_asked(tmp_path):
    folder, raw = source_folder(tmp_path), tmp_path / "raw"
    (folder / "events.csv").write_text(EVENTS + "u4,x9,7\n")
    with pytest.raises(DataError, match="unknown item 'x9'"):
        add("mine", folder, raw)
    assert not raw.exists() or not any(raw.iterdir())  # no half-vendored folder, no staging leftovers
    (folder / "events.csv").write_text(EVENTS)
    add("mine", folder, raw)
    before = {p.name: p.read_bytes() for p in (raw / "mine").iterdir()}
    with pytest.raises(DataError, match=r"exists already; pass --replace"):
        add("mine", folder, raw)
    (folder / "events.csv").write_text(EVENTS.replace("2014-01-02", "later"))
    with pytest.raises(DataError, match="expected a timestamp"):
        add("mine", folder, raw, replace=True)
    assert {p.name: p.read_bytes() for p in (raw / "mine").iterdir()} == before  # the old dataset is untouched
    assert sorted(p.name for p in raw.iterdir()) == ["mine"]


def test_the_cli_adds_a_dataset_and_prints_the_profile_that_runs_it(tmp_path, monkeypatch, capsys):
    repo = tmp_path / "repo"
    (repo / "profiles").mkdir(parents=True)
    shutil.copy(ROOT / "profiles" / "default.yaml", repo / "profiles" / "default.yaml")
    (repo / "dvc.yaml").write_text("stages: {}\n")
    (repo / "params.yaml").write_text("{}\n")
    monkeypatch.chdir(repo)
    assert cli.main(["dataset", "add", "mine", str(source_folder(tmp_path)), "--origin", "a test"]) == 0
    out = capsys.readouterr().out
    assert "added data/raw/mine/: 5 items (A 3, B 2), examples train 1, valid 2, test 2" in out
    assert "1 users left out" in out
    profile = yaml.safe_load(out.split("(`extends: smoke` instead for a minutes-long check):")[1].split("then:")[0])
    # no tag source yet: TEMA runs as its ablation without tags, and is the table's reference
    assert profile["datasets"] == ["mine"] and profile["extends"] == "default"
    assert profile["evaluations"]["mine"]["models"] == ["popularity", "gru4rec", "sasrec", "sasrec-text", "c2dsr", "tema-no-tags"]
    assert profile["evaluations"]["mine"]["reference"] == "tema-no-tags"
    assert cli.main(["dataset", "add", "Bad Name", str(tmp_path / "incoming")]) == 2
    assert "expected a dataset name of letters, digits" in capsys.readouterr().err
