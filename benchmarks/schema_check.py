"""What checking params.yaml against the schema (tema.schema) adds to a stage; the target is under 1 s.

A stage has torch and the models loaded anyway (every stage imports them), so its added cost is the check itself.
`tema profile` is not a stage but is timed too: there the check also pays for importing the model registry.

    python benchmarks/schema_check.py
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TARGET_S = 1.0


def cold_check_seconds(profile: str) -> float:
    """A fresh interpreter that imports what `tema profile` imports, then times validate() (registry import included)."""
    code = ("import time; from tema import cli, schema; p = cli.profile_params(%r); t = time.perf_counter(); "
            "schema.validate(p); print(time.perf_counter() - t)") % profile
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return float(out.strip().splitlines()[-1])


def main() -> None:
    import tema.models  # noqa: F401  (a stage has these loaded before it checks)
    from tema import cli, schema

    print(f"{'profile':<12} {'check in a stage (ms)':>22} {'ratio to 1 s':>13} {'tema profile, cold (s)':>23}")
    for path in sorted((ROOT / "profiles").glob("*.yaml")):
        params = cli.profile_params(path.stem)
        runs = []
        for _ in range(20):
            started = time.perf_counter()
            schema.validate(params)
            runs.append(time.perf_counter() - started)
        best = min(runs)
        print(f"{path.stem:<12} {best * 1000:>22.2f} {best / TARGET_S:>13.4f} {cold_check_seconds(path.stem):>23.2f}")


if __name__ == "__main__":
    main()
