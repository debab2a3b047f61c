"""TEMA and SASRec-text: the item representation, the three streams and their attention levels, the
ablation switches, and how the models find the features stage's arrays."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_training import N_A, N_B, cfg, synthetic

from tema import artifacts
from tema import train as train_stage
from tema.models import ItemSpace, build, registry
from tema.models.tema import ABLATIONS
from tema.training import fingerprint, load_run, model_features, train_run

SPACE = ItemSpace(N_A + N_B, {"A": (0, N_A), "B": (N_A, N_A + N_B)})
HYPER = {"dim": 16, "dropout": 0.0, "blocks": 1}


def bank(seed: int = 0, tagged: int | None = None) -> dict[str, np.ndarray]:
    """Features for the synthetic dataset: 8-d text vectors, 6 tags, up to 3 tags per item (ranks 1..3).

    Item i's tags follow its position in its domain (i % 6 ...), so an A item and its mirrored B item share
    tags; items from `tagged` on have none.
    """
    rng = np.random.default_rng(seed)
    n = N_A + N_B
    ids = np.full((n, 3), -1, dtype=np.int32)
    ranks = np.zeros((n, 3), dtype=np.int16)
    for item in range(n if tagged is None else tagged):
        local = item if item < N_A else item - N_A
        ids[item] = [local % 6, (local + 1) % 6, (local + 2) % 6]
        ranks[item] = [1, 2, 3]
    return {
        "text": rng.normal(size=(n, 8)).astype(np.float32),
        "tag_vectors": rng.normal(size=(6, 8)).astype(np.float32),
        "item_tag_ids": ids, "item_tag_ranks": ranks,
        "visual_mask": np.zeros(n, dtype=np.uint8),
    }


def model(name: str = "tema", features=None, **hyper):
    torch.manual_seed(0)
    return build(name, SPACE, {**HYPER, "features": bank() if features is None else features, **hyper}, 10).eval()


def test_item_representation_is_id_plus_text_plus_weighted_tags():
    m = model()
    items = m.items
    with torch.no_grad():
        items.a_tag.weight.zero_()  # no learned preference: alpha follows the rank prior, 1/rank
        rows = torch.tensor([0, 1, N_A + 1])
        alpha = items.tag_weights(rows)
        prior = torch.tensor([1, 1 / 2, 1 / 3])
        assert torch.allclose(alpha[1], prior / prior.sum()) and alpha[0].sum() == 0  # padding has no tags
        tau = torch.as_tensor(bank()["tag_vectors"])
        expected_g = (alpha[1].unsqueeze(-1) * items.p_tag(tau[[0, 1, 2]])).sum(0)  # item 0 of A: local 0 -> tags 0, 1, 2
        expected = items.ids.weight[1] + items.p_text(torch.as_tensor(bank()["text"][0])) + expected_g
        assert torch.allclose(items(rows)[1], expected, atol=1e-6)
        assert items(rows)[0].abs().sum() == 0


def test_mean_pooled_tags_and_items_without_tags():
    m = model("tema-mean-tags", features=bank(tagged=10))
    with torch.no_grad():
        alpha = m.items.tag_weights(torch.tensor([1, 11]))  # item 0 has 3 tags, item 10 none
    assert torch.allclose(alpha[0], torch.full((3,), 1 / 3)) and alpha[1].abs().sum() == 0
    assert not hasattr(m.items, "w_tag")


def test_ablation_switches_remove_what_they_name():
    full, no_tags = model(), model("tema-no-tags")
    assert not no_tags.items.has_tags and not hasattr(no_tags.items, "p_tag")
    assert model("tema-no-tag-attention").streams_[0].tag_attention is None and full.streams_[0].tag_attention is not None
    assert model("tema-no-cross-attention").cross is None and full.cross is not None
    assert not model("tema-no-text").items.use_text and full.items.use_text
    assert registry.ablations_of("tema") == list(ABLATIONS)  # each registered, as TEMA with its switch fixed
    assert all(dict(registry.info(n).fixed) == fixed for n, (_, fixed) in ABLATIONS.items())
    with pytest.raises(ValueError, match="fixes"):
        model("tema-no-tags", tags="weighted")
    model("tema-no-tags", tags="none")  # repeating the fixed switch is fine
    with pytest.raises(KeyError, match="unknown key"):
        build("tema", SPACE, {**HYPER, "features": bank(), "tag_fusion": "max"}, 10)


def test_tags_change_the_scores_only_when_the_model_reads_them():
    other_tags = {**bank(), "tag_vectors": bank(seed=1)["tag_vectors"]}
    history = [[1, 2, N_A + 1, 3]]
    with torch.no_grad():
        assert not torch.allclose(model().score(history, "B"), model(features=other_tags).score(history, "B"))
        assert torch.equal(model("tema-no-tags").score(history, "B"), model("tema-no-tags", features=other_tags).score(history, "B"))


def test_domain_stream_reads_the_other_domain_only_through_cross_attention():
    a_only = torch.tensor([[1, 2, N_A + 3, 4]])
    swapped = torch.tensor([[1, 2, N_A + 9, 4]])  # a different B item at the same step
    for name, independent in (("tema-no-cross-attention", True), ("tema", False)):
        m = model(name)
        with torch.no_grad():
            _, ha, _ = m.streams(a_only)
            _, ha2, _ = m.streams(swapped)
        assert torch.allclose(ha, ha2, atol=1e-6) == independent, name


def test_streams_are_causal_and_padding_does_not_matter():
    m = model()
    seqs = torch.tensor([[0, 1, 2, N_A + 1, 3, N_A + 2]])
    changed = seqs.clone()
    changed[0, 4:] = torch.tensor([7, N_A + 20])
    with torch.no_grad():
        before, after = m.streams(seqs), m.streams(changed)
        for h1, h2 in zip(before, after):
            assert torch.allclose(h1[:, :4], h2[:, :4], atol=1e-6)  # the future never leaks into a step
        alone = m.score([[3, 4, 5]], "B")
        batched = m.score([[3, 4, 5], [6, 7, 8, 9, 10, 11, 12, 13, 14]], "B")[:1]
    assert torch.allclose(alone, batched, atol=1e-5)


def test_explanations_cover_the_history():
    m = model()
    history = [1, 2, N_A + 1, 3]
    why = m.explain(history, "B", top=3)
    assert why["history"] == history and len(why["recommended"]) == 3
    assert all(N_A <= i < N_A + N_B for i in why["recommended"])
    for key in ("self_attention", "tag_attention", "cross_attention"):
        assert len(why[key]) == len(history) and sum(why[key]) == pytest.approx(1.0, abs=1e-4), key
    assert len(why["tag_weights"]) == len(history)
    assert m.training is False
    assert m.explain([], "A")["history"] == [] and len(m.explain([], "A")["recommended"]) == 5


def write_features(root, name: str, arrays: dict[str, np.ndarray]) -> None:
    out = root / "data" / "features" / name
    out.mkdir(parents=True, exist_ok=True)
    for key, value in arrays.items():
        np.save(out / f"{key}.npy", value, allow_pickle=False)
    (out / "meta.json").write_text(json.dumps({"dataset": name, "seed": int(arrays["text"][0, 0] * 1000)}))


@pytest.fixture
def repo(tmp_path, monkeypatch):
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "params.yaml").write_text("model_params: {tema: {dim: 16}, sasrec-text: {dim: 16}, sasrec: {dim: 16}}\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("name", ["tema", "sasrec-text"])
def test_learns_and_reloads_from_the_features_stage(repo, name):
    write_features(repo, "synthetic", bank())
    params = {"model_params": {name: {"dim": 32, "dropout": 0.0, "lr": 0.01}}}
    hyper = train_stage.model_params(params, name)
    ds = synthetic()
    assert ds.name == "synthetic" and hyper == params["model_params"][name]  # the trainer adds the features itself
    result = train_run(ds, name, hyper, cfg(max_epochs=12, patience=12), 1, repo / "run", "d")
    assert result["best_valid_score"] > 0.5
    assert result["fingerprint"] == fingerprint(name, hyper, cfg(max_epochs=12, patience=12), 1, "d", artifacts.features_identity("synthetic"))
    state = torch.load(repo / "run" / "model.pt", weights_only=True)
    assert not any(k.endswith(("text", "tag_vectors", "item_tags")) for k in state)  # frozen arrays stay in data/features
    loaded = load_run(ds, name, hyper, cfg(), repo / "run")
    with torch.no_grad():
        assert loaded.score([[1, 2, 3]], "B").shape == (1, N_B)

    old = artifacts.features_identity("synthetic")
    write_features(repo, "synthetic", bank(seed=5))  # new features: the stored run no longer matches them
    assert artifacts.features_identity("synthetic") != old  # so the run's fingerprint changes: it retrains
    with pytest.raises(ValueError, match="features changed"):
        load_run(ds, name, hyper, cfg(), repo / "run")


def test_models_without_features_are_unchanged_and_missing_features_are_named(repo):
    ds = synthetic()
    assert model_features(ds, "sasrec") is None
    with pytest.raises(FileNotFoundError, match="features@synthetic"):
        model_features(ds, "tema")
    with pytest.raises(ValueError, match="features"):
        build("tema", SPACE, {}, 10)


def test_sampled_and_full_losses_are_finite_and_differ_by_ablation():
    ds = synthetic()
    train = ds.split("train")
    seqs = [list(h) + [t] for h, t in zip(train["history"][:16], train["target"][:16])]
    inputs = torch.tensor([[i + 1 for i in s[:-1]] for s in seqs])
    targets = torch.tensor([[i + 1 for i in s[1:]] for s in seqs])
    losses = {}
    for name in ("tema", "tema-no-tags"):
        m = model(name).train()
        torch.manual_seed(1)
        losses[name] = m.training_loss(inputs, targets, "full", 0)
        assert torch.isfinite(m.training_loss(inputs, targets, "sampled", 8))
        losses[name].backward()
        assert all(p.grad is not None for n, p in m.named_parameters() if n.startswith("items.ids"))
    assert losses["tema"].item() != pytest.approx(losses["tema-no-tags"].item())


def test_without_images_the_visual_switch_changes_nothing():
    with torch.no_grad():
        assert torch.equal(model("tema").score([[1, 2, N_A + 1]], "B"), model("tema-no-visual").score([[1, 2, N_A + 1]], "B"))
    images = {**bank(), "visual": np.random.default_rng(2).normal(size=(N_A + N_B, 4)).astype(np.float32),
              "visual_mask": (np.arange(N_A + N_B) % 2).astype(np.uint8)}
    with_images = model(features=images)
    assert with_images.items.use_visual and not model("tema-no-visual", features=images).items.use_visual
    with torch.no_grad():
        e = with_images.items(torch.tensor([1, 2]))  # item 0 has no image (mask 0), item 1 has one
        items = with_images.items
        no_vis = items.ids.weight[[1, 2]] + items.p_text(items.text[[1, 2]]) + items.tag_fusion(torch.tensor([1, 2]))
    assert torch.allclose(e[0], no_vis[0], atol=1e-6) and not torch.allclose(e[1], no_vis[1], atol=1e-3)


# -- tag enrichment that cannot hurt: gates, non-invasive side information, tag dropout, tag noise, diagnostics --

def with_tag_table(features: dict) -> dict:
    """bank() plus the features' tags table (tags 0-5 are in both domains' vocabularies here)."""
    import pandas as pd

    return {**features, "tags": pd.DataFrame({"tag_id": range(6), "tag": list("abcdef"), "in_A": [True] * 4 + [False] * 2,
                                              "in_B": [False] * 2 + [True] * 4})}


def test_gated_tema_starts_as_itself_without_tags_and_can_open_the_tag_path():
    other_tags = {**bank(), "tag_vectors": bank(seed=1)["tag_vectors"]}
    history = [[1, 2, N_A + 1, 3]]
    with torch.no_grad():  # at initialisation the tags cannot move a score
        assert torch.equal(model(gate=True).score(history, "B"), model(gate=True, features=other_tags).score(history, "B"))
    m = model(gate=True)
    assert m.items.gates["tags"].item() == 0.0 and m.items.gates["text"].item() == 1.0
    assert m.streams_[0].tag_attention.gate.item() == 0.0
    seqs = torch.tensor([[1, 2, N_A + 1, 3]])
    loss = m.train().training_loss(seqs, torch.tensor([[2, N_A + 1, 3, 4]]), "full", 0)
    loss.backward()
    assert m.items.gates["tags"].grad.abs().item() > 0 and m.streams_[0].tag_attention.gate.grad.abs().item() > 0
    with torch.no_grad():
        m.items.gates["tags"].fill_(1.0)
        m.eval()
        opened = m.score(history, "B")
    assert not torch.equal(opened, model(gate=True).score(history, "B"))


def test_non_invasive_side_information_shapes_attention_but_never_the_values():
    other = {**bank(), "tag_vectors": bank(seed=1)["tag_vectors"], "text": bank(seed=2)["text"]}
    single, longer = [[N_A + 4]], [[1, 2, N_A + 1, 3, N_A + 4]]
    with torch.no_grad():
        ni, ni_other = model(side_info="noninvasive"), model(side_info="noninvasive", features=other)
        # one history item: every attention reads only itself, so only the ID stream reaches the output
        assert torch.allclose(ni.score(single, "B"), ni_other.score(single, "B"), atol=1e-6)
        assert not torch.allclose(ni.score(longer, "B"), ni_other.score(longer, "B"), atol=1e-4)  # the scores read them
        fused, fused_other = model(), model(features=other)
        assert not torch.allclose(fused.score(single, "B"), fused_other.score(single, "B"), atol=1e-4)
        assert torch.equal(ni.domain_table(1, "cpu"), ni.items.ids(torch.arange(N_A + 1, N_A + N_B + 1)))  # ID output
    with pytest.raises(ValueError, match="side_info"):
        model(side_info="early")
    why = model(side_info="noninvasive").explain([1, 2, N_A + 1, 3], "B")
    assert sum(why["tag_attention"]) == pytest.approx(1.0, abs=1e-4)


def test_tag_dropout_drops_whole_tags_at_training_time_only():
    m = model(tag_dropout=0.5)
    rows = torch.arange(1, N_A + N_B + 1)
    with torch.no_grad():
        assert (m.items.tag_weights(rows) > 0).sum() == (m.items.item_tags[rows] > 0).sum()  # eval: every tag
        m.train()
        torch.manual_seed(3)
        kept = (m.items.tag_weights(rows) > 0).float().mean().item()
    assert 0.35 < kept < 0.65
    with pytest.raises(ValueError, match="tag_dropout"):
        model(tag_dropout=1.0)


def test_tag_noise_replaces_tags_by_random_tags_of_the_items_domain_seeded():
    from tema.models.tema import noisy_tags

    features = with_tag_table(bank())
    ids = features["item_tag_ids"]
    domains = dict(SPACE.domain_ranges)
    assert np.array_equal(noisy_tags(ids, features["tags"], domains, 0.0, 0), ids)
    full = noisy_tags(ids, features["tags"], domains, 1.0, 0)
    assert np.array_equal(full >= 0, ids >= 0)  # items keep their number of tags
    assert set(np.unique(full[:N_A][full[:N_A] >= 0])) <= {0, 1, 2, 3}  # A's vocabulary
    assert set(np.unique(full[N_A:][full[N_A:] >= 0])) <= {2, 3, 4, 5}
    half = noisy_tags(ids, features["tags"], domains, 0.5, 0)
    assert np.array_equal(half, noisy_tags(ids, features["tags"], domains, 0.5, 0))  # seeded
    changed = ((half != ids) & (ids >= 0)).sum() / (ids >= 0).sum()
    assert 0.2 < changed < 0.5  # half replaced, some by the same tag
    m = model(features=features, tag_noise=1.0)
    assert not torch.equal(m.items.item_tags[1:].cpu(), torch.as_tensor(ids.astype(np.int64) + 1))


def test_diagnostics_measure_scale_gates_and_how_uniform_the_tag_attention_is():
    histories = [[1, 2, N_A + 1, 3, N_A + 5], [4, 5, 6, 7], [N_A + 2, N_A + 3, 8]]
    d = model(gate=True).diagnostics(histories)
    assert set(d["scale"]) == {"id", "text", "tags (g)", "tags (gated)"} and d["scale"]["tags (gated)"] == 0.0
    assert d["gates"]["tags"] == 0.0 and d["rank_prior_weight"] == 1.0
    assert d["tag_attention"]["histories"] == 3 and 0 < d["tag_attention"]["normalised_entropy_mean"] < 1
    same = bank()
    same["item_tag_ids"] = np.tile(same["item_tag_ids"][:1], (N_A + N_B, 1))  # every item has the same tags: same keys
    uniform = model(features=same).diagnostics(histories)["tag_attention"]
    assert uniform["share_uniform"] == 1.0 and uniform["normalised_entropy_min"] == pytest.approx(1.0, abs=1e-5)
    assert model("tema-no-tags").diagnostics(histories).get("tag_attention") is None


def test_the_tag_attention_normalises_its_keys_so_their_scale_cannot_switch_it_off():
    from tema.models.tema import CrossAttention, key_mask

    torch.manual_seed(0)
    attention = CrossAttention(16, 2, 0.0, key_norm=True).eval()
    attention.record = True
    h, keys = torch.randn(1, 5, 16) * 4, torch.randn(1, 5, 16)
    mask = key_mask(torch.ones(1, 5, dtype=torch.bool), 2)
    weights = []
    for scale in (1.0, 0.1):  # small keys (the fused tag vectors' scale) attend as sharply as large ones
        attention(h, keys * scale, mask)
        weights.append(attention.last_weights.clone())
    assert torch.allclose(weights[0], weights[1], atol=1e-3)
    assert model().streams_[0].tag_attention.key_norm is not None and model().cross[0].key_norm is None
