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
    profile = yaml.safe_load(out.split("(`extends: smoke` instead for a minutes-long check, which runs in the workspace "
                                       "build/smoke/):")[1].split("then:")[0])
    # no tag source yet: TEMA runs as its ablation without tags, and is the table's reference
    assert profile["datasets"] == ["mine"] and profile["extends"] == "default"
    assert profile["evaluations"]["mine"]["models"] == ["popularity", "gru4rec", "sasrec", "sasrec-text", "c2dsr", "tema-no-tags"]
    assert profile["evaluations"]["mine"]["reference"] == "tema-no-tags"
    assert cli.main(["dataset", "add", "Bad Name", str(tmp_path / "incoming")]) == 2
    assert "expected a dataset name of letters, digits" in capsys.readouterr().err


# -- dataset.yaml: keys given twice, unknown keys, domains too small to evaluate -----------------------------

def test_a_key_given_twice_in_dataset_yaml_is_refused_naming_the_file_the_key_and_its_line(tmp_path):
    folder = write(tmp_path / "raw" / "mine")
    text = yaml.safe_dump(SPEC, sort_keys=False)
    (folder / "dataset.yaml").write_text(text + "split:\n  rule: time\n")  # the last would win: another split rule
    line = len(text.splitlines()) + 1
    first = next(n for n, row in enumerate(text.splitlines(), 1) if row.startswith("split:"))
    with pytest.raises(DataError) as caught:
        datasets.spec("mine", tmp_path / "raw")
    assert str(caught.value) == (f"{folder / 'dataset.yaml'}:{line}: duplicate key 'split' (first at line {first}); expected "
                                 "each key once in a mapping (YAML would keep the last one silently; DVC refuses such a file)")
    (folder / "dataset.yaml").write_text(text.replace("  A:\n    id: book\n", "  A:\n    id: book\n    id: film\n"))
    with pytest.raises(DataError, match=r"dataset\.yaml:\d+: duplicate key 'id'"):  # at any level
        datasets.spec("mine", tmp_path / "raw")


def test_an_unknown_top_level_key_in_dataset_yaml_is_refused_naming_the_known_keys(tmp_path):
    folder = write(tmp_path / "raw" / "mine")
    text = yaml.safe_dump(SPEC, sort_keys=False)
    (folder / "dataset.yaml").write_text(text + "splt:\n  rule: time\n")  # a typo: the split rule would be silently the default
    with pytest.raises(DataError) as caught:
        datasets.read_raw("mine", tmp_path / "raw")
    assert str(caught.value) == (f"{folder / 'dataset.yaml'}:{len(text.splitlines()) + 1}: unknown key 'splt'; expected one of "
                                 "['format', 'description', 'domains', 'source', 'items', 'interactions', 'sequences', 'split'] "
                                 "(format 'generic', docs/datasets.md)")


def test_every_committed_dataset_yaml_passes(tmp_path):
    for spec in sorted((ROOT / "data" / "raw").glob("*/dataset.yaml")):
        datasets.spec(spec.parent.name, ROOT / "data" / "raw")
    for spec in sorted((ROOT / "examples").glob("*/dataset.yaml")):
        add(spec.parent.name, spec.parent, tmp_path / "raw")


ONE_FILM = "item,kind,title,blurb\nb1,book,Dune,sand\nb2,book,Emma,\nf1,film,Alien,space\nb3,book,Ulysses,\n"


def test_a_domain_too_small_to_evaluate_is_refused_when_the_dataset_is_added(tmp_path):
    """prepare ranks each target among evaluate.n_candidates (>= 1) other items of its domain: a domain of one item
    suits no setting, and used to be refused only by prepare, with a message no setting satisfies."""
    folder = source_folder(tmp_path)
    (folder / "items.csv").write_text(ONE_FILM)
    (folder / "events.csv").write_text("user,item,when\nu1,b1,1\nu1,f1,2\nu1,b2,3\nu1,b3,4\n")
    with pytest.raises(DataError) as caught:
        add("mine", folder, tmp_path / "raw")
    assert str(caught.value) == (f"{folder / 'dataset.yaml'}: items.file: domain B ('film') has 1 item; expected at least 2 "
                                 "items in each domain (evaluation ranks each target among evaluate.n_candidates >= 1 other "
                                 "items of its domain; the default 999 needs 1000)")
    assert not (tmp_path / "raw").exists() or not any((tmp_path / "raw").iterdir())
    with pytest.raises(DataError, match=r"items\.file: domain B \('film'\) has no item; expected at least 2"):
        read(tmp_path, files={"items.csv": ONE_FILM.replace("f1,film,Alien,space\n", ""), "events.csv": "user,item,when\n"})


# -- tema dataset add: errors name the user's files; a kill, an error or a full disk leave data/raw whole ------

def test_errors_while_adding_name_the_users_file_and_line_not_the_staging_copy(tmp_path):
    folder, raw = source_folder(tmp_path), tmp_path / "raw"
    (folder / "events.csv").write_text(EVENTS + "u4,x9,7\n")
    with pytest.raises(DataError) as caught:
        add("mine", folder, raw)
    assert str(caught.value).startswith(f"{folder / 'events.csv'}:12: unknown item 'x9'; expected an id of the items file")
    (folder / "events.csv").write_text(EVENTS)
    (folder / "dataset.yaml").write_text(yaml.safe_dump({**SPEC, "split": {"rule": "random"}}))
    with pytest.raises(DataError) as caught:
        add("mine", folder, raw)
    assert str(caught.value).startswith(f"{folder / 'dataset.yaml'}: split.rule: expected one of")
    (folder / "dataset.yaml").write_text(yaml.safe_dump({**SPEC, "source": "the web"}))
    with pytest.raises(DataError, match=r"incoming/dataset\.yaml: source: expected a mapping"):
        add("mine", folder, raw)
    gz = tmp_path / "gz"
    shutil.copytree(folder, gz)
    (gz / "dataset.yaml").write_text(yaml.safe_dump({**SPEC, "items": {**SPEC["items"], "file": "items.csv.gz"}}))
    (gz / "items.csv.gz").write_bytes(gzip.compress((ITEMS + "f3,film\n").encode()))
    with pytest.raises(DataError) as caught:
        add("mine", gz, raw)
    assert str(caught.value) == f"{gz / 'items.csv.gz'}:7: expected 4 fields as in the header, got 2"
    assert not any(raw.iterdir())


@pytest.fixture
def dead_pid() -> int:
    """The id of a process that has ended (what a killed `tema dataset add` leaves in its folders' names)."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", ""])
    proc.wait()
    return proc.pid


def added(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    """data/raw with 'mine' vendored, and its files."""
    raw = tmp_path / "raw"
    add("mine", source_folder(tmp_path), raw)
    return raw, {p.name: p.read_bytes() for p in (raw / "mine").iterdir()}


def contents(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_a_replace_killed_between_its_renames_is_undone_by_the_next_reader(tmp_path, dead_pid):
    raw, before = added(tmp_path)
    # killed after `mine` was renamed aside and before the new folder took its place: no data/raw/mine at all
    (raw / "mine").rename(raw / f".mine.old-{dead_pid}")
    (raw / f".mine.add-{dead_pid}").mkdir()
    (raw / f".mine.add-{dead_pid}" / "dataset.yaml").write_text("format: generic\n")
    assert datasets.known(raw) == ["mine"]  # `tema dataset list`: the old dataset is back
    assert contents(raw / "mine") == before
    assert sorted(p.name for p in raw.iterdir()) == ["mine"]
    # the same state met by a reader (prepare, the schema) or by the next `tema dataset add`
    for reader_of_raw in (lambda: datasets.read_raw("mine", raw), lambda: add("other", tmp_path / "incoming", raw)):
        (raw / "mine").rename(raw / f".mine.old-{dead_pid}")
        reader_of_raw()
        assert contents(raw / "mine") == before and not [p for p in raw.iterdir() if p.name.startswith(".")]


def test_a_replace_killed_after_its_renames_leaves_the_new_dataset_and_no_old_copy(tmp_path, dead_pid):
    raw, before = added(tmp_path)
    old = raw / f".mine.old-{dead_pid}"
    shutil.copytree(raw / "mine", old)
    (old / "dataset.yaml").write_text("# the replaced one\n")
    assert datasets.known(raw) == ["mine"] and contents(raw / "mine") == before and not old.exists()


def test_staging_folders_are_no_datasets_and_those_of_a_running_add_are_left_alone(tmp_path, monkeypatch, capsys):
    raw, before = added(tmp_path)
    running = raw / ".mine.add-1"  # pid 1 runs: an add in progress, whose folder is not to be touched
    shutil.copytree(raw / "mine", running)
    assert datasets.known(raw) == ["mine"] and running.is_dir()
    # the CLI lists every dataset, where the staging folder's description used to fail the listing
    repo = tmp_path / "repo"
    shutil.copytree(raw, repo / "data" / "raw", symlinks=True)
    (repo / "dvc.yaml").write_text("stages: {}\n")
    (repo / "params.yaml").write_text("{}\n")
    monkeypatch.chdir(repo)
    assert cli.main(["dataset", "list"]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()] == ["mine"]


def test_an_error_at_the_second_rename_puts_the_old_dataset_back(tmp_path, monkeypatch):
    raw, before = added(tmp_path)
    folder = tmp_path / "incoming"
    (folder / "events.csv").write_text(EVENTS.replace("u3,b1,5", "u3,b2,5"))
    real = Path.rename

    def rename(self, target):
        if self.name.startswith(".mine.add-"):  # the new folder into place
            raise KeyboardInterrupt("Ctrl-C between the renames")
        return real(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        add("mine", folder, raw, replace=True)
    assert contents(raw / "mine") == before and sorted(p.name for p in raw.iterdir()) == ["mine"]
    monkeypatch.setattr(Path, "rename", real)
    add("mine", folder, raw, replace=True)
    assert contents(raw / "mine") != before and sorted(p.name for p in raw.iterdir()) == ["mine"]
