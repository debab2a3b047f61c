from __future__ import annotations

import gzip
import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


def write_raw(raw_root: Path, dataset: str, files: dict[str, bytes], checksums: dict[str, bytes] | None = None,
              spec: str | None = None) -> None:
    """A vendored-style raw dataset: gzip files, a SHA256SUMS of their decompressed bytes (`checksums` overrides the
    content a sum is taken of) and a dataset.yaml (`spec`; by default the shipped one of the benchmark of that name)."""
    folder = raw_root / dataset
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for name, content in files.items():
        (folder / f"{name}.gz").write_bytes(gzip.compress(content, mtime=0))
        digest = hashlib.sha256((checksums or {}).get(name, content)).hexdigest()
        lines.append(f"{digest}  {name}")
    (folder / "SHA256SUMS").write_text("\n".join(lines) + "\n")
    text = spec if spec is not None else (ROOT / "data" / "raw" / dataset / "dataset.yaml").read_text()
    (folder / "dataset.yaml").write_text(text)


def describe_datasets(repo: Path) -> None:
    """The shipped benchmarks' dataset.yaml in a test repository, where it has no raw folder of its own: the parameter
    schema knows the datasets of data/raw/ (tema.datasets.known), and the profiles name both benchmarks."""
    for spec in (ROOT / "data" / "raw").glob("*/dataset.yaml"):
        target = repo / "data" / "raw" / spec.parent.name / "dataset.yaml"
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(spec, target)


def food_kitchen_files(**override: bytes) -> dict[str, bytes]:
    """A tiny food-kitchen in the upstream format: 4 items in A (0-3), 5 in B (4-8)."""
    items = ["global_idx\tdomain\tlocal_idx\tasin\ttitle"]
    items += [f"{i}\tA\t{i}\tASIN{i}\tFood &amp; item {i}" for i in range(4)]
    items += [f"{i}\tB\t{i - 4}\tASIN{i}\tKitchen item {i}" for i in range(4, 9)]
    files = {
        "num.txt": b"4\n5\n",
        "items.tsv": ("\n".join(items) + "\n").encode(),
        "train_A.txt": b"1\t0,1,2\n2\t1,2,3\n",
        "train_B.txt": b"1\t4,5,6\n2\t5,6,7,8\n",
        "train_overlap.txt": b"1\t0,4,1,5\n",
        "valid.txt": b"1\t0,4,2\n2\t1,5,6\n",
        "test.txt": b"1\t2,6,3\n2\t3,7,8\n",
    }
    files.update(override)
    return files


def art_office_files(**override: bytes) -> dict[str, bytes]:
    """A tiny art-office in the upstream format: 3 items in A (0-2), 3 in B (3-5), two lines per user."""
    header = "idBefore,item_title,idAfter,item_attribute"
    items_a = [header, "0,paint &amp; brush,0,arts crafts", '1,"canvas, quoted",1,arts crafts', "2,clay,2,arts crafts"]
    items_b = [header] + [f"{i},office item {i},{i + 3},office products" for i in range(3)]

    def user(uid: int, history: list[int], targets: tuple[int, int]) -> str:
        lines = []
        for target in targets:
            seq = history + [target]
            lines.append(f"{uid}\t{len(seq) - 1}\t" + "\t".join(f"{item}|{pos}|{pos}" for pos, item in enumerate(seq)) + "\t")
        return "\n".join(lines) + "\n"

    files = {
        "item_listA_F.csv": ("\n".join(items_a) + "\n").encode(),
        "item_listO_AA_F.csv": ("\n".join(items_b) + "\n").encode(),
        "train_F2.txt": (user(0, [0, 3], (1, 4)) + user(1, [2, 5], (0, 3))).encode(),
        "valid_F2.txt": user(2, [1, 4], (2, 5)).encode(),
        "test_F2.txt": user(3, [2, 5], (0, 3)).encode(),
    }
    files.update(override)
    return files


def copy_worktree(root: Path, dst: Path, skip: tuple[str, ...] = ("reports/",)) -> None:
    """What a fresh clone holds (tracked and unignored files, minus `skip` prefixes and dvc.lock), as a git repo."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        if (root / rel).is_file() and not rel.startswith(skip) and rel != "dvc.lock":
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / rel, dst / rel)
    if any("reports/tuning/".startswith(prefix) for prefix in skip):
        # the committed searches are left out (a search in the copy starts from none), but the folder stays: a clone
        # has it, and the report stage depends on it
        (dst / "reports" / "tuning").mkdir(parents=True, exist_ok=True)
    subprocess.run(["git", "init", "-q"], cwd=dst, check=True)
