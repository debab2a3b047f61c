"""The hidden folders `tema dataset add` works in beside data/raw/<name>/, and the recovery from a killed add.

`tema dataset add` builds the new dataset in `.<name>.add-<pid>` and, with --replace, renames the old folder to
`.<name>.old-<pid>` before renaming the new one into place. A process killed in between leaves these behind, and
between the two renames no `<name>` at all. `recover` puts such a state right (every reader of data/raw calls it
first): an old folder whose dataset is missing goes back in place, every other leftover of a process that no longer
runs is deleted. Dataset discovery ignores hidden folders in any case (tema.datasets.known).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from tema.atomic import fsync_dir

LEFTOVER = re.compile(r"\.(?P<name>[A-Za-z0-9_-]+)\.(?P<kind>add|old)-(?P<pid>\d+)")


def staging_dir(raw_root: Path, name: str) -> Path:
    """Where this process builds data/raw/<name>/ before it takes its place."""
    return raw_root / f".{name}.add-{os.getpid()}"


def old_dir(raw_root: Path, name: str) -> Path:
    """Where this process keeps the replaced data/raw/<name>/ until the new one is in place."""
    return raw_root / f".{name}.old-{os.getpid()}"


def is_hidden(path: Path) -> bool:
    """A folder no dataset lives in: a staging or old folder of `tema dataset add`, or any other hidden one."""
    return path.name.startswith(".")


def running(pid: int) -> bool:
    """Whether a process of that id runs (its folders may be in use); this process counts as running."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it runs
        return True
    except (OSError, OverflowError):
        return False
    return True


def recover(raw_root: Path) -> list[str]:
    """Undo what a killed `tema dataset add` left in raw_root; returns what was done, one line each (for tests and logs).

    Leftovers of a process that still runs are left alone (it may be between its renames). A file system error leaves
    a leftover where it is: discovery ignores hidden folders, and the next call tries again."""
    try:
        entries = sorted(raw_root.iterdir()) if raw_root.is_dir() else []
    except OSError:
        return []
    done = []
    # the old folders first, so that a dataset comes back before a staging folder of the same name is judged
    found = [(m, p) for p in entries if (m := LEFTOVER.fullmatch(p.name)) and p.is_dir() and not p.is_symlink()]
    for match, path in sorted(found, key=lambda entry: entry[0]["kind"] != "old"):
        if running(int(match["pid"])):
            continue
        target = raw_root / match["name"]
        try:
            if match["kind"] == "old" and not target.exists():
                path.rename(target)  # killed between the renames of a replace: the old dataset goes back in place
                done.append(f"restored {target} from {path.name}")
            else:
                shutil.rmtree(path)  # a finished replace's old copy, or a killed add's staging folder
                done.append(f"removed {path}")
        except OSError:
            continue
    if done:
        fsync_dir(raw_root)
    return done
