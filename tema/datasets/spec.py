"""A dataset's description, data/raw/<name>/dataset.yaml: what every dataset declares, whatever its reader.

Every dataset folder holds a `dataset.yaml` and a `SHA256SUMS` beside its files. The description names the reader
(`format`: `generic` for the documented CSV/TSV format, or a benchmark's own upstream format), the two domains
(their display names and what the tagging prompt tells the LLM about them), and, for the generic reader, its files,
columns and split rule (tema.datasets.generic). docs/datasets.md is the user's reference.

Nothing here reads a data file, so the parameter schema can ask which datasets exist, and what they hold,
without reading any of them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tema import config
from tema.data import DOMAINS, DataError
from tema.datasets.registry import FORMATS

SPEC_FILE = "dataset.yaml"
CHECKSUMS_FILE = "SHA256SUMS"
NAME_CHARS = "letters, digits, '-' and '_'"
# the top-level keys of dataset.yaml: those of every dataset, and those of a reader's own (the generic format's files,
# columns and split rule, tema.datasets.generic); any other key is refused (docs/datasets.md)
COMMON_KEYS = ("format", "description", "domains", "source")
READER_KEYS = {"generic": ("items", "interactions", "sequences", "split")}


@dataclass(frozen=True)
class Domain:
    """One of a dataset's two domains: its key in the canonical form ('A' | 'B'), its value in the items file,
    its display name, and the tagging prompt's guide and worked example (None: the prompt's generic ones)."""

    key: str
    value: str
    name: str
    guide: str | None = None
    example_title: str | None = None
    example_tags: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Spec:
    name: str
    format: str
    description: str
    domains: dict[str, Domain]
    path: Path  # the dataset.yaml it was read from
    body: dict[str, Any] = field(default_factory=dict)  # the whole file, for the reader's own keys

    @property
    def domain_names(self) -> dict[str, str]:
        return {key: d.name for key, d in self.domains.items()}

    @property
    def has_text(self) -> bool:
        """Whether items have a title or text: the benchmarks' readers always; a generic dataset where its dataset.yaml
        names a title or text column."""
        if self.format != "generic":
            return True
        items = self.body.get("items")
        return isinstance(items, dict) and any(items.get(k) is not None for k in ("title", "text"))

    @property
    def raw_dir(self) -> Path:
        return self.path.parent

    def where(self, key: str) -> str:
        """How errors name a key of this file: 'data/raw/x/dataset.yaml: items.title'."""
        return f"{self.path}: {key}"


def check_name(name: Any, where: str) -> str:
    """A dataset name becomes a folder and part of stage names: letters, digits, '-' and '_' only."""
    if not isinstance(name, str) or not name or not name.replace("-", "").replace("_", "").isalnum():
        raise DataError(f"{where}: expected a dataset name of {NAME_CHARS}, got {name!r}")
    return name


def load_spec(raw_dir: Path, name: str | None = None) -> Spec:
    """data/raw/<name>/dataset.yaml, checked for the keys every dataset has (the reader checks its own). `name`: the
    dataset's, where the folder has another (`tema dataset add` reads its staging folder)."""
    name = check_name(raw_dir.name if name is None else name, str(raw_dir))
    path = raw_dir / SPEC_FILE
    if not path.is_file():
        raise DataError(f"{path}: not found; every dataset folder holds a dataset.yaml (docs/datasets.md), "
                        f"`tema dataset add {name} ...` writes one")
    text = _read_text(path)
    body = config.read_yaml(path, DataError, text)  # a key given twice: refused, as DVC refuses it
    if not isinstance(body, dict):
        raise DataError(f"{path}: expected a mapping (format, domains, ...), got {body!r}")
    fmt = body.get("format")
    if not isinstance(fmt, str) or not fmt:
        raise DataError(f"{path}: format: expected the reader's name ('generic' for the CSV/TSV format of docs/datasets.md), got {fmt!r}")
    if fmt in FORMATS:  # an unknown reader is said by the registry, when the dataset is read
        known = [*COMMON_KEYS, *READER_KEYS.get(fmt, ())]
        for key in body:
            if key not in known:
                raise DataError(f"{path}{_line_of(text, key)}: unknown key {key!r}; expected one of {known} "
                                f"(format {fmt!r}, docs/datasets.md)")
    description = body.get("description", "")
    if not isinstance(description, str):
        raise DataError(f"{path}: description: expected one line of text, got {description!r}")
    raw_domains = body.get("domains")
    if not isinstance(raw_domains, dict) or sorted(raw_domains) != list(DOMAINS):
        raise DataError(f"{path}: domains: expected a mapping with exactly the keys A and B (the two domains), got "
                        f"{sorted(raw_domains) if isinstance(raw_domains, dict) else raw_domains!r}")
    domains = {key: _domain(path, key, raw_domains[key]) for key in DOMAINS}
    if domains["A"].value == domains["B"].value:
        raise DataError(f"{path}: domains.B.id: expected a value other than domain A's ({domains['A'].value!r})")
    return Spec(name=name, format=fmt, description=description.strip(), domains=domains, path=path, body=body)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: expected YAML in UTF-8, undecodable bytes at byte {err.start}") from None


def _line_of(text: str, key: Any) -> str:
    """':<line>' of a top-level key in the YAML text, '' where it cannot be told."""
    pattern = re.compile(rf"^['\"]?{re.escape(str(key))}['\"]?\s*:")
    return next((f":{n}" for n, line in enumerate(text.splitlines(), 1) if pattern.match(line)), "")


def _domain(path: Path, key: str, entry: Any) -> Domain:
    where = f"{path}: domains.{key}"
    if not isinstance(entry, dict):
        raise DataError(f"{where}: expected a mapping with name (and optionally id, guide, example), got {entry!r}")
    unknown = sorted(set(entry) - {"id", "name", "guide", "example"})
    if unknown:
        raise DataError(f"{where}: unknown key(s) {unknown}; expected id, name, guide, example")
    name = entry.get("name")
    if not isinstance(name, str) or not name.strip():
        raise DataError(f"{where}.name: expected the domain's display name (e.g. 'Books'), got {name!r}")
    value = entry.get("id", key)
    if not isinstance(value, (str, int)) or isinstance(value, bool) or not str(value).strip():
        raise DataError(f"{where}.id: expected the value the items file's domain column holds for it, got {value!r}")
    guide = entry.get("guide")
    if guide is not None and (not isinstance(guide, str) or not guide.strip()):
        raise DataError(f"{where}.guide: expected one line naming what its tags should describe, got {guide!r}")
    example = entry.get("example")
    title, tags = None, None
    if example is not None:
        if not isinstance(example, dict) or set(example) != {"title", "tags"} or not isinstance(example["title"], str) \
                or not isinstance(example["tags"], list) or not example["tags"] \
                or not all(isinstance(t, str) and t.strip() for t in example["tags"]):
            raise DataError(f"{where}.example: expected {{title: <an item title>, tags: [<tag>, ...]}}, got {example!r}")
        title, tags = example["title"], tuple(example["tags"])
    return Domain(key, str(value).strip(), name.strip(), guide.strip() if guide else None, title, tags)


def read_checksums(raw_dir: Path) -> dict[str, str]:
    """data/raw/<name>/SHA256SUMS: the sha256 of each file's (decompressed) bytes, by its name without '.gz'."""
    path = raw_dir / CHECKSUMS_FILE
    if not path.is_file():
        raise DataError(f"{path}: not found; expected '<sha256>  <file>' lines for the dataset's files "
                        f"(`tema dataset add` writes them)")
    sums = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or len(parts[0]) != 64:
            raise DataError(f"{path}:{lineno}: expected '<sha256>  <file>', got {line!r}")
        sums[parts[1]] = parts[0]
    return sums
