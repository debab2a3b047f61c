"""Files written whole or not at all: a temporary file beside the target, fsync, then one rename.

A kill or a full disk at any point leaves the previous file as it was (or no file, where there was none), never
a half-written one. Errors of the file system become `WriteError`, one line that names the path, and the
temporary file is removed. This module imports nothing of `tema`: every layer may use it.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


class WriteError(OSError):
    """A file could not be written (disk full, no permission, ...); the previous file is unchanged."""


def describe_os_error(err: OSError) -> str:
    """'No space left on device' for ENOSPC, else the error's own words, without Python's '[Errno 28]'."""
    return err.strerror or str(err)


def fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (a no-op where directories cannot be opened, as on Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_with(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Call write(f) on a temporary file in path's folder, fsync it and rename it onto path.

    The temporary file keeps path's suffix (some writers look at it) and starts with '.', so globs over the folder
    do not see it. On any error it is removed and path is left as it was."""
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if path.exists():  # keep the permissions of the file replaced (mkstemp makes 0600)
            os.chmod(tmp, path.stat().st_mode & 0o7777)
        else:
            os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        failure = WriteError(f"{path}: could not write it ({describe_os_error(err)}); the previous file is unchanged")
        failure.errno = err.errno
        raise failure from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_many(contents: dict[Path, bytes]) -> None:
    """Several files that belong together (params.yaml and its record): every one is written aside and fsynced first,
    so a full disk or an error leaves all of them as they were; then they are renamed into place one after another
    (a kill can fall only between two renames, microseconds apart)."""
    staged: list[tuple[Path, Path]] = []
    try:
        for path, data in contents.items():
            path = Path(path)
            fd, tmp_name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
            staged.append((Path(tmp_name), path))
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.chmod(tmp_name, (path.stat().st_mode & 0o7777) if path.exists() else 0o666 & ~_umask())
            except OSError as err:
                failure = WriteError(f"{path}: could not write it ({describe_os_error(err)}); the previous file is unchanged")
                failure.errno = err.errno
                raise failure from None
        for tmp, path in staged:
            os.replace(tmp, path)
    finally:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
    for folder in {path.parent for _, path in staged}:
        fsync_dir(folder)


def write_bytes(path: str | Path, data: bytes) -> None:
    write_with(path, lambda f: f.write(data))


def write_text(path: str | Path, text: str, encoding: str = "utf-8") -> None:
    write_bytes(path, text.encode(encoding))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
