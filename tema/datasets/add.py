"""`tema dataset add <name> <folder>`: vendor a dataset of one's own into data/raw/<name>/.

The folder holds a dataset.yaml (docs/datasets.md) and the files it names. They are copied (gzipped, as the
benchmarks are vendored), their sha256 written to SHA256SUMS, the description's `source` completed with the date of
the import, and the whole read once with the checks `prepare` applies, all in a folder beside data/raw/<name>/ that
takes its place only once everything passed: a bad file leaves nothing behind, and an existing dataset is replaced
only when asked (--replace) and only by one that reads.

Errors name the user's files (dataset.yaml and the data files, with their lines), not the staging copies. Whatever
stops it (a bad file, a full disk, Ctrl-C, a kill), data/raw/<name>/ is the old dataset or the new one: a kill between
the two renames of --replace is undone by the next reader of data/raw (tema.datasets.staging.recover).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import gzip
import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

import yaml

from tema import atomic
from tema.data import DataError, Dataset
from tema.datasets.raw import RawFiles
from tema.datasets.registry import reader
from tema.datasets.spec import CHECKSUMS_FILE, SPEC_FILE, check_name, load_spec
from tema.datasets.staging import old_dir, recover, staging_dir

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


class SourceFiles(RawFiles):
    """The staged files, verified against the staged SHA256SUMS, as the reader reads them, with every error naming
    the user's file (`folder`/<its name as dataset.yaml gives it>): the lines are the same, the staging folder is
    gone by the time the error is read."""

    def __init__(self, staging: Path, folder: Path, files: list[str]):
        super().__init__(staging)
        self.folder = folder
        self.names = {fname.removesuffix(".gz"): fname for fname in files}

    def __call__(self, fname: str) -> tuple[bytes, str]:
        data, _ = super().__call__(fname)
        return data, str(self.folder / self.names.get(fname.removesuffix(".gz"), fname))


def _reason(err: OSError) -> str:
    """'No space left on device' and the like (atomic.WriteError keeps the errno of what failed)."""
    return os.strerror(err.errno) if err.errno else atomic.describe_os_error(err)


def _write(path: Path, data: bytes, shown: Path, raw_root: Path) -> None:
    """One staged file, written whole (tema.atomic); a failure names the file as it would be in data/raw."""
    try:
        atomic.write_bytes(path, data)
    except OSError as err:
        raise atomic.WriteError(f"{shown}: could not write it ({_reason(err)}); {raw_root} is left as it was") from None


def _provenance(body: dict[str, Any], source_spec: Path, origin: str | None) -> dict[str, Any]:
    source = {"origin": origin or "a local folder (no origin given: `tema dataset add --origin`)",
              "added": dt.date.today().isoformat()}
    given = body.get("source")
    if given is not None and not isinstance(given, dict):
        raise DataError(f"{source_spec}: source: expected a mapping (origin, ...; `tema dataset add` completes it), got {given!r}")
    return {**source, **(given or {}), **({"origin": origin} if origin else {})}


def add(name: str, folder: Path, raw_root: Path, origin: str | None = None, replace: bool = False) -> Dataset:
    """Vendor `folder` as data/raw/<name>/ (see the module's doc); returns the dataset as prepare will read it."""
    check_name(name, "tema dataset add: <name>")
    source_spec = folder / SPEC_FILE
    if not source_spec.is_file():
        raise DataError(f"{source_spec}: not found; expected the dataset's description (docs/datasets.md, examples/)")
    recover(raw_root)  # what a killed add left: the old dataset back in place, staging folders gone
    target = raw_root / name
    if target.exists() and not replace:
        raise DataError(f"{target}: exists already; pass --replace to replace it (the old folder stays until the new one reads)")
    # the user's description, checked as it is written: errors name its file (YAML, a key twice, unknown keys, domains)
    body = load_spec(folder, name).body
    if body.get("format") != "generic":
        raise DataError(f"{source_spec}: format: expected 'generic' (`tema dataset add` vendors the generic format of "
                        f"docs/datasets.md), got {body.get('format')!r}")
    files = named_files(body, source_spec)
    for fname in files:
        if not (folder / fname).is_file():
            raise DataError(f"{folder / fname}: not found (named in {source_spec})")
    source = _provenance(body, source_spec, origin)

    staging = staging_dir(raw_root, name)
    try:
        shutil.rmtree(staging, ignore_errors=True)
        try:
            staging.mkdir(parents=True)
        except OSError as err:
            raise atomic.WriteError(f"{target}: could not create it ({_reason(err)}); {raw_root} is left as it was") from None
        sums = []
        for fname in files:
            content = (folder / fname).read_bytes()
            if fname.endswith(".gz"):
                try:
                    content = gzip.decompress(content)
                except (OSError, EOFError) as err:
                    raise DataError(f"{folder / fname}: expected a gzip file, could not decompress it ({err})") from None
            plain = fname.removesuffix(".gz")
            _write(staging / f"{plain}.gz", gzip.compress(content, mtime=0), target / f"{plain}.gz", raw_root)
            sums.append(f"{hashlib.sha256(content).hexdigest()}  {plain}")
        checksums = "\n".join(sorted(sums, key=lambda line: line.split()[1])) + "\n"
        _write(staging / CHECKSUMS_FILE, checksums.encode(), target / CHECKSUMS_FILE, raw_root)
        text = source_spec.read_text(encoding="utf-8")
        if "source" in body:  # the description's own provenance, completed (its comments are not kept)
            text = yaml.safe_dump({**body, "source": source}, sort_keys=False, allow_unicode=True)
        else:  # the description as written, comments included, and where it came from
            text = text.rstrip("\n") + "\n" + yaml.safe_dump({"source": source}, sort_keys=False, allow_unicode=True)
        header = (f"# {name}: vendored by `tema dataset add` (the format: docs/datasets.md). SHA256SUMS lists the sha256 of\n"
                  "# each decompressed file; a changed file needs its new sum there.\n")
        _write(staging / SPEC_FILE, (header + text).encode("utf-8"), target / SPEC_FILE, raw_root)
        # the staged description under the dataset's name, its errors naming the user's dataset.yaml, as the reader's
        # name the user's data files (SourceFiles)
        spec = dataclasses.replace(load_spec(staging, name), path=source_spec)
        dataset = reader(spec.format, str(source_spec)).read(spec, SourceFiles(staging, folder, files))
        _swap(staging, target, raw_root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return dataset


def _swap(staging: Path, target: Path, raw_root: Path) -> None:
    """Put the staged folder in place of `target` by two renames (the old one aside, the new one in), then delete the
    old one. An error puts the old one back; a kill between the renames is undone by staging.recover."""
    old = old_dir(raw_root, target.name)
    shutil.rmtree(old, ignore_errors=True)
    try:
        if target.exists():
            target.rename(old)
        try:
            staging.rename(target)
        except BaseException:
            if old.exists() and not target.exists():
                old.rename(target)
            raise
    except OSError as err:
        raise atomic.WriteError(f"{target}: could not put the new dataset in place ({_reason(err)}); {raw_root} is left "
                                "as it was") from None
    atomic.fsync_dir(raw_root)
    shutil.rmtree(old, ignore_errors=True)
