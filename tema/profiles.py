"""Parameter profiles: profiles/<name>.yaml over profiles/default.yaml, written out as params.yaml by `tema profile`.

A profile holds what differs from the one it `extends` (by default the embedded defaults, profiles/default.yaml):
mappings merge key by key, any other value replaces the base's. Two exceptions: a profile's `evaluations` and
`pages` replace the base's whole, and a profile that sets `datasets` or `models` inherits no tables or pages (they
were the base's choice for other datasets or models). `extends: smoke` lays a profile over the smoke profile, so the
smoke settings apply to any dataset, and so does its `workspace` (see "workspaces" below: such a profile is written
into build/smoke/ and writes nothing of the repository):

    # profiles/my-data-smoke.yaml
    extends: smoke
    datasets: [my-data]
    evaluations: {my-data: {dataset: my-data, models: [popularity, sasrec, tema-no-tags]}}
    pages: {my-data: [my-data]}

`tema profile` then fills in what DVC iterates over (dvc.yaml), each derived from the keys above it:

- `evaluations`, `pages`: the tables and pages (tema.config.evaluations, tema.config.pages);
- `readers`: each dataset of `datasets` and its reader's source file (its prepare stage depends on it alone);
- `tag_datasets`: every dataset of `datasets`, with its reader (its tags stage); a dataset without a source gets
  `{kind: none}`: no tags, said so in its tags report. Sources of datasets the profile does not study are not run;
- `tag_sources`: each further named tag source of a dataset of `datasets` (`tags.other_sources.<dataset>.<name>`) as
  `<dataset>-<name>`, with its dataset, name and reader (its own tags stage, `tags-source@<dataset>-<name>`);
- `runs`: the training runs, each (dataset, model) that some table compares (tema.config.runs).

Edits of params.yaml itself (by hand, or `dvc exp run -S train.max_epochs=5`) survive the next `tema profile`: it
compares params.yaml with what it last wrote (the record beside it, .params-written.yaml, committed with it) and
keeps every value changed or added since as an override on top of the profile it writes, one line each said so;
`tema profile <name> --reset` writes the profile alone (docs/profiles.md). The derived keys are recomputed, never
kept. An override the new profile has no place for (its parent key is missing), a removed key, or an override that
no longer validates is an error naming it.
"""

from __future__ import annotations

import contextlib
import copy
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tema import atomic, config, data, datasets, schema

DERIVED = ("evaluations", "pages", "readers", "tag_datasets", "tag_sources", "runs")
TABLE_KEYS = {"evaluations", "pages"}
RECORD = ".params-written.yaml"  # beside params.yaml: what `tema profile` last wrote there (see apply_profile)
WRITTEN_BY = re.compile(r"\A# Written by `tema profile ([^`\s]+)`")


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


def merged(name: str) -> dict[str, Any]:
    """The layers of a profile merged, before the derived keys are filled in (without `workspace`: see workspace_of)."""
    out: dict[str, Any] = {}
    for _, body in layers(name):
        body = {k: v for k, v in body.items() if k != "workspace"}
        if {"datasets", "models"} & set(body):  # the tables and pages of other datasets or models: not inherited
            out = {k: v for k, v in out.items() if k not in TABLE_KEYS}
        for key in TABLE_KEYS & set(body):  # a profile's tables and pages are its own, not merged with the base's
            out.pop(key, None)
        out = config.deep_merge(out, body)
    return out


def profile_params(name: str) -> dict[str, Any]:
    """The parameters of a profile (its layers merged), with the derived keys filled in (see the module's doc)."""
    return derive(merged(name))


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
    others = tags.setdefault("other_sources", {}) if isinstance(tags, dict) else {}
    # only the profile's own datasets: a source of another dataset (food-kitchen's, set in the defaults) is never
    # re-run by a profile that does not study it, whatever its llm settings say
    derived = {
        "evaluations": config.evaluations(params),
        "pages": config.pages(params),
        "readers": {name: datasets.reader_path(name) for name in names},
        "tag_datasets": {name: datasets.reader_path(name) for name in names},
        "tag_sources": {f"{name}-{source}": {"dataset": name, "source": source, "reader": datasets.reader_path(name)}
                        for name, named in (others.items() if isinstance(others, dict) else []) if isinstance(named, dict)
                        and name in names for source in named},
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


def header(name: str, kept: dict[str, Any]) -> str:
    """params.yaml's opening comment; with overrides, a line naming them (comments change no DVC fingerprint)."""
    text = (f"# Written by `tema profile {name}` from profiles/. Edit profiles/*.yaml, not this file: evaluations, pages,\n"
            "# readers, tag_datasets and runs are derived (tema.profiles).\n")
    if kept:
        text += (f"# Kept over the profile from an edited params.yaml (by hand or `dvc exp run -S`; `tema profile {name} --reset`\n"
                 f"# drops them): {', '.join(f'{k}={show(v)}' for k, v in kept.items())}\n")
    return text


def show(value: Any) -> str:
    """A value as one line of YAML (as `dvc exp run -S key=value` takes it)."""
    return yaml.safe_dump(value, default_flow_style=True, width=2**31).strip().removesuffix("...").strip()


def same(a: Any, b: Any) -> bool:
    """Equal as values and types (True is not 1, 5 is not 5.0), mappings in any order."""
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def differences(now: dict[str, Any], before: dict[str, Any], path: tuple[str, ...] = ()) -> tuple[
        list[tuple[tuple[str, ...], Any]], list[tuple[str, ...]]]:
    """Where `now` differs from `before`: ([(key path, its value now)] changed or added, [key path] removed), each path
    the shallowest at which the two part (mappings are compared key by key, any other value whole)."""
    changed: list[tuple[tuple[str, ...], Any]] = []
    removed: list[tuple[str, ...]] = []
    for key, value in now.items():
        here = (*path, str(key))
        if key not in before:
            changed.append((here, value))
        elif isinstance(value, dict) and isinstance(before[key], dict):
            more, gone = differences(value, before[key], here)
            changed += more
            removed += gone
        elif not same(value, before[key]):
            changed.append((here, value))
    removed += [(*path, str(key)) for key in before if key not in now]
    return changed, removed


def record_path() -> Path:
    return config.repo_root() / RECORD


def last_written() -> tuple[str, dict[str, Any], dict[str, Any]] | None:
    """What `tema profile` last wrote to params.yaml: (the profile, the overrides it kept, every value written);
    None where there is nothing to compare with (no params.yaml, or one of no known origin).

    From the record beside params.yaml. Without one, or with one that names another profile than params.yaml's header
    (params.yaml written by an older tema), the profile of the header as it reads now stands in."""
    target = config.repo_root() / "params.yaml"
    if not target.is_file():
        return None
    match = WRITTEN_BY.match(target.read_text(encoding="utf-8"))
    named = match.group(1) if match else None
    if record_path().is_file():
        body = config.load_params(record_path())
        profile, overrides, written = body.get("profile"), body.get("overrides"), body.get("written")
        if not (isinstance(profile, str) and isinstance(overrides, dict) and isinstance(written, dict)):
            raise config.ParamsError(f"{RECORD}: expected what `tema profile` writes there (profile, overrides, written); "
                                     "delete it (edits of params.yaml are then not kept) or pass --reset")
        if named in (None, profile):
            return profile, overrides, written
    if named is None:
        return None
    try:
        return named, {}, profile_params(named)
    except (config.ParamsError, data.DataError):
        return None


def overlay(params: dict[str, Any], overrides: dict[str, Any], name: str, since: str) -> dict[str, Any]:
    """params with each override (dotted key -> value) set, in order; a mapping merges into a mapping. An override
    whose parent key the profile lacks is an error naming it."""
    out = copy.deepcopy(params)
    problems = []
    for key, value in overrides.items():
        *parents, last = key.split(".")
        node: Any = out
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            problems.append(f"params.yaml: {key}={show(value)} was set in params.yaml since `tema profile {since}` wrote it, but "
                            f"profile {name} has no {'.'.join(parents)} to keep it in; drop it with `tema profile {name} --reset`")
            continue
        old = node.get(last)
        node[last] = config.deep_merge(old, value) if isinstance(value, dict) and isinstance(old, dict) else copy.deepcopy(value)
    if problems:
        raise config.ParamsError("\n".join(problems))
    return out


# -- workspaces ----------------------------------------------------------------------------------------
# A test-scale profile (smoke, and every profile that extends it) names a `workspace`: a folder of its own where
# `tema profile` writes its params.yaml and where `dvc repro` writes its runs, reports, stage reports and dvc.lock.
# The repository's params.yaml, dvc.lock, reports/ and data/ are never touched by it.

WORKSPACE_MARK = ".tema-workspace"  # in a workspace's root: `tema profile` there writes its own params.yaml
# what a workspace holds of the repository: the code and pipeline (mirrored on every `tema profile`), DVC's plot
# templates and the inputs (raw data, committed tags and answer cache), copied, never linked, so that nothing a
# workspace run writes can reach a committed file. Its reports/tuning/ starts empty: its searches are its own.
MIRRORED = ("dvc.yaml", ".dvcignore", ".dvc/plots", "tema", "notebooks", "profiles", "vendor", "examples", "data/raw",
            "data/tags", "data/tags-cache")
# mirrored exactly: a file removed from the repository goes from the workspace (a profile too: write profiles in the
# repository's profiles/; the workspace's pages link the profiles it has)
EXACT = ("tema", "notebooks", "profiles", "vendor", ".dvc/plots")
SKIPPED = ("__pycache__", ".ipynb_checkpoints")


def workspace_of(name: str) -> Path | None:
    """The workspace a profile names (its own `workspace` or the nearest of the profiles it extends), or None.

    A relative folder inside the repository, git-ignored (build/...): a ParamsError names the profile otherwise."""
    found = None
    for layer, body in layers(name):
        if "workspace" in body:
            found = (layer, body["workspace"])
    if found is None:
        return None
    layer, value = found
    root = config.repo_root()
    if not isinstance(value, str) or not value or Path(value).is_absolute() or not value.startswith("build/") \
            or ".." in Path(value).parts:
        raise config.ParamsError(f"profiles/{layer}.yaml: 'workspace' must be a folder under build/ (git-ignored), "
                                 f"relative to the repository, got {value!r}")
    return root / value


def in_workspace() -> bool:
    return (config.repo_root() / WORKSPACE_MARK).is_file()


def _files(src: Path):
    if src.is_file():
        yield src
        return
    for path in sorted(src.rglob("*")):
        if path.is_file() and not set(path.relative_to(src).parts) & set(SKIPPED) and not path.name.endswith(".lock"):
            yield path


def sync_workspace(workspace: Path) -> Path:
    """Create or refresh a workspace: a copy of what MIRRORED names, a DVC project of its own (no git: its dvc.lock
    stays in it), and the mark that makes `tema profile` write there. Files are copied where their bytes differ."""
    import filecmp
    import shutil

    root = config.repo_root()
    workspace.mkdir(parents=True, exist_ok=True)
    for rel in MIRRORED:
        src = root / rel
        if not src.exists():
            continue
        if src.is_dir():
            (workspace / rel).mkdir(parents=True, exist_ok=True)
        wanted = set()
        for path in _files(src):
            dst = workspace / path.relative_to(root)
            wanted.add(dst)
            if dst.is_file() and filecmp.cmp(path, dst, shallow=False):
                continue
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dst)
        if rel in EXACT and (workspace / rel).is_dir():
            for extra in _files(workspace / rel):
                if extra not in wanted:
                    extra.unlink()
    (workspace / "reports" / "tuning").mkdir(parents=True, exist_ok=True)  # the report stage depends on the folder
    dvc_dir = workspace / ".dvc"
    dvc_dir.mkdir(exist_ok=True)
    text = (root / ".dvc" / "config").read_text(encoding="utf-8") if (root / ".dvc" / "config").is_file() else "[core]\n"
    text = text.replace("autostage = true", "autostage = false")
    if "no_scm" not in text:
        text = text.replace("[core]\n", "[core]\n    no_scm = true\n", 1)
    if not (dvc_dir / "config").is_file() or (dvc_dir / "config").read_text(encoding="utf-8") != text:
        atomic.write_text(dvc_dir / "config", text)
    (dvc_dir / ".gitignore").write_text("/config.local\n/tmp\n/cache\n")
    if not (workspace / "params.yaml").is_file():  # what makes it a repository root (config.repo_root) until written
        (workspace / "params.yaml").write_text("{}\n")
    (workspace / WORKSPACE_MARK).write_text("A workspace of tema profiles (tema.profiles.sync_workspace); delete it at will.\n")
    return workspace


@dataclass
class Written:
    """What `tema profile` did: the file it wrote, the edits of params.yaml it kept over the profile (dotted key ->
    value) and the edits of derived keys it dropped (they are recomputed)."""

    path: Path
    profile: str
    kept: dict[str, Any] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)
    workspace: Path | None = None  # where the profile runs, when it names a workspace

    def lines(self) -> list[str]:
        out = [f"kept {key}={show(value)} from params.yaml (set by hand or dvc exp run -S); --reset drops it"
               for key, value in self.kept.items()]
        out += [f"dropped the edit of {key} in params.yaml: `tema profile` derives it (a profile may name its tables and "
                f"pages: profiles/{self.profile}.yaml)" for key in self.dropped]
        out.append(f"wrote {self.path}")
        if self.workspace is not None:
            rel = self.workspace.relative_to(config.repo_root())
            out.append(f"profile {self.profile} runs in its own workspace, {rel}/ (the repository's params.yaml, dvc.lock, "
                       f"reports/ and data/ stay as they are); run it with: cd {rel} && dvc repro")
        return out


def apply_profile(name: str, reset: bool = False) -> Written:
    """Write params.yaml for a profile (see profile_params), once it passes the schema (tema.schema), keeping the edits
    made to params.yaml since the last `tema profile` as overrides (unless `reset`), and the record beside it.

    The edits are the values of params.yaml that differ from what was last written there (the record's `written`);
    with the overrides kept then, they are laid over the profile's merged layers, before the derived keys are filled
    in. An override equal to the profile's value is no override. Without overrides, params.yaml holds the profile
    alone, byte for byte as before overrides existed; writing the same profile twice writes the same bytes.

    A profile that names a workspace (workspace_of) is written there instead, after the workspace is refreshed
    (sync_workspace), unless this is that workspace already."""
    workspace = workspace_of(name)
    if workspace is not None and not in_workspace():
        schema.validate(derive(merged(name)))  # the profile's mistakes before anything is copied
        sync_workspace(workspace)
        with contextlib.chdir(workspace):
            if config.repo_root() != workspace:
                raise config.ParamsError(f"{workspace}: not a workspace (expected dvc.yaml and params.yaml in it)")
            written = write_profile(name, reset)
        written.workspace = workspace
        return written
    return write_profile(name, reset)


def write_profile(name: str, reset: bool = False) -> Written:
    """apply_profile's work in the repository (or workspace) at hand."""
    base = merged(name)
    pure = derive(base)
    schema.validate(pure)  # the profile's own mistakes first, named as such
    params, kept, dropped = pure, {}, []
    last = None if reset else last_written()
    if last is not None:
        since, overrides, written = last
        overrides = dict(overrides)
        try:
            current = config.load_params(config.repo_root() / "params.yaml")
        except config.ParamsError as err:  # to compare with: a params.yaml that does not read is no edit to keep
            raise config.ParamsError(f"{err}; `tema profile {name} --reset` writes the profile over it") from None
        changed, removed = differences(current, written)
        for path, value in changed:
            if path[0] in DERIVED:
                dropped.append(".".join(path))
            else:
                overrides.pop(".".join(path), None)  # the newest value, after the overrides it refines
                overrides[".".join(path)] = value
        dropped += [".".join(path) for path in removed if path[0] in DERIVED]
        gone = [".".join(path) for path in removed if path[0] not in DERIVED]
        if gone:
            raise config.ParamsError("\n".join(
                f"params.yaml: {key} was removed since `tema profile {since}` wrote it; `tema profile` keeps values changed "
                f"or added in params.yaml, not removals: put it back, or write the profile alone with `tema profile {name} --reset`"
                for key in gone))
        laid = overlay(base, overrides, name, since)
        kept = {".".join(path): value for path, value in differences(laid, base)[0]}
        if kept:
            try:
                params = derive(laid)
                schema.validate(params)
            except (config.ParamsError, data.DataError) as err:
                raise config.ParamsError("\n".join([
                    f"params.yaml: the values kept from an edited params.yaml ({', '.join(f'{k}={show(v)}' for k, v in kept.items())}) "
                    f"do not fit profile {name}; fix them in params.yaml, or drop them with `tema profile {name} --reset`:",
                    *str(err).splitlines()])) from None
    out = config.repo_root() / "params.yaml"
    record = ("# What `tema profile` last wrote to params.yaml (tema.profiles, docs/profiles.md): the profile, the edits of\n"
              "# params.yaml it kept over it, and every value written. The next `tema profile` compares params.yaml with\n"
              "# `written` to find the edits made since (by hand or `dvc exp run -S`) and keeps them. Commit it with\n"
              "# params.yaml; do not edit it.\n")
    # both files whole or not at all: a kill or a full disk leaves params.yaml and its record as they were
    atomic.write_many({
        out: (header(name, kept) + yaml.safe_dump(params, sort_keys=False)).encode("utf-8"),
        record_path(): (record + yaml.safe_dump({"profile": name, "overrides": kept, "written": params}, sort_keys=False)).encode("utf-8"),
    })
    return Written(out, name, kept, list(dict.fromkeys(dropped)))
