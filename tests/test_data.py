"""Reading the benchmarks into the canonical dataset, and the errors bad input gets."""

from __future__ import annotations

import gzip
import re

import pytest
from conftest import art_office_files, food_kitchen_files, write_raw

from tema import data, datasets

FK_ITEMS = food_kitchen_files()["items.tsv"]
AO_HEADER = b"idBefore,item_title,idAfter,item_attribute\n"


def read_tiny(tmp_path, checksums=None, **override):
    write_raw(tmp_path, "food-kitchen", food_kitchen_files(**override), checksums)
    return datasets.read_raw("food-kitchen", tmp_path)


def test_food_kitchen_real_counts(root):
    ds = datasets.read_raw("food-kitchen", root / "data" / "raw")
    assert ds.n_items == 36298
    assert ds.domain_range("A") == (0, 8661) and ds.domain_range("B") == (8661, 36298)
    counts = ds.sequences.groupby("split").size().to_dict()
    assert counts == {"train": 5472 + 38191 + 7501, "valid": 960, "test": 937}
    test = ds.split("test")
    assert test["target_domain"].value_counts().to_dict() == {"B": 637, "A": 300}
    assert ds.sequences["user"].is_unique
    assert not ds.items["title"].str.contains("&amp;").any()  # HTML-unescaped
    # the target is the last item of the upstream line, the rest is the history
    first_line = gzip.decompress((root / "data" / "raw" / "food-kitchen" / "test.txt.gz").read_bytes()).split(b"\n")[0]
    user, items = first_line.decode().split("\t")
    assert test.loc[0, "user"] == f"test:{user}"
    assert test.loc[0, "history"] + [test.loc[0, "target"]] == [int(i) for i in items.split(",")]


def test_art_office_real_counts(root):
    ds = datasets.read_raw("art-office", root / "data" / "raw")
    assert ds.n_items == 38396
    assert ds.domain_range("B") == (18639, 38396)
    assert ds.sequences.groupby("split").size().to_dict() == {"train": 16000, "valid": 1154, "test": 2000}
    # two examples per user sharing the history, one target per line
    first, second = ds.split("valid").iloc[0], ds.split("valid").iloc[1]
    assert first["user"].endswith("#1") and second["user"].endswith("#2")
    assert first["history"] == second["history"]
    assert (ds.items["text"].str.len() > 0).all()


def test_tiny_canonical_form(tmp_path):
    ds = read_tiny(tmp_path)
    assert ds.items["title"].iloc[0] == "Food & item 0"
    row = ds.split("valid").iloc[0]
    assert row["user"] == "valid:1" and row["history"] == [0, 4] and row["target"] == 2 and row["target_domain"] == "A"
    assert set(ds.split("train")["user"]) >= {"train_A:1", "train_B:1", "train_overlap:1"}


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ({"valid.txt": b"1\t0,4,2\n2 1,5,6\n"}, r"valid\.txt\.gz:2: expected 'user_id<TAB>item,item,...'"),
        ({"valid.txt": b"1\t0,x,2\n"}, r"valid\.txt\.gz:1: expected an item id \(an integer\), got 'x'"),
        ({"train_A.txt": b"1\t0,1,2\n2\t1,5,3\n"}, r"train_A\.txt\.gz:2: item id 5 outside domain A's range 0\.\.3"),
        ({"test.txt": b"1\t2,6,3\n2\t3,7,99\n"}, r"test\.txt\.gz:2: item id 99 outside the item range 0\.\.8"),
        ({"train_B.txt": b"1\t4,5,6\n2\t\n"}, r"train_B\.txt\.gz:2: empty sequence for user 2"),
        ({"test.txt": b"1\t2,6,3\n2\t7\n"}, r"test\.txt\.gz:2: a target with no history for user 2"),
        ({"valid.txt": b"1\t0,4,2\n1\t1,5,6\n"}, r"valid\.txt\.gz:2: duplicated user 1 \(first on line 1\)"),
        ({"train_overlap.txt": b"1\t0,4,1,5\n2\t0,\xff\xfe,1\n"}, r"train_overlap\.txt\.gz:2: expected UTF-8 text"),
        ({"num.txt": b"4\n"}, r"num\.txt\.gz: expected two item counts"),
        ({"items.tsv": FK_ITEMS.replace(b"2\tA\t2\tASIN2", b"1\tA\t1\tASIN1")},
         r"items\.tsv\.gz:4: duplicated item id 1 \(first seen at \S+items\.tsv\.gz:3\)"),
        ({"items.tsv": FK_ITEMS.removesuffix(b"8\tB\t4\tASIN8\tKitchen item 8\n")},
         r"items\.tsv\.gz:9: expected item ids 0\.\.8, the items end after id 7"),
    ],
)
def test_bad_input_names_file_line_and_expectation(tmp_path, override, pattern):
    with pytest.raises(data.DataError, match=pattern):
        read_tiny(tmp_path, **override)


def test_checksum_mismatch(tmp_path):
    files = food_kitchen_files()
    with pytest.raises(data.DataError, match=re.escape("test.txt.gz: checksum mismatch, expected sha256")):
        read_tiny(tmp_path, checksums={"test.txt": files["test.txt"] + b"changed"})


def test_art_office_bad_token_and_duplicate(tmp_path, root):
    items_a = b"idBefore,item_title,idAfter,item_attribute\n0,a,0,x\n1,b,1,x\n"
    items_b = b"idBefore,item_title,idAfter,item_attribute\n0,c,2,y\n1,d,3,y\n"
    good = b"0\t2\t0|0|0\t2|1|1\t1|2|2\t\n0\t2\t0|0|0\t2|1|1\t3|2|2\t\n"
    files = {"item_listA_F.csv": items_a, "item_listO_AA_F.csv": items_b, "train_F2.txt": good, "valid_F2.txt": good}
    write_raw(tmp_path, "art-office", {**files, "test_F2.txt": b"5\t2\t0|0|0\t2|9|9\t1|2|2\n"})
    with pytest.raises(data.DataError, match=r"test_F2\.txt\.gz:1: expected token 1 to carry position 1"):
        datasets.read_raw("art-office", tmp_path)
    write_raw(tmp_path, "art-office", {**files, "test_F2.txt": good + b"0\t1\t0|0|0\t1|1|1\n"})
    with pytest.raises(data.DataError, match=r"test_F2\.txt\.gz:3: duplicated user 0"):
        datasets.read_raw("art-office", tmp_path)
    write_raw(tmp_path, "art-office", {**files, "test_F2.txt": good})
    ds = datasets.read_raw("art-office", tmp_path)
    assert ds.split("test")["target"].tolist() == [1, 3]


def read_tiny_art_office(tmp_path, **override):
    write_raw(tmp_path, "art-office", art_office_files(**override))
    return datasets.read_raw("art-office", tmp_path)


def test_tiny_art_office_canonical_form(tmp_path):
    ds = read_tiny_art_office(tmp_path)
    assert ds.items["title"].tolist()[:3] == ["paint & brush", "canvas, quoted", "clay"]
    assert ds.items["local_id"].tolist() == [0, 1, 2, 0, 1, 2] and ds.domain_range("B") == (3, 6)
    rows = ds.split("valid")
    assert rows["user"].tolist() == ["valid_F2:2#1", "valid_F2:2#2"] and rows["target"].tolist() == [2, 5]


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        # a quoted field spans lines 2-3, so the unterminated quote opens the record on line 4
        ({"item_listA_F.csv": AO_HEADER + b'0,"paint\nbrush",0,x\n1,"canvas,1,x\n2,clay,2,x\n'},
         r"item_listA_F\.csv\.gz:4: CSV quoting error in the record starting on this line \(unexpected end of data\); "
         r"expected every quoted field to be closed"),
        ({"item_listA_F.csv": AO_HEADER + b'0,paint,0,x\n1,"canvas"x,1,x\n2,clay,2,x\n'},
         r"item_listA_F\.csv\.gz:3: CSV quoting error .*',' expected after '\"'"),
        # the record of line 3 ends on line 4
        ({"item_listA_F.csv": AO_HEADER + b'0,paint,0,x\n1,"canvas\nquoted",1\n2,clay,2,x\n'},
         r"item_listA_F\.csv\.gz:3: expected 4 comma-separated fields, got 3"),
        ({"item_listO_AA_F.csv": AO_HEADER + b"0,pen,3,y\n1,ink,four,y\n2,desk,5,y\n"},
         r"item_listO_AA_F\.csv\.gz:3: expected idAfter \(an integer\), got 'four'"),
        ({"item_listO_AA_F.csv": AO_HEADER + b"0,pen,3,y\n1,ink,2,y\n2,desk,5,y\n"},
         r"item_listO_AA_F\.csv\.gz:3: duplicated item id 2 \(first seen at \S+item_listA_F\.csv\.gz:4\); expected each id once"),
        ({"item_listO_AA_F.csv": AO_HEADER + b"0,pen,3,y\n1,ink,4,y\n2,desk,6,y\n"},
         r"item_listO_AA_F\.csv\.gz:4: expected item id 5 \(ids 0\.\.5, each once, in order\), got 6"),
        ({"item_listA_F.csv": AO_HEADER + b"0,paint,0,x\n1,canvas,1,x\n2,clay,4,x\n",
          "item_listO_AA_F.csv": AO_HEADER + b"0,pen,2,y\n1,ink,3,y\n2,desk,5,y\n"},
         r"item_listA_F\.csv\.gz:4: item id 4 of domain A follows domain B's first id 2 \(\S+item_listO_AA_F\.csv\.gz:2\); "
         r"expected the ids of domain A to precede those of domain B"),
        ({"item_listO_AA_F.csv": AO_HEADER}, r"item_listO_AA_F\.csv\.gz:2: expected at least one item after the header"),
    ],
    ids=["unterminated-quote", "strict-quote", "field-count", "non-integer-id", "duplicated-id", "gap", "domain-order",
         "no-items"],
)
def test_art_office_item_errors_name_file_and_line(tmp_path, override, pattern):
    with pytest.raises(data.DataError, match=pattern):
        read_tiny_art_office(tmp_path, **override)


def test_prepared_roundtrip(tmp_path):
    ds = read_tiny(tmp_path / "raw")
    data.save(ds, tmp_path / "prepared")
    back = data.load("food-kitchen", tmp_path / "prepared")
    assert back.sequences["history"].tolist() == ds.sequences["history"].tolist()
    assert back.items.equals(ds.items)
    with pytest.raises(data.DataError, match="run the prepare stage first"):
        data.load("food-kitchen", tmp_path / "missing")


def test_a_benchmarks_dataset_yaml_with_an_unknown_or_repeated_key_is_refused(tmp_path, root):
    """A benchmark's description holds the keys every dataset has; the generic format's own keys are unknown to it."""
    shipped = (root / "data" / "raw" / "food-kitchen" / "dataset.yaml").read_text()
    lines = len(shipped.splitlines())
    write_raw(tmp_path, "food-kitchen", food_kitchen_files(), spec=shipped + "split:\n  rule: time\n")
    path = tmp_path / "food-kitchen" / "dataset.yaml"
    with pytest.raises(data.DataError) as caught:
        datasets.read_raw("food-kitchen", tmp_path)
    assert str(caught.value) == (f"{path}:{lines + 1}: unknown key 'split'; expected one of ['format', 'description', "
                                 "'domains', 'source'] (format 'food-kitchen', docs/datasets.md)")
    path.write_text(shipped + "description: another line\n")
    with pytest.raises(data.DataError, match=rf"dataset\.yaml:{lines + 1}: duplicate key 'description' \(first at line \d+\)"):
        datasets.spec("food-kitchen", tmp_path)


def test_dataset_discovery_ignores_hidden_folders(tmp_path):
    write_raw(tmp_path, "food-kitchen", food_kitchen_files())
    shipped = (tmp_path / "food-kitchen" / "dataset.yaml").read_text()
    write_raw(tmp_path, ".food-kitchen.add-1", food_kitchen_files(), spec=shipped)  # a running `tema dataset add`'s staging
    write_raw(tmp_path, ".backup", food_kitchen_files(), spec=shipped)
    assert datasets.known(tmp_path) == ["food-kitchen"]
    assert datasets.read_raw("food-kitchen", tmp_path).n_items == 9
