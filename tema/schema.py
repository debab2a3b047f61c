"""One schema for params.yaml: the type, range or allowed values of every key, and no unknown keys.

`validate(params)` checks the whole file at once and raises `config.ParamsError` listing every problem, one line
each, naming the dotted key, the value and what was expected:

    params.yaml: model_params.sasrec.lr: expected a number > 0, got -0.002

`tema profile` checks what it is about to write, and every stage and CLI command checks the parameters before it
reads, deletes or writes anything (`check`, called first by each stage's `run`). Model hyper-parameters are checked
against what each registered model's constructor accepts, with the ranges of HYPER_RULES; an ablation's entry is
optional and holds what differs from its base's (tema.models.registry.hyper).
"""

from __future__ import annotations

import inspect
import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from tema import config, datasets
from tema.tagging import ANSWER_FORMS, Settings

# A rule returns None for a good value, else what was expected ("an integer >= 1").
Rule = Callable[[Any], str | None]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _bounds(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    parts = []
    if low is not None:
        parts.append(f"{'>' if low_open else '>='} {low}")
    if high is not None:
        parts.append(f"{'<' if high_open else '<='} {high}")
    return " and ".join(parts)


def _in_bounds(value: float, low, high, low_open: bool, high_open: bool) -> bool:
    if low is not None and (value <= low if low_open else value < low):
        return False
    return not (high is not None and (value >= high if high_open else value > high))


def integer(low: int | None = None, high: int | None = None) -> Rule:
    expected = " ".join(["an integer", _bounds(low, high, False, False)]).strip()
    return lambda v: None if _is_int(v) and _in_bounds(v, low, high, False, False) else expected


def number(low: float | None = None, high: float | None = None, low_open: bool = False, high_open: bool = False) -> Rule:
    """A finite number in the bounds: NaN compares false with every bound and would pass any range, and infinity is no
    setting (a NaN coverage threshold let any tag run pass, a NaN backoff crashes at the first retry)."""
    expected = " ".join(["a number", _bounds(low, high, low_open, high_open)]).strip()

    def check(v: Any) -> str | None:
        if _is_number(v) and not math.isfinite(v):
            return expected.replace("a number", "a finite number", 1)
        return None if _is_number(v) and _in_bounds(v, low, high, low_open, high_open) else expected
    return check


# What numpy's and Python's generators take as a seed (np.random.seed, which training calls, refuses anything else;
# np.random.default_rng refuses a negative one).
SEED_MAX = 2**32 - 1
seed = integer(0, SEED_MAX)


def repo_folder(v: Any) -> str | None:
    """A folder inside the repository, relative to its root: not absolute, and not resolving outside the root (through
    '..' or a symbolic link), so that a stage writes only what DVC tracks."""
    expected = "a folder inside the repository, relative to its root (e.g. data/tags-smoke)"
    if not isinstance(v, str) or not v.strip():
        return expected
    if os.path.isabs(v) or v.startswith("~") or os.path.normpath(v).split(os.sep)[0] == "..":
        return expected
    try:
        root = config.repo_root().resolve()
    except FileNotFoundError:  # outside a repository: what the text says is all there is to check
        return None
    return None if (root / v).resolve().is_relative_to(root) else f"{expected}; it resolves to {(root / v).resolve()}"


def boolean(v: Any) -> str | None:
    return None if isinstance(v, bool) else "true or false"


def text(v: Any) -> str | None:
    return None if isinstance(v, str) and v.strip() else "a non-empty string"


def choice(*allowed: Any) -> Rule:
    return lambda v: None if isinstance(v, (str, bool, int, float)) and v in allowed else f"one of {list(allowed)}"


def optional(rule: Rule) -> Rule:
    def check(v: Any) -> str | None:
        if v is None:
            return None
        problem = rule(v)
        return None if problem is None else f"null or {problem}"
    return check


def list_of(rule: Rule, unique: bool = True) -> Rule:
    def check(v: Any) -> str | None:
        item_expected = rule(None) or "items"
        expected = f"a non-empty list{' without repeats' if unique else ''} of {_plural(item_expected)}"
        if not isinstance(v, list) or not v or any(rule(x) for x in v):
            return expected
        if unique and len({json.dumps(x, sort_keys=True) for x in v}) != len(v):
            return expected
        return None
    return check


def _plural(expected: str) -> str:
    return re.sub(r"^an? (integer|number|non-empty string)", lambda m: m.group(1) + "s", expected)


def device(v: Any) -> str | None:
    expected = "'auto', 'cpu', 'mps', 'cuda' or 'cuda:<index>'"
    if not isinstance(v, str) or not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", v):
        return expected
    if v.startswith("cuda"):
        import torch  # only for a CUDA device: whether this machine has it (torch takes seconds to import)

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(v.partition(":")[2] or 0)
        if index >= count:
            return f"{expected} of a device this machine has (torch sees {count} CUDA device(s); 'auto' picks one when present)"
    return None


@dataclass(frozen=True)
class Key:
    rule: Rule | dict[str, Key]
    required: bool = True


Section = dict[str, Key]

PREPARE: Section = {
    "seed": Key(seed),
    "subsample": Key({"train_users": Key(optional(integer(1))), "eval_users": Key(optional(integer(1)))}),
}
TRAIN: Section = {
    "seeds": Key(list_of(seed)),
    "max_epochs": Key(integer(1)),
    "patience": Key(integer(1)),
    "batch_size": Key(integer(1)),
    "max_len": Key(integer(1)),
    "loss": Key(choice("full", "sampled")),
    "n_negatives": Key(integer(1)),
    "device": Key(device),
    "num_threads": Key(integer(1)),
    "workers": Key(integer(1)),
}
EVALUATE: Section = {
    "n_candidates": Key(integer(1)),
    "candidate_seed": Key(seed),
    "batch_size": Key(integer(1)),
    "reference": Key(optional(text), required=False),
}
# the llm section: the generation settings of tema.tagging.Settings, with these ranges
LLM_RULES: dict[str, Rule] = {
    "k": integer(1, 20), "temperature": number(0, 2), "max_tokens": integer(1), "frequency_penalty": number(-2, 2),
    "seed": integer(), "timeout_s": number(0, low_open=True), "max_retries": integer(0), "backoff_s": number(0),
    "concurrency": integer(1), "json_mode": boolean, "max_retry_after_s": number(0),
    "answer_form": choice(*ANSWER_FORMS),
}
EMBEDDED: Section = {
    "n_parallel": Key(integer(1)), "n_ctx": Key(integer(64)), "threads": Key(integer(1)),
    "start_timeout_s": Key(number(0, low_open=True), required=False),
}
REFINE: Section = {
    "min_count": Key(integer(1)), "vocab_size": Key(integer(1)), "similarity": Key(number(0, 1, low_open=True)),
    "llm_merge": Key(boolean), "llm_chunk": Key(integer(2)), "llm_merge_similarity": Key(number(0, 1, low_open=True)),
    "map_similarity": Key(number(0, 1, low_open=True)),
}
PASS2: Section = {
    "mode": Key(choice("map", "fill", "retag"), required=False), "min_tags": Key(integer(1), required=False),
    "shortlist": Key(integer(1), required=False),
}
SOURCE: Section = {
    "kind": Key(choice("llm", "external", "none")), "file": Key(text, required=False), "model": Key(text, required=False),
    "pass2": Key(PASS2, required=False),
}
FEATURES: Section = {
    "text_encoder": Key(text), "batch_size": Key(integer(1)), "image_encoder": Key(optional(text), required=False),
    "text_items": Key(choice("all", "used"), required=False),
    "max_seq_length": Key(optional(integer(8)), required=False),
}

# Model hyper-parameters by name, for every model that has them; a parameter not listed here must have the type of
# its constructor default. Checked against what each model's constructor accepts (tema.models.registry.build).
HYPER_RULES: dict[str, Rule] = {
    "dim": integer(1), "blocks": integer(1), "heads": integer(1), "layers": integer(1),
    "dropout": number(0, 1, high_open=True), "lr": number(0, low_open=True), "weight_decay": number(0),
    "max_len": integer(1), "lam": number(0, 1), "loss_positions": integer(1), "aux_weight": number(0),
    "tag_attention": boolean, "cross_attention": boolean, "text": boolean, "visual": boolean, "gate": boolean,
    "tag_dropout": number(0, 1, high_open=True), "tag_noise": number(0, 1), "tag_noise_seed": seed,
    "tags_from": optional(text),
}
INJECTED = ("features",)  # the features stage's arrays, handed to a model by the trainer (tema.training)


def _show(value: Any) -> str:
    shown = repr(value)
    return shown if len(shown) <= 80 else shown[:77] + "..."


def check_section(value: Any, spec: Section, where: str, errors: list[str]) -> None:
    if not isinstance(value, dict):
        errors.append(f"{where}: expected a mapping with keys {sorted(spec)}, got {_show(value)}")
        return
    for key in value:
        if key not in spec:
            errors.append(f"{where}.{key}: unknown key; expected one of {sorted(spec)}")
    for key, field in spec.items():
        if key not in value:
            if field.required:
                errors.append(f"{where}.{key}: missing; expected {_describe(field.rule)}")
            continue
        check_value(value[key], field.rule, f"{where}.{key}", errors)


def _describe(rule: Rule | Section) -> str:
    return f"a mapping with keys {sorted(rule)}" if isinstance(rule, dict) else (rule(object()) or "a value")


def check_value(value: Any, rule: Rule | Section, where: str, errors: list[str]) -> None:
    if isinstance(rule, dict):
        check_section(value, rule, where, errors)
        return
    problem = rule(value)
    if problem is not None:
        errors.append(f"{where}: expected {problem}, got {_show(value)}")


def llm_section() -> Section:
    """The llm section: every generation setting (tema.tagging.Settings) is optional, with its default."""
    out: Section = {"model": Key(text), "embedded": Key(EMBEDDED, required=False)}
    for f in fields(Settings):
        out[f.name] = Key(LLM_RULES.get(f.name) or _type_rule(f.default), required=False)
    return out


def source_llm_section() -> Section:
    """A tag source's own `llm` settings, laid over the llm section for that source alone (config.with_source_llm):
    the same keys, every one optional."""
    return {key: Key(field.rule, required=False) for key, field in llm_section().items()}


def _type_rule(default: Any) -> Rule:
    if isinstance(default, bool):
        return boolean
    if isinstance(default, int):
        return integer()
    if isinstance(default, float):
        return number()
    if isinstance(default, str):
        return text
    return lambda v: None


SOURCE["llm"] = Key(source_llm_section(), required=False)  # here: the llm section's rules need _type_rule


def tags_section(params: dict[str, Any]) -> Section:
    tags = params.get("tags") if isinstance(params.get("tags"), dict) else {}
    datasets = sorted(tags.get("sources") or {})
    others = tags.get("other_sources") if isinstance(tags.get("other_sources"), dict) else {}
    named = {name: Key({source: Key(SOURCE, required=False) for source in (found if isinstance(found, dict) else {})}, required=False)
             for name, found in others.items()}
    return {
        "sources": Key({name: Key({**SOURCE, "name": Key(text, required=False)}, required=False) for name in datasets}),
        "other_sources": Key(named, required=False),
        "limit_items": Key(optional(integer(1))),
        "refine": Key(REFINE),
        "out_dir": Key(repo_folder),
        "min_coverage": Key(number(0, 1)),
    }


def _structure(params: dict[str, Any]) -> Section:
    return {
        "datasets": Key(list_of(text)),
        "models": Key(list_of(text)),
        "evaluations": Key(lambda v: None, required=False),  # checked by config.evaluations
        "pages": Key(lambda v: None, required=False),  # checked by config.pages
        # derived by `tema profile` (tema.profiles), checked against what they derive from below
        "readers": Key(lambda v: None if isinstance(v, dict) else "a mapping of dataset to its reader's file", required=False),
        "tag_datasets": Key(lambda v: None if isinstance(v, dict) else "a mapping of dataset to its reader's file", required=False),
        "tag_sources": Key(lambda v: None if isinstance(v, dict) else "a mapping of <dataset>-<source> to its dataset, source and reader",
                           required=False),
        "runs": Key(lambda v: None if isinstance(v, dict) else "a mapping of run name to its dataset and model", required=False),
        "prepare": Key(PREPARE),
        "train": Key(TRAIN),
        "evaluate": Key(EVALUATE),
        "model_params": Key(lambda v: None if isinstance(v, dict) else "a mapping of model name to its hyper-parameters"),
        "tune": Key({"trials": Key(integer(1)), "seed": Key(seed), "space": Key(lambda v: None),
                     "model_space": Key(lambda v: None, required=False), "designs": Key(lambda v: None, required=False)},
                    required=False),
        "llm": Key(llm_section()),
        "tags": Key(tags_section(params)),
        "features": Key(FEATURES),
    }


def validate(params: dict[str, Any]) -> None:
    """Raise config.ParamsError naming every bad key of params.yaml (one line each); return quietly when all is well."""
    errors: list[str] = []
    if not isinstance(params, dict):
        raise config.ParamsError(f"params.yaml: expected a mapping at the top level, got {_show(params)}")
    check_section(params, _structure(params), "", errors)
    errors = [e.lstrip(".") for e in errors]
    if not errors:  # the cross-key checks read the keys the structure check vouched for
        errors += _cross_checks(params)
    if errors:
        raise config.ParamsError("\n".join(f"params.yaml: {e}" for e in errors))


def _cross_checks(params: dict[str, Any]) -> list[str]:
    errors: list[str] = []
    known = datasets.known()
    how = "add one with `tema dataset add <name> <folder>` (README, 'Your own data')"
    for name in params["datasets"]:
        if name not in known:
            errors.append(f"datasets: unknown dataset {name!r}; expected one of {known} (the folders of data/raw/ with a "
                          f"dataset.yaml), or {how}")
    for name in params["tags"]["sources"]:
        if name not in known:
            errors.append(f"tags.sources.{name}: unknown dataset {name!r}; expected one of {known}, or {how}")
    for name, named in (params["tags"].get("other_sources") or {}).items():
        if name not in known:
            errors.append(f"tags.other_sources.{name}: unknown dataset {name!r}; expected one of {known}, or {how}")
        for source in named or {}:
            if not re.fullmatch(r"[a-z0-9][a-z0-9_-]*", source) or source.startswith("tags-"):
                errors.append(f"tags.other_sources.{name}.{source}: expected a name of lower-case letters, digits, '-' and '_' "
                              "(it names a folder of data/tags/<dataset>/)")
            elif source == config.primary_source_name(params, name):
                errors.append(f"tags.other_sources.{name}.{source}: the name of {name}'s own source (tags.sources.{name}.name); "
                              "expected another name")
    sources_to_check = [(f"tags.sources.{n}", s) for n, s in params["tags"]["sources"].items()]
    sources_to_check += [(f"tags.other_sources.{n}.{k}", s) for n, named in (params["tags"].get("other_sources") or {}).items()
                         for k, s in (named or {}).items()]
    for where, source in sources_to_check:
        if source["kind"] == "external":
            if "file" not in source:
                errors.append(f"{where}.file: missing; an external source names its tag file (item_id<TAB>tags_json)")
        shortlist = (source.get("pass2") or {}).get("shortlist")
        k = config.with_source_llm(params, source)["llm"].get("k", Settings.k)
        if shortlist is not None and shortlist < k:
            errors.append(f"{where}.pass2.shortlist: expected an integer >= llm.k ({k}), got {shortlist}")
    if errors:
        return errors
    errors += _derived_checks(params)
    tags = params["tags"]
    if tags["limit_items"] is not None and os.path.normpath(config.tags_out_dir(params)) == os.path.normpath(config.DEFAULT_TAGS_DIR):
        errors.append(f"tags.out_dir: a limited run (tags.limit_items: {tags['limit_items']}) must not write to {config.DEFAULT_TAGS_DIR}, "
                      "where the full-data tags are; expected another folder (the smoke profile uses data/tags-smoke)")
    errors += _model_checks(params)
    for derive in (config.evaluations, config.pages):
        try:
            derive(params)
        except config.ParamsError as err:
            errors.append(str(err).removeprefix("params.yaml: "))
    if not errors:
        for table in config.evaluations(params):
            try:
                config.reference(params, table)
            except config.ParamsError as err:
                errors.append(str(err).removeprefix("params.yaml: "))
        errors += _input_checks(params)
    return errors


def _derived_checks(params: dict[str, Any]) -> list[str]:
    """The keys `tema profile` derives (tema.profiles) must match what they derive from: a hand edit of `datasets` (or
    `dvc exp run -S datasets=...`) without them would run stages of other datasets than the ones named."""
    names = params["datasets"]
    sources = params["tags"]["sources"]
    expected = {"readers": {n: datasets.reader_path(n) for n in names},
                "tag_datasets": {n: datasets.reader_path(n) for n in names},
                "tag_sources": {f"{n}-{k}": {"dataset": n, "source": k, "reader": datasets.reader_path(n)}
                                for n, named in (params["tags"].get("other_sources") or {}).items() if n in names
                                for k in (named or {})}}
    errors = []
    for key, value in expected.items():
        if key in params and params[key] != value:
            errors.append(f"{key}: expected {value} (derived from datasets and tags.sources by `tema profile`), got "
                          f"{_show(params[key])}; write params.yaml with `tema profile <name>`")
    missing = [n for n in names if n not in sources]
    if "tag_datasets" in params and missing:
        errors.append(f"tags.sources: missing {missing}; every dataset of `datasets` has a tag source ({{kind: none}} for none)")
    return errors


def _input_checks(params: dict[str, Any]) -> list[str]:
    """Each run's model reads only what its dataset has: item text where dataset.yaml names a title or text column, tags
    where the dataset has a tag source. Said here, when the profile is written, not after hours of training."""
    registry = _registry()
    errors = []
    runs = params.get("runs") or config.runs(params)
    for run in runs.values():
        dataset, model = run["dataset"], run["model"]
        if model not in registry.MODELS:
            continue
        reads = registry.inputs(model, registry.hyper(params, model))
        if "text" in reads and not datasets.spec(dataset).has_text:
            errors.append(f"runs: {model} reads item text, but {dataset} has none (its dataset.yaml names no title or text "
                          f"column); leave {model} out of {dataset}'s tables{_without(registry, model, 'text')}")
        wanted = {**registry.hyper(params, model), **registry.info(model).fixed}.get("tags_from")
        if "tags" in reads and wanted is not None and wanted not in config.source_names(params, dataset):
            errors.append(f"runs: {model} reads the tags of source {wanted!r} (tags_from), but {dataset}'s tag sources are "
                          f"{config.source_names(params, dataset)}; add it under tags.other_sources.{dataset} (docs/tagging.md)")
            continue
        kind = params["tags"]["sources"].get(dataset, {"kind": "none"})["kind"]
        if "tags" in reads and kind == "none" and wanted is None:
            errors.append(f"runs: {model} reads tags, but {dataset} has no tag source (tags.sources.{dataset}.kind: none); "
                          f"give it one (docs/datasets.md) or leave {model} out of {dataset}'s tables{_without(registry, model, 'tags')}")
    return errors


def _without(registry, model: str, feature: str) -> str:
    """', or compare tema-no-tags' where an ablation of the model reads everything but the feature."""
    base = registry.info(model).base or model
    for name in registry.ablations_of(base):
        if feature not in registry.inputs(name, {}):
            return f", or compare {name}"
    return ""


def _registry():
    """tema.models.registry, imported when first needed: it imports the models, and with them torch (seconds), which
    only the model checks need."""
    from tema.models import registry

    return registry


def _model_checks(params: dict[str, Any]) -> list[str]:
    registry = _registry()
    errors: list[str] = []
    registered = sorted(registry.MODELS)
    section = params["model_params"]
    needed: dict[str, list[str]] = {}  # entry -> the listed models that read it (an ablation reads its base's)
    compared = params["models"] + [m for t in (params.get("evaluations") or {}).values() if isinstance(t, dict)
                                   for m in (t.get("models") or []) if isinstance(m, str)]
    for name in dict.fromkeys(compared):  # the models of `models` and of every table: those that train (runs)
        if name not in registry.MODELS:
            where = "models" if name in params["models"] else "evaluations"
            errors.append(f"{where}: unknown model {name!r}; expected one of {registered}")
        else:
            needed.setdefault(registry.info(name).base or name, []).append(name)
    for name, readers in needed.items():
        if name not in section:
            inheriting = [m for m in readers if m != name]
            why = f", which {', '.join(inheriting)} inherit{'s' * (len(inheriting) == 1)}" if inheriting else ""
            errors.append(f"model_params.{name}: missing; expected the hyper-parameters of {name}{why} (an empty mapping {{}} for none)")
    for name, hyper in section.items():
        if name not in registry.MODELS:
            errors.append(f"model_params.{name}: unknown model; expected one of {registered}")
        elif hyper is not None and not isinstance(hyper, dict):
            errors.append(f"model_params.{name}: expected a mapping of hyper-parameters, got {_show(hyper)}")
        else:
            errors += hyper_errors(name, hyper or {}, f"model_params.{name}", _inherited(params, name))
    tune = params.get("tune") or {}
    space = tune.get("space") or {}
    if not isinstance(space, dict):
        errors.append(f"tune.space: expected a mapping of hyper-parameter to a list of values, got {_show(space)}")
        space = {}
    any_model: dict[str, Rule] = {}
    for name in registry.names():
        any_model.update(accepted_hyper(name))
    for key, values in space.items():
        if key not in any_model:
            errors.append(f"tune.space.{key}: unknown key; expected a hyper-parameter of some model, one of {sorted(any_model)}")
            continue
        check_value(values, list_of(any_model[key]), f"tune.space.{key}", errors)
    own = tune.get("model_space") or {}
    for name, grid in (own.items() if isinstance(own, dict) else []):
        if name not in registry.MODELS:
            errors.append(f"tune.model_space.{name}: unknown model; expected one of {registered}")
        elif not isinstance(grid, dict):
            errors.append(f"tune.model_space.{name}: expected a mapping of hyper-parameter to a list of values, got {_show(grid)}")
        else:
            for key, values in grid.items():
                accepted = accepted_hyper(name)
                if key not in accepted:
                    errors.append(f"tune.model_space.{name}.{key}: unknown key; {name} accepts {sorted(accepted)}")
                else:
                    check_value(values, list_of(accepted[key]), f"tune.model_space.{name}.{key}", errors)
    designs = tune.get("designs") or {}
    if not isinstance(designs, dict):
        errors.append(f"tune.designs: expected a mapping of model to a list of variants, got {_show(designs)}")
        designs = {}
    for name, variants in designs.items():
        if name not in registry.MODELS:
            errors.append(f"tune.designs.{name}: unknown model; expected one of {registered}")
        elif not isinstance(variants, list) or not all(isinstance(v, dict) and v for v in variants):
            errors.append(f"tune.designs.{name}: expected a list of variants, each a mapping of the settings it changes, "
                          f"got {_show(variants)}")
        else:
            accepted = accepted_hyper(name)
            for i, variant in enumerate(variants):
                for key, value in variant.items():
                    if key not in accepted:
                        errors.append(f"tune.designs.{name}[{i}].{key}: unknown key; {name} accepts {sorted(accepted)}")
                    else:
                        check_value(value, accepted[key], f"tune.designs.{name}[{i}].{key}", errors)
    return errors


def accepted_hyper(model: str) -> dict[str, Rule]:
    """The hyper-parameters a registered model accepts in params.yaml, each with its rule."""
    registry = _registry()
    entry = registry.info(model)
    out: dict[str, Rule] = {}
    for name, p in inspect.signature(entry.cls.__init__).parameters.items():
        if name in ("self", "space", "max_len") or name in INJECTED or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
            continue
        out[name] = HYPER_RULES.get(name) or _type_rule(p.default)
    for name in registry.TRAINING_KEYS:
        out[name] = HYPER_RULES[name]
    for name, allowed in entry.choices.items():
        out[name] = choice(*allowed)
    return out


def _inherited(params: dict[str, Any], name: str) -> dict[str, Any]:
    """What an ablation's entry is merged over (registry.inherited_params); {} where the base's entry is missing or no
    mapping, which the checks report on the base's entry."""
    try:
        return _registry().inherited_params(params, name)
    except config.ParamsError:
        return {}


def hyper_errors(name: str, hyper: dict[str, Any], where: str, inherited: dict[str, Any] | None = None) -> list[str]:
    """What is wrong with one model's hyper-parameters: unknown keys, bad values, heads not dividing dim, a switch
    that contradicts the ablation. `inherited`: what an ablation's entry is merged over (its base's)."""
    registry = _registry()
    cls = registry.info(name).cls
    accepted = accepted_hyper(name)
    errors = []
    for key, value in hyper.items():
        if key in INJECTED:
            errors.append(f"{where}.{key}: the trainer passes each dataset's features; remove it from params.yaml")
        elif key not in accepted:
            errors.append(f"{where}.{key}: unknown key; {name} accepts {sorted(accepted)}")
        else:
            check_value(value, accepted[key], f"{where}.{key}", errors)
    if errors:
        return errors
    effective = {**(inherited or {}), **hyper}
    dim, heads = _effective(cls, effective, "dim"), _effective(cls, effective, "heads")
    # an ablation's entry answers for what it changes (its base's entry for the rest)
    if _is_int(dim) and _is_int(heads) and dim % heads and (registry.info(name).base is None or {"dim", "heads"} & set(hyper)):
        errors.append(f"{where}.heads: expected a divisor of dim ({dim}), got {heads}")
    for key, fixed in registry.info(name).fixed.items():
        if key in hyper and hyper[key] != fixed:
            errors.append(f"{where}.{key}: this ablation fixes {key} = {fixed!r}; remove the key or set it to {fixed!r}, "
                          f"got {_show(hyper[key])}")
    return errors


def _effective(cls: type, hyper: dict[str, Any], key: str) -> Any:
    param = inspect.signature(cls.__init__).parameters.get(key)
    return hyper.get(key, None if param is None else param.default)


_checked: set[str] = set()


def check(params: dict[str, Any]) -> dict[str, Any]:
    """validate(params) once per distinct parameter set in this process (stages call it first); returns params."""
    key = json.dumps(params, sort_keys=True, default=str)
    if key not in _checked:
        validate(params)
        _checked.add(key)
    return params


def load(path: str | Path | None = None) -> dict[str, Any]:
    """params.yaml, validated."""
    return check(config.load_params(path))
