"""A trained run's recommendations for one user, and the neighbours of an item or a tag: for notebooks and the CLI.

    from tema import recommend
    recommend.top_k("food-kitchen", "tema", "test:1234", k=10)   # the user's top 10 of the target's domain
    recommend.history("food-kitchen", "tema", "test:1234")        # what the user did, with where TEMA looked
    recommend.nearest_items("food-kitchen", 42, by="tags")        # the items most like item 42, in its domain
    recommend.nearest_tags("food-kitchen", "organic")             # the vocabulary tags closest to a tag

`tema recommend <dataset> <model> <user>` prints the same top-k (`--json` for machines). Users are the prepared
dataset's example keys ('test:1234', 'valid:1234', ...); the history is that example's. The top-k ranks every item
of the domain, the items of the history included, as the full-ranking protocol does (tema.protocols), unless
`exclude_history`. Scores and attention come from the selected checkpoint of one seed's run (train.seeds[0] unless
`seed`), loaded on the CPU with weights only.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import pandas as pd

from tema import artifacts, config, data, schema
from tema.models import registry
from tema.training import TrainConfig, load_run


@dataclass(frozen=True)
class Trained:
    """One trained run with what its explanations need: the dataset, the model, and the item tags by item."""

    dataset: data.Dataset
    model_name: str
    seed: int
    model: Any
    tags_of: dict[int, list[str]]


def item_tags(dataset: str) -> dict[int, list[str]]:
    """Each item's tags (vocabulary names, in rank order) from the features stage; {} for a dataset without tags."""
    folder = artifacts.features_dir(dataset)
    if not (folder / "tags.tsv").is_file():
        return {}
    names = pd.read_csv(folder / "tags.tsv", sep="\t", keep_default_na=False)["tag"].tolist()
    ids = np.load(folder / "item_tag_ids.npy", allow_pickle=False)
    return {i: [names[t] for t in row if t >= 0] for i, row in enumerate(ids) if (row >= 0).any()}


@lru_cache(maxsize=4)
def _load(dataset: str, model: str, seed: int | None, params_key: str) -> Trained:
    params = json.loads(params_key)
    cfg = TrainConfig.from_params(params)
    if model not in registry.MODELS:
        raise config.ParamsError(f"unknown model {model!r}; expected one of {registry.names()}")
    seed = cfg.seeds[0] if seed is None else seed
    run = artifacts.run_dir(dataset, model, seed)
    if not (run / "run.json").is_file():
        trained = sorted(p.parent.parent.name for p in artifacts.runs_dir(dataset).glob(f"*/seed{seed}/run.json"))
        raise data.DataError(f"{run}: no finished run of {model} (seed {seed}) on {dataset}; trained there: {trained or 'none'} "
                             f"(run `dvc repro train@{dataset}-{model}`)")
    prepared = data.load(dataset, artifacts.prepared_dir(dataset))
    recommender = load_run(prepared, model, registry.hyper(params, model), cfg, run)
    return Trained(prepared, model, seed, recommender, item_tags(dataset))


def load(dataset: str, model: str, seed: int | None = None, params: dict[str, Any] | None = None) -> Trained:
    """A trained run (cached: a notebook asking for several users loads it once)."""
    params = schema.load() if params is None else params
    return _load(dataset, model, seed, json.dumps(params, sort_keys=True, default=str))


def example(trained: Trained, user: str) -> pd.Series:
    rows = trained.dataset.sequences
    found = rows[rows["user"] == user]
    if found.empty:
        some = rows.loc[rows["split"] == "test", "user"].head(3).tolist()
        raise data.DataError(f"unknown user {user!r} in {trained.dataset.name}; expected an example key of "
                             f"data/prepared/{trained.dataset.name}, e.g. {some}")
    return found.iloc[0]


def mixed_user(dataset: str, split: str = "test") -> str:
    """The first example of `split` whose history holds both domains (where cross-domain attention has a say)."""
    prepared = data.load(dataset, artifacts.prepared_dir(dataset))
    rows, domain = prepared.split(split), prepared.items["domain"].to_numpy()
    for user, items in zip(rows["user"], rows["history"]):
        if len({domain[i] for i in items}) == 2:
            return str(user)
    if rows.empty:
        raise data.DataError(f"{dataset} has no {split} examples")
    return str(rows["user"].iat[0])


def _domain(trained: Trained, domain: str | None, row: pd.Series) -> str:
    if domain is None:
        return str(row["target_domain"])
    if domain not in data.DOMAINS:
        raise config.ParamsError(f"domain: expected one of {list(data.DOMAINS)} (A = {trained.dataset.domain_names['A']}, "
                                 f"B = {trained.dataset.domain_names['B']}), got {domain!r}")
    return domain


def top_k(dataset: str, model: str, user: str, domain: str | None = None, k: int = 10, seed: int | None = None,
          params: dict[str, Any] | None = None, exclude_history: bool = False) -> pd.DataFrame:
    """The user's k best-scored items of `domain` (default: the domain of the example's target), best first: rank,
    item_id, domain, title, score, tags, shared_tags (those also on some history item), in_history, is_target."""
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise config.ParamsError(f"k: expected an integer >= 1, got {k!r}")
    trained = load(dataset, model, seed, params)
    row = example(trained, user)
    domain = _domain(trained, domain, row)
    history = [int(i) for i in row["history"]]
    import torch  # the scores are a tensor; torch is loaded with the model already

    with torch.no_grad():
        scores = trained.model.score([history], domain)[0].double().numpy()
    start, _ = trained.dataset.domain_range(domain)
    if exclude_history:
        for i in history:
            if trained.dataset.items["domain"].iat[i] == domain:
                scores[i - start] = -np.inf
    order = np.argsort(-scores, kind="stable")[: min(k, len(scores))]
    seen = {t for i in history for t in trained.tags_of.get(i, [])}
    items = trained.dataset.items
    out = []
    for rank, local in enumerate(order, 1):
        item = start + int(local)
        tags = trained.tags_of.get(item, [])
        out.append({"rank": rank, "item_id": item, "domain": domain, "title": str(items["title"].iat[item]),
                    "score": float(scores[local]), "tags": tags, "shared_tags": [t for t in tags if t in seen],
                    "in_history": item in history, "is_target": item == int(row["target"])})
    return pd.DataFrame(out)


def history(dataset: str, model: str, user: str, domain: str | None = None, seed: int | None = None,
            params: dict[str, Any] | None = None) -> pd.DataFrame:
    """The user's history, oldest first (the items the model reads: its last max_len): item_id, domain, title, tags,
    and for a model that explains itself (TEMA) the attention of the last step over each item in the merged stream,
    in its tag attention and in the cross-domain attention of `domain` (default: the target's)."""
    trained = load(dataset, model, seed, params)
    row = example(trained, user)
    domain = _domain(trained, domain, row)
    items = [int(i) for i in row["history"]]
    why = trained.model.explain(items, domain) if hasattr(trained.model, "explain") else None
    window = why["history"] if why else items
    table = pd.DataFrame({"item_id": window,
                          "domain": [str(trained.dataset.items["domain"].iat[i]) for i in window],
                          "title": [str(trained.dataset.items["title"].iat[i]) for i in window],
                          "tags": [trained.tags_of.get(i, []) for i in window]})
    for key in ("self_attention", "tag_attention", "cross_attention"):
        if why and why.get(key):
            table[key] = why[key]
    return table


def _unit(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms == 0, 1, norms)


def nearest_items(dataset: str, item_id: int, k: int = 10, by: str = "text") -> pd.DataFrame:
    """The k items of the same domain closest to `item_id`: by the cosine of their frozen text vectors
    (by='text'), or by the Jaccard overlap of their tag sets (by='tags'). The item itself is left out."""
    if by not in ("text", "tags"):
        raise config.ParamsError(f"by: expected 'text' or 'tags', got {by!r}")
    items = data.load(dataset, artifacts.prepared_dir(dataset)).items
    if not isinstance(item_id, (int, np.integer)) or not 0 <= item_id < len(items):
        raise data.DataError(f"item {item_id!r}: expected an item id of {dataset}, 0..{len(items) - 1}")
    domain = str(items["domain"].iat[item_id])
    same = np.flatnonzero((items["domain"] == domain).to_numpy())
    same = same[same != item_id]
    if by == "text":
        path = artifacts.features_dir(dataset) / "text.npy"
        if not path.is_file():
            raise data.DataError(f"{path}: not found; {dataset} has no text vectors (run the features stage, or use by='tags')")
        vectors = np.load(path, mmap_mode="r", allow_pickle=False)
        unit = _unit(np.asarray(vectors[same], dtype=np.float64))
        query = _unit(np.asarray(vectors[[item_id]], dtype=np.float64))[0]
        similarity = unit @ query
    else:
        tags_of = item_tags(dataset)
        mine = set(tags_of.get(item_id, []))
        if not mine:
            raise data.DataError(f"item {item_id} of {dataset} has no tags; use by='text'")
        similarity = np.array([len(mine & set(tags_of.get(int(i), []))) / len(mine | set(tags_of.get(int(i), []))) for i in same])
    order = np.argsort(-similarity, kind="stable")[:k]
    return pd.DataFrame({"item_id": same[order], "title": items["title"].to_numpy()[same[order]],
                         "similarity": similarity[order]})


def nearest_tags(dataset: str, tag: str, k: int = 10) -> pd.DataFrame:
    """The k vocabulary tags whose vectors (features stage) are closest to `tag`'s, with the domains they belong to."""
    folder = artifacts.features_dir(dataset)
    if not (folder / "tags.tsv").is_file():
        raise data.DataError(f"{folder / 'tags.tsv'}: not found; {dataset} has no tags")
    table = pd.read_csv(folder / "tags.tsv", sep="\t", keep_default_na=False)
    if tag not in set(table["tag"]):
        raise data.DataError(f"tag {tag!r} is not in {dataset}'s vocabulary ({len(table):,} tags, e.g. {table['tag'].head(3).tolist()})")
    vectors = _unit(np.load(folder / "tag_vectors.npy", allow_pickle=False).astype(np.float64))
    row = int(table.index[table["tag"] == tag][0])
    similarity = vectors @ vectors[row]
    similarity[row] = -np.inf
    order = np.argsort(-similarity, kind="stable")[:k]
    domains = ["+".join(d for d in data.DOMAINS if table[f"in_{d}"].iat[i]) for i in order]
    return pd.DataFrame({"tag": table["tag"].to_numpy()[order], "domains": domains, "similarity": similarity[order]})


def main(argv: list[str] | None = None) -> int:
    """`tema recommend <dataset> <model> <user> [--domain A|B] [-k 10] [--seed N] [--json]`."""
    parser = argparse.ArgumentParser(prog="tema recommend", description="a trained run's top-k items for one user")
    parser.add_argument("dataset")
    parser.add_argument("model")
    parser.add_argument("user", help="an example key of the prepared dataset, e.g. test:1234")
    parser.add_argument("--domain", choices=list(data.DOMAINS), default=None, help="default: the domain of the user's target")
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--seed", type=int, default=None, help="which seed's run (default: the first of train.seeds)")
    parser.add_argument("--exclude-history", action="store_true", help="leave out the items of the user's history")
    parser.add_argument("--json", action="store_true", help="one JSON object per line instead of a table")
    args = parser.parse_args(argv)
    table = top_k(args.dataset, args.model, args.user, args.domain, args.k, args.seed, exclude_history=args.exclude_history)
    if args.json:
        for record in table.to_dict(orient="records"):
            print(json.dumps(record, ensure_ascii=False))
        return 0
    shown = table.assign(title=table["title"].str.slice(0, 60), shared_tags=table["shared_tags"].map(", ".join),
                         mark=np.where(table["is_target"], "target", np.where(table["in_history"], "in history", "")))
    print(shown[["rank", "item_id", "title", "score", "shared_tags", "mark"]].to_string(index=False), file=sys.stdout)
    return 0
