"""`tema dataset add <name> <folder>`: vendor a dataset of one's own into data/raw/<name>/.

The folder holds a dataset.yaml (docs/datasets.md) and the files it names. They are copied (gzipped, as the
benchmarks are vendored), their sha256 written to SHA256SUMS, the description's `source` completed with the date of
the import, and the whole read once with the checks `prepare` applies, all in a folder beside data/raw/<name>/ that
takes its place only once everything passed: a bad file leaves nothing behind, and an existing dataset is replaced
only when asked (--replace) and only by one that reads.
"""

from __future__ import annotations

import datetime as dt
import gzip
import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

import yaml

from tema.data import DataError, Dataset
from tema.datasets.raw import RawFiles
from tema.datasets.registry import reader
from tema.datasets.spec import CHECKSUMS_FILE, SPEC_FILE, check_name, load_spec

# the keys of dataset.yaml that name files, by the section that holds them
FILE_KEYS = ("items", "interactions", "sequences")


def named_files(body: dict[str, Any], where: Path) -> list[str]:
    """The files a generic dataset.yaml names (items.file, interactions.file, sequences.file), as written."""
    files = []
    for key in FILE_KEYS:
        section = body.get(key)
        if isinstance(section, dict) and "file" in section:
            name = section["file"]
            if not isinstance(name, str) or not name or Path(name).name != name:
                raise DataError(f"{where}: {key}.file: expected a file name in the dataset's folder (no path), got {name!r}")
            files.append(name)
    return files


def add(name: str, folder: Path, raw_root: Path, origin: str | None = None, replace: bool = False) -> Dataset:
    """Vendor `folder` as data/raw/<name>/ (see the module's doc); returns the dataset as prepare will read it."""
    check_name(name, "tema dataset add: <name>")
    source_spec = folder / SPEC_FILE
    if not source_spec.is_file():
        raise DataError(f"{source_spec}: not found; expected the dataset's description (docs/datasets.md, examples/)")
    target = raw_root / name
    if target.exists() and not replace:
        raise DataError(f"{target}: exists already; pass --replace to replace it (the old folder stays until the new one reads)")
    body = yaml.safe_load(source_spec.read_text(encoding="utf-8"))
    if not isinstance(body, dict):
        raise DataError(f"{source_spec}: expected a mapping (format, domains, ...), got {body!r}")
    if body.get("format") != "generic":
        raise DataError(f"{source_spec}: format: expected 'generic' (`tema dataset add` vendors the generic format of "
                        f"docs/datasets.md), got {body.get('format')!r}")
    files = named_files(body, source_spec)
    for fname in files:
        if not (folder / fname).is_file():
            raise DataError(f"{folder / fname}: not found (named in {source_spec})")

    staging = raw_root / f".{name}.add-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        sums = []
        for fname in files:
            content = (folder / fname).read_bytes()
            if fname.endswith(".gz"):
                try:
                    content = gzip.decompress(content)
                except (OSError, EOFError) as err:
                    raise DataError(f"{folder / fname}: expected a gzip file, could not decompress it ({err})") from None
            plain = fname.removesuffix(".gz")
            (staging / f"{plain}.gz").write_bytes(gzip.compress(content, mtime=0))
            sums.append(f"{hashlib.sha256(content).hexdigest()}  {plain}")
        (staging / CHECKSUMS_FILE).write_text("\n".join(sorted(sums, key=lambda line: line.split()[1])) + "\n", encoding="utf-8")
        source = {"origin": origin or "a local folder (no origin given: `tema dataset add --origin`)",
                  "added": dt.date.today().isoformat()}
        text = source_spec.read_text(encoding="utf-8")
        if "source" in body:  # the description's own provenance, completed (its comments are not kept)
            body["source"] = {**source, **(body["source"] or {}), **({"origin": origin} if origin else {})}
            text = yaml.safe_dump(body, sort_keys=False, allow_unicode=True)
        else:  # the description as written, comments included, and where it came from
            text = text.rstrip("\n") + "\n" + yaml.safe_dump({"source": source}, sort_keys=False, allow_unicode=True)
        header = (f"# {name}: vendored by `tema dataset add` (the format: docs/datasets.md). SHA256SUMS lists the sha256 of\n"
                  "# each decompressed file; a changed file needs its new sum there.\n")
        (staging / SPEC_FILE).write_text(header + text, encoding="utf-8")
        spec = load_spec(staging, name)  # the staging folder's description, under the dataset's name
        dataset = reader(spec.format, str(spec.path)).read(spec, RawFiles(staging))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = raw_root / f".{name}.old-{os.getpid()}"
    if target.exists():
        target.rename(old)
    staging.rename(target)
    shutil.rmtree(old, ignore_errors=True)
    return dataset
