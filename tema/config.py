"""Repository paths and params.yaml, resolved the same way from the shell, DVC and JupyterLab."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml


class ParamsError(ValueError):
    """A parameter in params.yaml is missing or has the wrong type or value."""


def repo_root() -> Path:
    """The repository root: the first folder holding dvc.yaml, from the cwd upward, else beside the package.

    Notebooks run from notebooks/ (JupyterLab) or from the root (papermill); both resolve here.
    """
    for folder in [Path.cwd(), *Path.cwd().parents]:
        if (folder / "dvc.yaml").is_file() and (folder / "params.yaml").is_file():
            return folder
    here = Path(__file__).resolve().parents[1]
    if (here / "params.yaml").is_file():
        return here
    raise FileNotFoundError("cannot find the repository root (a folder with dvc.yaml and params.yaml)")


class DuplicateKeyError(yaml.YAMLError):
    """A mapping of a YAML file names one key twice (PyYAML would keep the last silently; DVC refuses the file)."""

    def __init__(self, key: Any, line: int, first: int):
        super().__init__(f"line {line}: duplicate key {key!r} (first at line {first})")
        self.key, self.line, self.first = key, line, first


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping, at any nesting level (merge keys `<<` may still
    be overridden, as YAML means them to be)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    if key in seen:
                        raise DuplicateKeyError(key, line, seen[key])
                    seen[key] = line
                except TypeError:  # an unhashable key: the constructor's own error says so
                    continue
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path, error: type[Exception] = ValueError, text: str | None = None) -> Any:
    """The YAML file `path` (or `text`, read from it), parsed with UniqueKeyLoader. A file that is no YAML, or names a
    key twice in a mapping, raises `error` with one line naming the file (and the line)."""
    try:
        if text is not None:
            return yaml.load(text, Loader=UniqueKeyLoader)  # a SafeLoader
        with open(path, encoding="utf-8") as f:  # the stream: YAML's own messages name the file
            return yaml.load(f, Loader=UniqueKeyLoader)
    except DuplicateKeyError as err:
        raise error(f"{path}:{err.line}: duplicate key {err.key!r} (first at line {err.first}); expected each key once in "
                    "a mapping (YAML would keep the last one silently; DVC refuses such a file)") from None
    except (yaml.YAMLError, UnicodeDecodeError) as err:  # a hand edit gone wrong: one line naming the file, no traceback
        raise error(f"{path}: expected YAML, could not parse it ({' '.join(str(err).split())})") from None


def load_params(path: str | Path | None = None) -> dict[str, Any]:
    """params.yaml (or a profile, or another parameter file): a mapping, each key once (read_yaml)."""
    path = Path(path) if path else repo_root() / "params.yaml"
    params = read_yaml(path, ParamsError)
    if not isinstance(params, dict):
        raise ParamsError(f"{path}: expected a mapping at the top level")
    return params


def get(params: dict[str, Any], dotted: str, kind: type | tuple[type, ...] | None = None) -> Any:
    """params['a']['b'] for 'a.b', with a message naming the parameter when it is missing or mistyped."""
    node: Any = params
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ParamsError(f"params.yaml: missing parameter '{dotted}'")
        node = node[part]
    if kind is not None:
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if not isinstance(node, kinds) or (isinstance(node, bool) and bool not in kinds):
            names = " or ".join(k.__name__ for k in kinds)
            raise ParamsError(f"params.yaml: '{dotted}' must be {names}, got {node!r}")
    return node


def with_source_llm(params: dict[str, Any], source: dict[str, Any]) -> dict[str, Any]:
    """params whose `llm` section is the global one with a tag source's own `llm` settings laid over it
    (`tags.sources.<dataset>.llm`, `tags.other_sources.<dataset>.<name>.llm`): a model or a setting given for one
    source asks nothing different of another source, and each source's tags stage depends on its own entry only."""
    own = source.get("llm") if isinstance(source, dict) else None
    if not own:
        return params
    return {**params, "llm": deep_merge(params.get("llm") or {}, own)}


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def dataset_dir(kind: str, dataset: str) -> Path:
    """Where a stage keeps its outputs for one dataset: data/<kind>/<dataset>."""
    return repo_root() / "data" / kind / dataset


DEFAULT_TAGS_DIR = "data/tags"


def tags_out_dir(params: dict[str, Any]) -> str:
    """Where the tags stage writes, relative to the repository root: `tags.out_dir`, by default data/tags.

    A limited run (tags.limit_items, as in the smoke profile) must write elsewhere (tema.schema checks it), so that it
    can never overwrite the full-data tags.
    """
    return (params.get("tags") or {}).get("out_dir") or DEFAULT_TAGS_DIR


DEFAULT_SOURCE_NAME = "default"


def primary_source_name(params: dict[str, Any], dataset: str) -> str:
    """The name of a dataset's own tag source (`tags.sources.<dataset>.name`, else "default"): the one its features
    stage reads first and TEMA reads unless a model names another (`tags_from`)."""
    source = ((params.get("tags") or {}).get("sources") or {}).get(dataset) or {}
    return source.get("name") or DEFAULT_SOURCE_NAME if isinstance(source, dict) else DEFAULT_SOURCE_NAME


def other_sources(params: dict[str, Any], dataset: str) -> dict[str, dict[str, Any]]:
    """A dataset's further tag sources by name (`tags.other_sources.<dataset>.<name>`), each tagged beside the first."""
    found = ((params.get("tags") or {}).get("other_sources") or {}).get(dataset) or {}
    return found if isinstance(found, dict) else {}


def source_names(params: dict[str, Any], dataset: str) -> list[str]:
    """Every tag source of a dataset by name, its own first."""
    return [primary_source_name(params, dataset), *other_sources(params, dataset)]


def tags_dir(params: dict[str, Any], dataset: str, source: str | None = None) -> Path:
    """A dataset's tags stage outputs: <tags.out_dir>/<dataset> for its own source, <tags.out_dir>/<dataset>/<source>
    for each of `tags.other_sources.<dataset>` (so the features stage's dependency on the first covers them all)."""
    out = repo_root() / tags_out_dir(params) / dataset
    return out if source is None or source == primary_source_name(params, dataset) else out / source


def evaluations(params: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The tables the evaluate stage writes: name -> {'dataset': ..., 'models': [...]} (reports/<name>/).

    Without an `evaluations` parameter: one table per dataset of `datasets`, named after it, comparing every
    model of `models`. A profile names its tables when one dataset needs two, as the full profile does for
    food-kitchen: its main table keeps the default profile's models (so both profiles share that table's
    dvc.lock entry) and a second table compares TEMA with its ablations. What is trained follows the tables (runs).
    """
    datasets = get(params, "datasets", list)
    models = get(params, "models", list)
    if params.get("evaluations") is None:
        return {d: {"dataset": d, "models": list(models)} for d in datasets}
    tables = get(params, "evaluations", dict)
    for name, spec in tables.items():
        check_name("evaluations", name)
        if not isinstance(spec, dict) or not isinstance(spec.get("dataset"), str) or not isinstance(spec.get("models"), list) \
                or not spec["models"] or set(spec) - {"dataset", "models", "reference"}:
            raise ParamsError(f"params.yaml: 'evaluations.{name}' must be a mapping with 'dataset' (a name), 'models' "
                              f"(a non-empty list) and optionally 'reference' (one of its models), got {spec!r}")
        if spec.get("reference") is not None and spec["reference"] not in spec["models"]:
            raise ParamsError(f"params.yaml: 'evaluations.{name}.reference' is {spec['reference']!r}, which is not among its "
                              f"models {spec['models']}")
        if spec["dataset"] not in datasets:
            raise ParamsError(f"params.yaml: 'evaluations.{name}.dataset' is {spec['dataset']!r}, which is not among 'datasets' {datasets}")
    return tables


def reference(params: dict[str, Any], table: str) -> str | None:
    """The model a table's paired tests compare with every other: the table's own `reference`, else
    `evaluate.reference` (which must then be among the table's models), else TEMA where the table has it, else none."""
    spec = evaluations(params)[table]
    if spec.get("reference") is not None:
        return spec["reference"]
    chosen = (params.get("evaluate") or {}).get("reference")
    if chosen is not None:
        if chosen not in spec["models"]:
            raise ParamsError(f"params.yaml: evaluate.reference: expected one of the models of table {table!r} {spec['models']}, "
                              f"or null (TEMA where a table has it; a table may name its own, evaluations.{table}.reference), "
                              f"got {chosen!r}")
        return chosen
    return "tema" if "tema" in spec["models"] else None


def runs(params: dict[str, Any]) -> dict[str, dict[str, str]]:
    """The training runs: '<dataset>-<model>' -> {'dataset', 'model'} for each model some table of the dataset compares
    (the train stage, dvc.yaml), in the order of `datasets`, then of first appearance in the tables."""
    tables = evaluations(params)
    out: dict[str, dict[str, str]] = {}
    for dataset in get(params, "datasets", list):
        for spec in tables.values():
            if spec["dataset"] != dataset:
                continue
            for model in spec["models"]:
                key = f"{dataset}-{model}"
                if key in out and out[key] != {"dataset": dataset, "model": model}:
                    raise ParamsError(f"params.yaml: the runs of {out[key]} and {{'dataset': {dataset!r}, 'model': {model!r}}} "
                                      f"would share the stage name train@{key}; rename the dataset")
                out[key] = {"dataset": dataset, "model": model}
    return out


def pages(params: dict[str, Any]) -> dict[str, list[str]]:
    """The report pages: name -> the evaluation tables it shows, in order (reports/<name>.html).

    Without a `pages` parameter: one page, `index` (reports/index.html), with every table. The full profile adds a
    page of its own and keeps the default profile's index, so switching profiles leaves index.html as it is.
    """
    tables = evaluations(params)
    if params.get("pages") is None:
        return {"index": list(tables)}
    out = get(params, "pages", dict)
    for name, shown in out.items():
        check_name("pages", name)
        if not isinstance(shown, list) or not shown:
            raise ParamsError(f"params.yaml: 'pages.{name}' must be a non-empty list of evaluation tables, got {shown!r}")
        unknown = [t for t in shown if t not in tables]
        if unknown:
            raise ParamsError(f"params.yaml: 'pages.{name}' has {unknown}, which are not tables of 'evaluations' {list(tables)}")
    return out


def check_name(key: str, name: Any) -> None:
    """A table or page name becomes a path under reports/ and data/eval/: letters, digits, '-' and '_' only."""
    if not isinstance(name, str) or not name.replace("-", "").replace("_", "").isalnum():
        raise ParamsError(f"params.yaml: '{key}' has the name {name!r}; expected letters, digits, '-' or '_'")
