"""The features stage: real MiniLM text and tag vectors, tag id arrays, and CLIP images (a tiny random CLIP)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from conftest import describe_datasets, food_kitchen_files, write_raw

from tema import artifacts, config, data, datasets, encoders, features

TAGS = {  # item_id -> [(tag, LLM rank)]
    0: [["soy", 2], ["infant formula", 1]], 1: [["coffee", 1], ["organic", 2], ["dark roast", 3]],
    4: [["cookware", 1], ["organic", 3], ["steel", 2]], 5: [["knife", 1]],
}


@pytest.fixture(scope="module")
def encoder():
    return encoders.TextEncoder("all-MiniLM-L6-v2")


@pytest.fixture
def repo(tmp_path, monkeypatch, root):
    """A repository with a prepared tiny food-kitchen and its tags, as the earlier stages leave it."""
    shutil.copy(root / "dvc.yaml", tmp_path / "dvc.yaml")
    shutil.copy(root / "profiles" / "default.yaml", tmp_path / "params.yaml")
    write_raw(tmp_path / "data" / "raw", "food-kitchen", food_kitchen_files())
    describe_datasets(tmp_path)
    ds = datasets.read_raw("food-kitchen", tmp_path / "data" / "raw")
    data.save(ds, tmp_path / "data" / "prepared" / "food-kitchen")
    tags_dir = tmp_path / "data" / "tags" / "food-kitchen"
    tags_dir.mkdir(parents=True)
    vocab = [("A", "infant formula", 1, False), ("A", "soy", 1, False), ("A", "coffee", 1, False),
             ("A", "organic", 1, True), ("A", "dark roast", 1, False), ("B", "organic", 1, True),
             ("B", "cookware", 1, False), ("B", "steel", 1, False), ("B", "knife", 1, False)]
    pd.DataFrame(vocab, columns=["domain", "tag", "count", "shared"]).to_csv(tags_dir / "vocabulary.tsv", sep="\t", index=False)
    write_item_tags(tags_dir, TAGS, ds)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write_item_tags(tags_dir, tags, ds):
    domain = ds.items.set_index("item_id")["domain"]
    lines = ["item_id\tdomain\ttags"] + [f"{i}\t{domain[i]}\t{json.dumps(t)}" for i, t in tags.items()]
    (tags_dir / "item_tags.tsv").write_text("\n".join(lines) + "\n")


def test_text_and_tag_arrays_in_item_order_with_identical_bits_on_rerun(repo, encoder):
    params = config.load_params()
    meta = features.run("food-kitchen", params, encoder)
    f = artifacts.load_features("food-kitchen")
    ds = data.load("food-kitchen", repo / "data" / "prepared" / "food-kitchen")
    assert f["text"].shape == (9, 384) and f["text"].dtype == np.float32
    expected = encoder(features.item_texts(ds.items.sort_values("item_id")))
    assert np.allclose(f["text"], expected, atol=1e-6)  # row i is item i
    tags = f["tags"]
    assert list(tags["tag"]) == ["infant formula", "soy", "coffee", "organic", "dark roast", "cookware", "steel", "knife"]
    organic = int(tags.index[tags["tag"] == "organic"][0])
    assert tags.loc[organic, "in_A"] and tags.loc[organic, "in_B"]  # one row, read by both domains
    ids, ranks = np.asarray(f["item_tag_ids"]), np.asarray(f["item_tag_ranks"])
    assert ids.shape == (9, 3) and ids.dtype == np.int32
    assert [tags["tag"][t] for t in ids[0] if t >= 0] == ["infant formula", "soy"] and list(ranks[0]) == [1, 2, 0]
    assert [tags["tag"][t] for t in ids[4]] == ["cookware", "steel", "organic"] and ids[1][1] == ids[4][2] == organic
    assert (ids[[2, 3, 6, 7, 8]] == -1).all()
    assert np.allclose(f["tag_vectors"][organic], encoder(["organic"])[0], atol=1e-6)
    assert meta["tags"]["items_with_tags"] == 4 and meta["tags"]["shared"] == 1
    assert meta["text"]["encoder"] == "all-MiniLM-L6-v2" and meta["text"]["dim"] == 384
    # no images in the benchmarks: masks only
    assert not meta["visual"]["available"] and "no item has an image" in meta["visual"]["reason"]
    assert "visual" not in f and not np.asarray(f["visual_mask"]).any()

    out = repo / "data" / "features" / "food-kitchen"
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    features.run("food-kitchen", params, encoder)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_a_tag_outside_the_vocabulary_names_the_file_and_item_and_loses_nothing(repo, encoder):
    params = config.load_params()
    features.run("food-kitchen", params, encoder)
    ds = data.load("food-kitchen", repo / "data" / "prepared" / "food-kitchen")
    write_item_tags(repo / "data" / "tags" / "food-kitchen", {**TAGS, 5: [["knife", 1], ["banana", 2]]}, ds)
    with pytest.raises(data.DataError, match=r"item_tags.tsv: item 5 has tag 'banana', which is not in domain B's vocabulary"):
        features.run("food-kitchen", params, encoder)
    with pytest.raises(FileNotFoundError, match="no finished features"):  # never mistaken for complete
        artifacts.load_features("food-kitchen")
    assert (repo / "data" / "features" / "food-kitchen" / "text.npy").is_file()  # what was computed stays


def test_without_tags_the_stage_says_so(repo, encoder):
    shutil.rmtree(repo / "data" / "tags")
    meta = features.run("food-kitchen", config.load_params(), encoder)
    assert not meta["tags"]["available"] and "tags stage has not run" in meta["tags"]["reason"]
    assert set(artifacts.load_features("food-kitchen")) == {"meta", "identity", "text", "visual_mask"}


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A randomly initialised CLIP saved offline: proves loading, preprocessing and batching (no meaning)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    cfg = CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 2, "num_hidden_layers": 1, "vocab_size": 99},
        vision_config={"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 2, "num_hidden_layers": 1,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    path = tmp_path_factory.mktemp("clip")
    CLIPModel(cfg).save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def test_images_are_embedded_and_missing_or_corrupt_ones_recorded(repo, encoder, tiny_clip):
    from PIL import Image

    rng = np.random.default_rng(0)
    (repo / "img").mkdir()
    for name in ("a.png", "b.jpg"):
        Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(repo / "img" / name)
    (repo / "img" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    prepared = repo / "data" / "prepared" / "food-kitchen" / "items.parquet"
    items = pd.read_parquet(prepared)
    items["image"] = ["img/a.png", "img/missing.png", "img/corrupt.png", None, "img/b.jpg", "", None, None, None]
    items.to_parquet(prepared)
    params = config.load_params()
    with pytest.raises(config.ParamsError, match="'features.image_encoder' is empty, but 4 items have images"):
        features.run("food-kitchen", params, encoder)
    params["features"]["image_encoder"] = str(tiny_clip)
    meta = features.run("food-kitchen", params, encoder)
    f = artifacts.load_features("food-kitchen")
    assert meta["visual"] == {**meta["visual"], "available": True, "dim": 16, "images": 4, "embedded": 2, "failed": 2}
    assert list(np.asarray(f["visual_mask"])) == [1, 0, 0, 0, 1, 0, 0, 0, 0]
    visual = np.asarray(f["visual"])
    assert visual.shape == (9, 16) and (visual[[1, 2, 3, 5, 6, 7, 8]] == 0).all() and (np.abs(visual[[0, 4]]).sum(1) > 0).all()
    assert not np.allclose(visual[0], visual[4])
    failures = pd.read_csv(repo / "data" / "features" / "food-kitchen" / "visual_failures.tsv", sep="\t")
    assert list(failures["item_id"]) == [1, 2]
    assert "FileNotFoundError" in failures["reason"][0] and "UnidentifiedImageError" in failures["reason"][1]


def test_text_items_used_encodes_only_the_items_of_some_example(repo, encoder):
    """The smoke profile's shortcut: items no example uses keep a zero text vector, the others their full encoding."""
    prepared = repo / "data" / "prepared" / "food-kitchen"
    ds = data.load("food-kitchen", prepared)
    unused = {3, 8}
    keep = [not ({*h, t} & unused) for h, t in zip(ds.sequences["history"], ds.sequences["target"], strict=True)]
    data.save(data.Dataset(ds.name, ds.domain_names, ds.items, ds.sequences[keep].reset_index(drop=True)), prepared)
    params = config.load_params()
    full = features.run("food-kitchen", params, encoder)
    everything = np.array(artifacts.load_features("food-kitchen")["text"])
    assert "items" not in full["text"] and np.abs(everything).sum(1).min() > 0  # all: every row encoded
    meta = features.run("food-kitchen", config.deep_merge(params, {"features": {"text_items": "used"}}), encoder)
    text = np.array(artifacts.load_features("food-kitchen")["text"])
    used = sorted({i for h, t in zip(ds.sequences["history"][keep], ds.sequences["target"][keep], strict=True) for i in (*h, t)})
    zero = [i for i in range(9) if i not in used]
    assert set(zero) >= unused and meta["text"]["items"] == {**meta["text"]["items"], "encoded": len(used), "zero": len(zero)}
    assert not text[zero].any()
    assert np.allclose(text[used], everything[used], atol=1e-6)
    with pytest.raises(config.ParamsError, match="features.text_items"):
        features.run("food-kitchen", config.deep_merge(params, {"features": {"text_items": "some"}}), encoder)


def test_item_texts_are_encoded_once_per_identical_input(repo, encoder, monkeypatch):
    """A re-run on the same inputs reads the remembered vectors (bit for bit those of the first run); any change of
    the texts encodes afresh."""
    calls = []
    real = encoders.TextEncoder.__call__
    monkeypatch.setattr(encoders.TextEncoder, "__call__", lambda self, texts, desc=None: calls.append(len(texts)) or real(self, texts, desc))
    params = config.load_params()
    features.run("food-kitchen", params, encoder)
    first = np.array(artifacts.load_features("food-kitchen")["text"])
    assert calls == [9, 8]  # the item texts, then the tags
    features.run("food-kitchen", params, encoder)
    assert calls == [9, 8, 8] and np.array_equal(np.array(artifacts.load_features("food-kitchen")["text"]), first)
    assert len(list(artifacts.text_memo_dir().glob("*.npy"))) == 1
    prepared = repo / "data" / "prepared" / "food-kitchen"
    ds = data.load("food-kitchen", prepared)
    ds.items.loc[0, "title"] = "another title"
    data.save(ds, prepared)
    features.run("food-kitchen", params, encoder)
    assert calls == [9, 8, 8, 9, 8] and len(list(artifacts.text_memo_dir().glob("*.npy"))) == 2


def test_a_second_named_tag_source_lives_beside_the_first_and_a_model_picks_it_by_name(repo, encoder):
    from tema.training import model_features

    params = config.load_params()
    params["tags"]["other_sources"] = {"food-kitchen": {"embedded": {"kind": "llm"}}}
    ds = data.load("food-kitchen", repo / "data" / "prepared" / "food-kitchen")
    second = repo / "data" / "tags" / "food-kitchen" / "embedded"
    assert config.tags_dir(params, "food-kitchen", "embedded") == second
    with pytest.raises(data.DataError, match=r"data/tags/food-kitchen/embedded/: no tags of source 'embedded'.*tags-source@food-kitchen-embedded"):
        features.run("food-kitchen", params, encoder)
    second.mkdir()
    vocab = [("A", "coffee", 1, False), ("A", "tea", 1, False), ("B", "pan", 1, False)]
    pd.DataFrame(vocab, columns=["domain", "tag", "count", "shared"]).to_csv(second / "vocabulary.tsv", sep="\t", index=False)
    write_item_tags(second, {1: [["coffee", 1], ["tea", 2]], 4: [["pan", 1]]}, ds)
    meta = features.run("food-kitchen", params, encoder)
    assert meta["tags"]["source_name"] == "default" and meta["tag_sources"]["embedded"]["n_tags"] == 3
    first, other = artifacts.load_features("food-kitchen"), artifacts.load_features("food-kitchen", "embedded")
    assert list(other["tags"]["tag"]) == ["coffee", "tea", "pan"] and len(first["tags"]) == 8
    assert other["item_tag_ids"][1].tolist()[:2] == [0, 1] and (other["item_tag_ids"][0] < 0).all()
    assert np.array_equal(first["text"], other["text"])  # only the tag arrays differ
    assert other["identity"] != first["identity"] and other["meta"]["tags"]["source_name"] == "embedded"
    assert artifacts.load_features("food-kitchen", "default")["identity"] == first["identity"]
    with pytest.raises(FileNotFoundError, match=r"no tag source 'large'.*\['default', 'embedded'\]"):
        artifacts.load_features("food-kitchen", "large")
    got = model_features(ds, "tema", {"tags_from": "embedded"})
    assert got["identity"] == other["identity"] and model_features(ds, "tema", {})["identity"] == first["identity"]
    # the source dropped from params: its arrays go with the next run, not left to be read as current
    params["tags"]["other_sources"] = {}
    features.run("food-kitchen", params, encoder)
    assert not (repo / "data" / "features" / "food-kitchen" / "tags-embedded").exists()
