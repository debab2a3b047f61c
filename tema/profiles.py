"""Parameter profiles: profiles/<name>.yaml over profiles/default.yaml, written out as params.yaml by `tema profile`.

A profile holds what differs from the one it `extends` (by default the embedded defaults, profiles/default.yaml):
mappings merge key by key, any other value replaces the base's. Two exceptions: a profile's `evaluations` and
`pages` replace the base's whole, and a profile that sets `datasets` or `models` inherits no tables or pages (they
were the base's choice for other datasets or models). `extends: smoke` lays a profile over the smoke profile, so the
smoke settings apply to any dataset:

    # profiles/my-data-smoke.yaml
    extends: smoke
    datasets: [my-data]
    evaluations: {my-data: {dataset: my-data, models: [popularity, sasrec, tema-no-tags]}}
    pages: {my-data: [my-data]}

`tema profile` then fills in what DVC iterates over (dvc.yaml), each derived from the keys above it:

- `evaluations`, `pages`: the tables and pages (tema.config.evaluations, tema.config.pages);
- `readers`: each dataset of `datasets` and its reader's source file (its prepare stage depends on it alone);
- `tag_datasets`: every dataset with a tag source (`tags.sources`) and every dataset of `datasets`, with its
  reader; a dataset of `datasets` without a source gets `{kind: none}`: no tags, said so in its tags report;
- `runs`: the training runs, each (dataset, model) that some table compares (tema.config.runs).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from tema import config, datasets, schema

DERIVED = ("evaluations", "pages", "readers", "tag_datasets", "runs")
TABLE_KEYS = {"evaluations", "pages"}


def profile_dir() -> Path:
    return config.repo_root() / "profiles"


def known() -> list[str]:
    return sorted(p.stem for p in profile_dir().glob("*.yaml"))


def layers(name: str) -> list[tuple[str, dict[str, Any]]]:
    """The profile and the ones it extends, base first: [('default', ...), ..., (name, ...)]."""
    chain: list[tuple[str, dict[str, Any]]] = []
    seen: list[str] = []
    while True:
        if name in seen:
            raise config.ParamsError(f"profiles/{name}.yaml: 'extends' runs in a circle: {' -> '.join([*seen, name])}")
        seen.append(name)
        path = profile_dir() / f"{name}.yaml"
        if not path.is_file():
            raise config.ParamsError(f"unknown profile {name!r}: profiles/{name}.yaml not found; profiles: {known()}")
        body = config.load_params(path)
        base = body.pop("extends", None if name == "default" else "default")
        if name == "default" and base is not None:
            raise config.ParamsError("profiles/default.yaml: the embedded defaults extend no other profile; remove 'extends'")
        if base is not None and not isinstance(base, str):
            raise config.ParamsError(f"profiles/{name}.yaml: 'extends' must name a profile, got {base!r}")
        chain.append((name, body))
        if base is None:
            return chain[::-1]
        name = base


def profile_params(name: str) -> dict[str, Any]:
    """The parameters of a profile (its layers merged), with the derived keys filled in (see the module's doc)."""
    merged: dict[str, Any] = {}
    for _, body in layers(name):
        if {"datasets", "models"} & set(body):  # the tables and pages of other datasets or models: not inherited
            merged = {k: v for k, v in merged.items() if k not in TABLE_KEYS}
        for key in TABLE_KEYS & set(body):  # a profile's tables and pages are its own, not merged with the base's
            merged.pop(key, None)
        merged = config.deep_merge(merged, body)
    return derive(merged)


def derive(params: dict[str, Any]) -> dict[str, Any]:
    """params with the keys DVC iterates over filled in from the others; given values of derived keys are replaced,
    except `evaluations` and `pages`, which a profile may name (config.evaluations)."""
    params = copy.deepcopy(params)
    names = config.get(params, "datasets", list)
    for name in names:
        datasets.spec(name)  # an unknown dataset: one line saying how to add one, before anything else
    tags = params.setdefault("tags", {})
    sources = tags.setdefault("sources", {}) if isinstance(tags, dict) else {}
    if isinstance(sources, dict):
        for name in names:
            sources.setdefault(name, {"kind": "none"})
    tagged = list(dict.fromkeys([*names, *(sources if isinstance(sources, dict) else [])]))
    derived = {
        "evaluations": config.evaluations(params),
        "pages": config.pages(params),
        "readers": {name: datasets.reader_path(name) for name in names},
        "tag_datasets": {name: datasets.reader_path(name) for name in tagged},
    }
    derived["runs"] = config.runs({**params, **derived})
    out: dict[str, Any] = {}
    for key, value in params.items():  # the derived keys follow `models`, where a reader of params.yaml looks for them
        if key in DERIVED:
            continue
        out[key] = value
        if key == "models":
            out.update(derived)
    return out


def suggested_models(dataset: str) -> tuple[list[str], str | None]:
    """The default profile's models that can run on a dataset (what it has: text, and a tag source, which a new
    dataset lacks), each model that reads what is missing replaced by its ablation without it; and the reference."""
    from tema.models import registry  # the models (and torch) only for this suggestion

    has_text = datasets.spec(dataset).has_text
    models = []
    for name in layers("default")[0][1]["models"]:
        missing = {"tags"} | (set() if has_text else {"text"})
        if not registry.inputs(name, {}) & missing:
            models.append(name)
            continue
        base = registry.info(name).base or name
        options = [a for a in registry.ablations_of(base) if not registry.inputs(a, {}) & missing]
        if options:
            models.append(options[0])
    ours = [m for m in models if registry.info(m).group != "baseline"]
    return models, (ours[0] if ours else None)


def suggestion(dataset: str) -> str:
    """The profile lines that run a newly added dataset (what `tema dataset add` prints)."""
    models, reference = suggested_models(dataset)
    table = {"dataset": dataset, "models": models, **({"reference": reference} if reference else {})}
    body = {"extends": "default", "datasets": [dataset], "evaluations": {dataset: table}, "pages": {dataset: [dataset]}}
    return yaml.safe_dump(body, sort_keys=False, default_flow_style=None, width=120)


def apply_profile(name: str) -> Path:
    """Write params.yaml for a profile (see profile_params), once it passes the schema (tema.schema)."""
    params = profile_params(name)
    schema.validate(params)
    header = (f"# Written by `tema profile {name}` from profiles/. Edit profiles/*.yaml, not this file: evaluations, pages,\n"
              "# readers, tag_datasets and runs are derived (tema.profiles).\n")
    out = config.repo_root() / "params.yaml"
    out.write_text(header + yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    return out
