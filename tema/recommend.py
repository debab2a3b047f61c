"""A trained run's recommendations for one user, and the neighbours of an item or a tag: for notebooks and the CLI.

    from tema import recommend
    recommend.top_k("food-kitchen", "tema", "test:1234", k=10)    # the user's top 10 of the target's domain
    recommend.history("food-kitchen", "test:1234", model="tema")   # what the user did, with where TEMA looked
    recommend.nearest_items("food-kitchen", 42, by="tags")         # the items most like item 42, in its domain
    recommend.nearest_tags("food-kitchen", "organic")              # the vocabulary tags closest to a tag

`tema recommend <dataset> <model> <user>` prints the same top-k (`--json` for machines). Users are the prepared
dataset's example keys ('test:1234', 'valid:1234', ...), looked up in `split` (test by default); the history is that
example's. The top-k ranks every item of the domain, the items of the history included, as the full-ranking protocol
does (tema.protocols: evaluation does not exclude them), unless `exclude_history`. Scores and attention come from the
selected checkpoint of one seed's run (train.seeds[0] unless `seed`), loaded on the CPU with weights only
(tema.training.load_run). item_record describes an item as the evaluate stage's explanations do
(tema.evaluate.explain_users, which keeps its own copy until its next re-run).
"""

from __future__ import annotations

import argparse
import json
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
    """One trained run with what its tables need: the prepared dataset, the model, and the item tags by item."""

    dataset: data.Dataset
    model_name: str
    seed: int
    model: Any
    tags_of: dict[int, list[str]]


# -- items and users -------------------------------------------------------------------------------

def item_tags(dataset: str) -> dict[int, list[str]]:
    """Each item's tags (vocabulary names, in rank order) from the features stage; {} for a dataset without tags."""
    folder = artifacts.features_dir(dataset)
    if not (folder / "tags.tsv").is_file() or not (folder / "item_tag_ids.npy").is_file():
        return {}
    names = pd.read_csv(folder / "tags.tsv", sep="\t", keep_default_na=False)["tag"].tolist()
    ids = np.load(folder / "item_tag_ids.npy", allow_pickle=False)
    return {i: [names[t] for t in row if t >= 0] for i, row in enumerate(ids) if (row >= 0).any()}


def item_record(dataset: data.Dataset, tags_of: dict[int, list[str]], item: int) -> dict[str, Any]:
    """One item as the explanations (explanations.json) and these tables describe it: id, domain, title, tags."""
    item = int(item)
    return {"item": item, "domain": str(dataset.items["domain"].iat[item]), "title": str(dataset.items["title"].iat[item]),
            "tags": list(tags_of.get(item, []))}


def example(dataset: data.Dataset, user: str, split: str = "test") -> pd.Series:
    """The example (history, target, target_domain) of user key `user` in `split`."""
    if split not in data.SPLITS:
        raise config.ParamsError(f"split: expected one of {list(data.SPLITS)}, got {split!r}")
    rows = dataset.sequences
    found = rows[rows["user"] == user]
    if found.empty:
        some = rows.loc[rows["split"] == split, "user"].head(3).tolist()
        raise data.DataError(f"unknown user {user!r} in {dataset.name}; expected an example key of its {split} split "
                             f"(data/prepared/{dataset.name}), e.g. {some}")
    row = found.iloc[0]
    if row["split"] != split:
        raise data.DataError(f"user {user!r} is a {row['split']} example of {dataset.name}, not a {split} one; "
                             f"pass split={row['split']!r}")
    return row


def mixed_examples(dataset: data.Dataset, split: str = "test") -> pd.DataFrame:
    """The examples of `split` whose history holds both domains (where cross-domain attention has a say), in order."""
    rows, domain = dataset.split(split), dataset.items["domain"].to_numpy()
    return rows[[len({domain[i] for i in h}) == 2 for h in rows["history"]]]


def mixed_user(dataset: str, split: str = "test") -> str:
    """The first example of `split` whose history holds both domains; else the split's first example."""
    prepared = data.load(dataset, artifacts.prepared_dir(dataset))
    rows = prepared.split(split)
    if rows.empty:
        raise data.DataError(f"{dataset} has no {split} examples")
    mixed = mixed_examples(prepared, split)
    return str((mixed if len(mixed) else rows)["user"].iat[0])


# -- trained runs ----------------------------------------------------------------------------------

def load(dataset: str, model: str, seed: int | None = None, params: dict[str, Any] | None = None) -> Trained:
    """A trained run (cached while its run.json is unchanged: a notebook asking for several users loads it once)."""
    params = schema.load() if params is None else params
    if model not in registry.MODELS:
        raise config.ParamsError(f"unknown model {model!r}; expected one of {registry.names()}")
    if not artifacts.prepared_dir(dataset).is_dir():
        prepared = sorted(p.name for p in artifacts.prepared_dir(dataset).parent.glob("*") if p.is_dir())
        raise data.DataError(f"unknown dataset {dataset!r}: no {artifacts.prepared_dir(dataset).relative_to(config.repo_root())}/; "
                             f"prepared here: {prepared or 'none'} (run `dvc repro` for the profile's datasets)")
    cfg = TrainConfig.from_params(params)
    seed = cfg.seeds[0] if seed is None else seed
    run = artifacts.run_dir(dataset, model, seed)
    marker = run / "run.json"
    if not marker.is_file():
        trained = sorted(p.parent.parent.name for p in artifacts.runs_dir(dataset).glob(f"*/seed{seed}/run.json"))
        raise data.DataError(f"{run}: no finished run of {model} (seed {seed}) on {dataset}; trained there with seed {seed}: "
                             f"{trained or 'none'} (run `dvc repro train@{dataset}-{model}`)")
    return _load(dataset, model, seed, json.dumps(params, sort_keys=True, default=str), str(run.resolve()), marker.stat().st_mtime_ns)


@lru_cache(maxsize=4)
def _load(dataset: str, model: str, seed: int, params_key: str, run: str, stamp: int) -> Trained:
    """load()'s work; `run` and `stamp` (run.json's mtime) are in the key so that another repository or a retrained
    run is loaded afresh."""
    params = json.loads(params_key)
    run_dir = artifacts.run_dir(dataset, model, seed)
    prepared = data.load(dataset, artifacts.prepared_dir(dataset))
    try:
        recommender = load_run(prepared, model, registry.hyper(params, model), TrainConfig.from_params(params), run_dir)
    except (data.DataError, config.ParamsError):
        raise
    except (RuntimeError, ValueError) as err:  # a checkpoint of other settings or features than params.yaml's now
        summary = "; ".join(line.strip() for line in str(err).splitlines() if line.strip())[:240]
        raise data.DataError(f"{run_dir}: the checkpoint does not fit {model} as these params build it ({summary}); "
                             f"re-run `dvc repro train@{dataset}-{model}` or pass the params it was trained with") from err
    return Trained(prepared, model, seed, recommender, item_tags(dataset))


def _domain(dataset: data.Dataset, domain: str | None, row: pd.Series) -> str:
    if domain is None:
        return str(row["target_domain"])
    if domain not in data.DOMAINS:
        raise config.ParamsError(f"domain: expected one of {list(data.DOMAINS)} (A = {dataset.domain_names['A']}, "
                                 f"B = {dataset.domain_names['B']}), got {domain!r}")
    return domain


def _check_k(k: Any) -> None:
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
        raise config.ParamsError(f"k: expected an integer >= 1, got {k!r}")


def top_k(dataset: str, model: str, user: str, domain: str | None = None, k: int = 10, seed: int | None = None,
          params: dict[str, Any] | None = None, split: str = "test", *, exclude_history: bool = False) -> pd.DataFrame:
    """The user's k best-scored items of `domain` (default: the domain of the example's target), best first.

    Columns: rank, item_id, domain, title, score, tags, shared_tags (the item's tags that also occur on some history
    item, in the item's order), in_history, is_target. History items are ranked like any other, as in evaluation
    (the full-ranking protocol keeps them); `exclude_history` leaves them out. Ties keep the lower item id first.
    """
    _check_k(k)
    trained = load(dataset, model, seed, params)
    row = example(trained.dataset, user, split)
    domain = _domain(trained.dataset, domain, row)
    history = [int(i) for i in row["history"]]
    import torch  # only for no_grad: torch is loaded with the model already

    with torch.no_grad():
        scores = trained.model.score([history], domain)[0].double().numpy().copy()
    start, _ = trained.dataset.domain_range(domain)
    in_history = set(history)
    if exclude_history:
        local = [i - start for i in in_history if 0 <= i - start < len(scores)]
        scores[local] = -np.inf
    order = np.argsort(-scores, kind="stable")[: min(int(k), len(scores))]
    order = order[np.isfinite(scores[order])] if exclude_history else order
    seen = {t for i in history for t in trained.tags_of.get(i, [])}
    target = int(row["target"])
    out = []
    for rank, local in enumerate(order, 1):
        item = item_record(trained.dataset, trained.tags_of, start + int(local))
        out.append({"rank": rank, "item_id": item["item"], "domain": item["domain"], "title": item["title"],
                    "score": float(scores[local]), "tags": item["tags"], "shared_tags": [t for t in item["tags"] if t in seen],
                    "in_history": item["item"] in in_history, "is_target": item["item"] == target})
    columns = ["rank", "item_id", "domain", "title", "score", "tags", "shared_tags", "in_history", "is_target"]
    return pd.DataFrame(out, columns=columns)


ATTENTION = ("self_attention", "tag_attention", "cross_attention")


def history(dataset: str, user: str, model: str | None = None, domain: str | None = None, seed: int | None = None,
            params: dict[str, Any] | None = None, split: str = "test") -> pd.DataFrame:
    """The user's history, oldest first: item_id, domain, title, tags.

    Without a model, the whole history. With one, the window it reads (its last max_len items) and, for a model that
    explains itself (TEMA: `explain`), the attention of the last step over each item: in the merged stream's last
    self-attention block, in its tag attention and in the cross-domain attention of `domain` (default: the target's).
    """
    if model is None:
        prepared = data.load(dataset, artifacts.prepared_dir(dataset))
        row = example(prepared, user, split)
        _domain(prepared, domain, row)
        window, tags_of, why = [int(i) for i in row["history"]], item_tags(dataset), None
    else:
        trained = load(dataset, model, seed, params)
        prepared, tags_of = trained.dataset, trained.tags_of
        row = example(prepared, user, split)
        domain = _domain(prepared, domain, row)
        items = [int(i) for i in row["history"]]
        why = trained.model.explain(items, domain) if hasattr(trained.model, "explain") else None
        window = why["history"] if why else items[-trained.model.max_len:]
    records = [item_record(prepared, tags_of, i) for i in window]
    table = pd.DataFrame({"item_id": [r["item"] for r in records], "domain": [r["domain"] for r in records],
                          "title": [r["title"] for r in records], "tags": [r["tags"] for r in records]})
    for key in ATTENTION:
        if why and why.get(key):
            table[key] = why[key]
    return table


# -- neighbours ------------------------------------------------------------------------------------

def _unit(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms == 0, 1, norms)


def item_vectors(trained: Trained, start: int, stop: int) -> np.ndarray:
    """The model's own vectors of items start..stop-1: what it scores with (item_table, or TEMA's item representation)."""
    import torch  # only for no_grad and arange: torch is loaded with the model already

    with torch.no_grad():
        try:
            return trained.model.item_table()[start + 1 : stop + 1].double().numpy()
        except (NotImplementedError, AttributeError):
            pass
        items = getattr(trained.model, "items", None)
        if callable(items):  # model index = item id + 1
            return items(torch.arange(start + 1, stop + 1)).double().numpy()
    raise data.DataError(f"model {trained.model_name!r} has no item embedding to compare items by; use by='text' or by='tags'")


def nearest_items(dataset: str, item_id: int, k: int = 10, by: str = "text", model: str | None = None, seed: int | None = None,
                  params: dict[str, Any] | None = None) -> pd.DataFrame:
    """The k items of the same domain closest to `item_id`, the item itself left out: by the cosine of their frozen text
    vectors (by='text'), by the Jaccard overlap of their tag sets (by='tags') or by the cosine of a trained model's item
    vectors (by='model', with `model`). Columns: item_id, domain, title, tags, similarity."""
    if by not in ("text", "tags", "model"):
        raise config.ParamsError(f"by: expected 'text', 'tags' or 'model', got {by!r}")
    if by == "model" and model is None:
        raise config.ParamsError("by='model' compares a trained model's item vectors: name the model (model='tema')")
    _check_k(k)
    trained = load(dataset, model, seed, params) if by == "model" else None
    prepared = trained.dataset if trained else data.load(dataset, artifacts.prepared_dir(dataset))
    items = prepared.items
    if not isinstance(item_id, (int, np.integer)) or isinstance(item_id, bool) or not 0 <= item_id < len(items):
        raise data.DataError(f"item {item_id!r}: expected an item id of {dataset}, 0..{len(items) - 1}")
    domain = str(items["domain"].iat[item_id])
    start, stop = prepared.domain_range(domain)
    tags_of = trained.tags_of if trained else item_tags(dataset)
    if by == "tags":
        mine = set(tags_of.get(int(item_id), []))
        if not mine:
            raise data.DataError(f"item {item_id} of {dataset} has no tags; use by='text'")
        similarity = np.array([len(mine & set(tags_of.get(i, []))) / len(mine | set(tags_of.get(i, []))) for i in range(start, stop)])
    else:
        if by == "text":
            path = artifacts.features_dir(dataset) / "text.npy"
            if not path.is_file():
                raise data.DataError(f"{path}: not found; {dataset} has no text vectors (run the features stage, or use by='tags')")
            vectors = np.asarray(np.load(path, mmap_mode="r", allow_pickle=False)[start:stop], dtype=np.float64)
        else:
            vectors = item_vectors(trained, start, stop)
        unit = _unit(vectors)
        similarity = unit @ unit[item_id - start]
    similarity[item_id - start] = -np.inf
    order = np.argsort(-similarity, kind="stable")[: min(int(k), stop - start - 1)]
    records = [item_record(prepared, tags_of, start + int(i)) for i in order]
    return pd.DataFrame({"item_id": [r["item"] for r in records], "domain": domain, "title": [r["title"] for r in records],
                         "tags": [r["tags"] for r in records], "similarity": similarity[order]})


def nearest_tags(dataset: str, tag: str, k: int = 10) -> pd.DataFrame:
    """The k vocabulary tags whose vectors (features stage) are closest to `tag`'s by cosine, the tag itself left out,
    with the domains whose vocabularies hold them. Columns: tag, domains, similarity."""
    _check_k(k)
    folder = artifacts.features_dir(dataset)
    if not (folder / "tags.tsv").is_file() or not (folder / "tag_vectors.npy").is_file():
        raise data.DataError(f"{folder / 'tags.tsv'}: not found; {dataset} has no tags (run the tags and features stages)")
    table = pd.read_csv(folder / "tags.tsv", sep="\t", keep_default_na=False)
    if tag not in set(table["tag"]):
        raise data.DataError(f"tag {tag!r} is not in {dataset}'s vocabulary ({len(table):,} tags, e.g. {table['tag'].head(3).tolist()})")
    vectors = _unit(np.load(folder / "tag_vectors.npy", allow_pickle=False).astype(np.float64))
    row = int(np.flatnonzero((table["tag"] == tag).to_numpy())[0])
    similarity = vectors @ vectors[row]
    similarity[row] = -np.inf
    order = np.argsort(-similarity, kind="stable")[: min(int(k), len(table) - 1)]
    domains = ["+".join(d for d in data.DOMAINS if f"in_{d}" in table and table[f"in_{d}"].iat[i]) for i in order]
    return pd.DataFrame({"tag": table["tag"].to_numpy()[order], "domains": domains, "similarity": similarity[order]})


# -- the command -----------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    """`tema recommend <dataset> <model> <user> [--domain A|B] [-k 10] [--seed N] [--split S] [--exclude-history] [--json]`.

    Mistakes (unknown user, untrained model, ...) raise DataError or ParamsError: tema.cli prints them as one line."""
    parser = argparse.ArgumentParser(prog="tema recommend", description="a trained run's top-k items for one user, "
                                     "with the tags they share with the user's history")
    parser.add_argument("dataset")
    parser.add_argument("model")
    parser.add_argument("user", help="an example key of the prepared dataset, e.g. test:1234")
    parser.add_argument("--domain", choices=list(data.DOMAINS), default=None, help="default: the domain of the user's target")
    parser.add_argument("-k", type=int, default=10, help="how many items (default 10)")
    parser.add_argument("--seed", type=int, default=None, help="which seed's run (default: the first of train.seeds)")
    parser.add_argument("--split", choices=list(data.SPLITS), default="test", help="the split the user key is an example of")
    parser.add_argument("--exclude-history", action="store_true", help="leave out the items of the user's history "
                        "(evaluation ranks them like any other)")
    parser.add_argument("--json", action="store_true", help="one JSON object (the run, the user, the items) instead of a table")
    args = parser.parse_args(argv)
    params = schema.load()
    table = top_k(args.dataset, args.model, args.user, args.domain, args.k, args.seed, params, args.split,
                  exclude_history=args.exclude_history)
    trained = load(args.dataset, args.model, args.seed, params)
    domain = args.domain or str(example(trained.dataset, args.user, args.split)["target_domain"])
    if args.json:
        print(json.dumps({"dataset": args.dataset, "model": args.model, "seed": trained.seed, "user": args.user, "split": args.split,
                          "domain": domain, "items": table.to_dict(orient="records")}, ensure_ascii=False,
                         default=lambda v: v.item() if isinstance(v, np.generic) else str(v)))
        return 0
    print(f"{args.dataset} / {args.model} (seed {trained.seed}) / user {args.user}: top {len(table)} of domain {domain} "
          f"({trained.dataset.domain_names.get(domain, domain)})")
    marks = np.where(table["is_target"], "target", np.where(table["in_history"], "in history", ""))
    columns = {"rank": table["rank"].astype(str), "item_id": table["item_id"].astype(str), "title": table["title"].str.slice(0, 60),
               "score": table["score"].map("{:.4f}".format), "shared_tags": table["shared_tags"].map(", ".join), "mark": marks}
    columns = {name: [str(v) for v in values] for name, values in columns.items()}
    numeric = {"rank", "item_id", "score"}  # right-aligned; text left-aligned
    widths = {name: max([len(name), *map(len, values)]) for name, values in columns.items()}

    def line(cells: dict[str, str]) -> str:
        return "  ".join(cells[n].rjust(widths[n]) if n in numeric else cells[n].ljust(widths[n]) for n in columns).rstrip()

    print(line({name: name for name in columns}))
    for i in range(len(table)):
        print(line({name: values[i] for name, values in columns.items()}))
    return 0
