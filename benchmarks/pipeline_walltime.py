"""Wall time of `dvc repro` for a profile, with the time of each stage, on this machine.

By default the working tree is copied into a temporary folder (as a fresh clone would hold it, without
DVC outputs or reports), so nothing here changes; --in-place runs in the repository itself (that is
how the committed default-profile reports were made).

    python benchmarks/pipeline_walltime.py --profile smoke
    python benchmarks/pipeline_walltime.py --profile default --in-place
    python benchmarks/pipeline_walltime.py --profile full --from-runs

--from-runs runs nothing: for each run of a profile's train stages and each seed it adds up the training time each
finished run recorded (data/runs/*/run.json, measured while it trained here) and names the runs that are
missing, so the cost of a profile that takes hours can be read off the runs already made.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def fresh_copy(dst: Path) -> None:
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        if (ROOT / rel).is_file() and not rel.startswith("reports/") and rel != "dvc.lock":
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dst / rel)
    subprocess.run(["git", "init", "-q"], cwd=dst, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="smoke")
    parser.add_argument("--in-place", action="store_true")
    parser.add_argument("--from-runs", action="store_true", help="sum the recorded training times instead of running")
    args = parser.parse_args()
    if args.from_runs:
        return from_runs(args.profile)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    with tempfile.TemporaryDirectory() as tmp:
        repo = ROOT if args.in_place else Path(tmp)
        if not args.in_place:
            fresh_copy(repo)
        subprocess.run(["tema", "profile", args.profile], cwd=repo, env=env, check=True, capture_output=True)
        from tema import config, profiles

        with contextlib.chdir(repo):  # a test-scale profile (smoke) runs in its own workspace, build/<name>/
            workspace = profiles.workspace_of(args.profile) if config.repo_root() == repo else None
        repo = workspace or repo
        start = time.perf_counter()
        stages: list[tuple[str, float]] = []
        proc = subprocess.Popen(["dvc", "repro"], cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            match = re.match(r"Running stage '([^']+)'", line)
            if match:
                stages.append((match.group(1), time.perf_counter()))
                print(line.rstrip(), flush=True)
        if proc.wait() != 0:
            raise SystemExit(f"dvc repro failed with exit code {proc.returncode}")
        total = time.perf_counter() - start
    ends = [t for _, t in stages[1:]] + [start + total]
    print(f"\nprofile {args.profile}: dvc repro {total:.0f} s ({total / 60:.1f} min)")
    for (name, began), ended in sorted(zip(stages, ends), key=lambda x: x[0][1] - x[1]):
        print(f"  {name:40s} {ended - began:8.1f} s  {100 * (ended - began) / total:5.1f} %")


def stage_wall(seconds: list[float], workers: int) -> float:
    """A train stage's wall time when its seeds, in order, go to the first of `workers` processes free
    (as tema.train does). Each run's recorded time was measured with its neighbours running beside it."""
    free = [0.0] * max(1, workers)
    for s in seconds:
        free[free.index(min(free))] += s
    return max(free)


def from_runs(profile: str) -> None:
    import json

    sys.path.insert(0, str(ROOT))
    os.chdir(ROOT)
    from tema import config
    from tema.cli import profile_params

    params = profile_params(profile)
    workers = int(params["train"].get("workers", 1))
    total, missing = 0.0, []
    print(f"profile {profile}: training time recorded by finished runs (seconds, 2 CPU cores unless noted)")
    for run in config.runs(params).values():  # what the profile trains (dvc.yaml's train stages), not datasets x models
        dataset, model = run["dataset"], run["model"]
        seconds = []
        for seed in params["train"]["seeds"]:
            marker = ROOT / "data" / "runs" / dataset / model / f"seed{seed}" / "run.json"
            if marker.is_file():
                seconds.append(json.loads(marker.read_text())["train_seconds"])
            else:
                missing.append(f"{dataset}/{model}/seed{seed}")
        wall = stage_wall(seconds, workers)
        total += wall
        per = ", ".join(f"{x:.0f}" for x in seconds)
        print(f"  {dataset:14s} {model:26s} {wall / 60:6.1f} min  (per seed: {per})")
    print(f"training in all: {total / 60:.1f} min with train.workers = {workers} (seeds at once); add ~2.5 min of "
          "features per dataset and under a minute per other stage")
    if missing:
        print(f"not trained yet ({len(missing)} runs): {', '.join(missing)}")


if __name__ == "__main__":
    main()
