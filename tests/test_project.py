"""Project files that a newcomer's install depends on."""

from __future__ import annotations

import re
import tomllib

import nbformat
import yaml

from tema import config
from tema.notebook import sanitize


def names(requirements: list[str]) -> dict[str, str]:
    return {re.split(r"[<>=!~ ]", r, maxsplit=1)[0].lower(): r for r in requirements}


def test_environment_yml_mirrors_pyproject(root):
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    wanted = names(project["dependencies"] + project["optional-dependencies"]["dev"])
    env = yaml.safe_load((root / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    listed = names([p for p in pip if not p.startswith("-e")])
    assert sorted(listed) == sorted(wanted)
    for name, req in listed.items():
        if name != "torch":
            assert req == wanted[name], f"environment.yml has {req!r}, pyproject has {wanted[name]!r}"
    assert listed["torch"] == "torch==2.13.0"


def test_constraints_pin_cpu_torch_and_every_dependency(root):
    pins = dict(line.split("==") for line in (root / "constraints.txt").read_text().splitlines() if "==" in line)
    assert pins["torch"] == "2.13.0"
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    assert set(names(project["dependencies"])) <= {p.lower() for p in pins}


def test_params_yaml_is_the_default_profile(root):
    from tema.cli import profile_params

    assert config.load_params(root / "params.yaml") == profile_params("default")


def test_notebooks_have_parameters_cell_and_python3_kernel(root):
    for path in sorted((root / "notebooks").glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        assert nb.metadata.kernelspec.name == "python3", path
        assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), f"{path}: commit notebooks without outputs"
        assert any("parameters" in c.metadata.get("tags", []) for c in nb.cells), path


def test_sanitize_strips_timestamps_and_progress_output():
    nb = nbformat.v4.new_notebook()
    nb.metadata["papermill"] = {"start_time": "t0", "end_time": "t1", "duration": 3.2, "parameters": {"dataset": "x"}}
    cell = nbformat.v4.new_code_cell("1")
    cell.metadata["papermill"] = {"start_time": "t0"}
    cell.metadata["execution"] = {"iopub.execute_input": "t0"}
    cell.outputs = [nbformat.v4.new_output("stream", name="stderr", text="12%|## | 3/25 [00:01<00:07, 2.9it/s]"),
                    nbformat.v4.new_output("stream", name="stdout", text="kept")]
    nb.cells = [cell]
    out = sanitize(nb)
    assert out.metadata["papermill"] == {"parameters": {"dataset": "x"}}
    assert "papermill" not in out.cells[0].metadata and "execution" not in out.cells[0].metadata
    assert [o["text"] for o in out.cells[0].outputs] == ["kept"]
    assert out.cells[0].id == "cell-0"
