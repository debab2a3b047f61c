"""The `tema` command as a user meets it: `tema --help` lists every command, each command's --help its arguments, and a
user's mistake ends in one line `tema: error: ...` with a non-zero exit, never a traceback (a bug still shows one)."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import yaml
from conftest import ROOT
from test_profiles import repo  # noqa: F401  (the fixture: profiles and dataset descriptions in a temporary repository)

from tema import cli, config

SCRIPT = Path(sys.executable).parent / "tema"  # the console script of pyproject.toml ([project.scripts] tema = tema.cli:main)
TEMA = [str(SCRIPT)] if SCRIPT.is_file() else [sys.executable, "-m", "tema.cli"]


def tema(*args: str, cwd: Path = ROOT, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k != cli.DEBUG_ENV}
    return subprocess.run([*TEMA, *args], cwd=cwd, env={**clean, **(env or {})}, capture_output=True, text=True, timeout=300)


def one_error_line(proc: subprocess.CompletedProcess, status: int = 2) -> str:
    assert proc.returncode == status, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tema: error: "), proc.stderr
    return lines[0]


def test_help_lists_every_command_with_a_description():
    proc = tema("--help")
    assert proc.returncode == 0, proc.stderr
    listed = cli.command_lines(cli.build_parser())
    paths = {" ".join(w for w in usage.split() if w.islower() and not w.startswith("[")) for usage, _ in listed}
    assert {"profile", "run-notebook", "dataset add", "dataset list", "tags generate", "tune", "tune-joint", "recommend", "llm serve"} <= paths
    for usage, summary in listed:
        assert summary, usage
        assert any(line.split() == ["tema", *usage.split(), *summary.split()] for line in proc.stdout.splitlines()), usage
    # every registered command is listed: the top-level choices, and each group's
    top = next(a for a in cli.build_parser()._actions if a.dest == "command")
    assert {p.split()[0] for p in paths} == set(top.choices)


@pytest.mark.parametrize("command", [["profile"], ["run-notebook"], ["dataset", "add"], ["dataset", "list"],
                                     ["tags", "generate"], ["tune"], ["tune-joint"]])
def test_each_command_describes_its_arguments(command, capsys):
    with pytest.raises(SystemExit) as done:
        cli.main([*command, "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: tema {' '.join(command)} ")
    parser = cli.build_parser()
    for name in command:
        parser = next(a for a in parser._actions if a.dest and a.dest.endswith("command")).choices[name]
    for action in parser._actions:
        assert action.help, f"tema {' '.join(command)}: {action.dest} has no help"
        assert action.help in " ".join(out.split()) or action.help == "show this help message and exit"


def test_the_delegated_commands_help_matches_their_listing():
    """`tema recommend` and `tema llm` parse their own arguments (tema.recommend, tema.llm); their line in `tema --help`
    names the same positional arguments."""
    for name, (usage, _) in cli.DELEGATED.items():
        proc = tema(name, "--help")
        assert proc.returncode == 0, proc.stderr
        shown = proc.stdout.split("\n\n")[0].lower()
        for word in usage.replace("[options]", "").lower().split():
            assert word in shown, (name, word, shown)


def test_an_unknown_profile_is_one_line(repo):  # noqa: F811
    line = one_error_line(tema("profile", "nosuch", cwd=repo))
    assert line.startswith("tema: error: unknown profile 'nosuch': profiles/nosuch.yaml not found; profiles: [")


def test_recommend_on_an_unknown_dataset_is_one_line():
    line = one_error_line(tema("recommend", "nosuch", "tema", "test:1"))
    assert "nosuch" in line


def test_a_bad_value_in_params_yaml_is_one_line_naming_it(repo):  # noqa: F811
    assert tema("profile", "default", cwd=repo).returncode == 0
    params = (repo / "params.yaml").read_text()
    (repo / "params.yaml").write_text(params.replace("  seeds:\n  - 1\n  - 2\n  - 3\n", "  seeds: three\n"))
    assert yaml.safe_load((repo / "params.yaml").read_text())["train"]["seeds"] == "three"
    line = one_error_line(tema("tune", "food-kitchen", cwd=repo))
    assert line.startswith("tema: error: params.yaml: train.seeds: expected ") and line.endswith("got 'three'")
    # the same edit kept over a profile fails the same way, naming it, and nothing is written
    proc = tema("profile", "default", cwd=repo)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "(train.seeds=three) do not fit profile default" in proc.stderr.splitlines()[0]
    # a params.yaml that is not YAML at all
    (repo / "params.yaml").write_text("datasets: [food-kitchen\n")
    line = one_error_line(tema("tune", "food-kitchen", cwd=repo))
    assert line.startswith(f"tema: error: {repo / 'params.yaml'}: expected YAML, could not parse it (")
    assert one_error_line(tema("profile", "default", cwd=repo)) == f"{line}; `tema profile default --reset` writes the profile over it"
    # --debug (or TEMA_DEBUG=1) shows where it came from, then the same line
    for proc in (tema("--debug", "tune", "food-kitchen", cwd=repo), tema("tune", "food-kitchen", cwd=repo, env={cli.DEBUG_ENV: "1"})):
        assert proc.returncode == 2 and "Traceback" in proc.stderr
        assert proc.stderr.strip().splitlines()[-1] == line


def test_a_missing_notebook_is_one_line(tmp_path):
    line = one_error_line(tema("run-notebook", str(tmp_path / "nosuch.ipynb"), str(tmp_path / "out.ipynb")))
    assert line == f"tema: error: {tmp_path / 'nosuch.ipynb'}: not found"


def test_a_failed_notebook_names_the_cell_its_error_and_the_executed_notebook(tmp_path):
    nb = nbformat.v4.new_notebook()
    nb.metadata.kernelspec = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell("x = 1", metadata={"tags": ["parameters"]}), nbformat.v4.new_code_cell("y = x + 1"),
                nbformat.v4.new_code_cell("raise ValueError(f'x is {x}, y is {y}')")]
    nbformat.write(nb, tmp_path / "fails.ipynb")
    out = tmp_path / "out" / "fails.ipynb"
    proc = tema("run-notebook", str(tmp_path / "fails.ipynb"), str(out), "-p", "x", "2")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("tema: ")]
    assert lines == [f"tema: error: {tmp_path / 'fails.ipynb'} failed at cell In [4]: ValueError: x is 2, y is 3",
                     f"tema: error: the executed notebook, with the traceback: {out} ({out.with_suffix('.html')})"]
    assert "This run FAILED" in out.read_text() and out.with_suffix(".html").is_file()


def test_ctrl_c_is_one_line_and_status_130_and_a_bug_keeps_its_traceback(monkeypatch, capsys):
    def interrupted(argv):
        raise KeyboardInterrupt

    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    monkeypatch.setattr(cli, "run_command", interrupted)
    assert cli.main(["profile", "default"]) == 130
    assert capsys.readouterr().err == "tema: interrupted\n"

    def bug(argv):
        raise TypeError("a bug")

    monkeypatch.setattr(cli, "run_command", bug)
    with pytest.raises(TypeError, match="a bug"):
        cli.main(["profile", "default"])
    assert isinstance(config.ParamsError("x"), cli.USER_ERRORS)


def dataset_repo(tmp_path: Path) -> Path:
    """A repository with data/raw/mine vendored from a folder of the generic format (tests/test_generic.py)."""
    from test_generic import source_folder

    from tema.datasets.add import add

    study = tmp_path / "study"
    (study / "profiles").mkdir(parents=True)
    shutil.copy(ROOT / "profiles" / "default.yaml", study / "profiles" / "default.yaml")
    (study / "dvc.yaml").write_text("stages: {}\n")
    (study / "params.yaml").write_text("{}\n")
    add("mine", source_folder(tmp_path), study / "data" / "raw")
    return study


def raw_state(study: Path) -> dict[str, bytes]:
    return {str(p.relative_to(study)): p.read_bytes() if p.is_file() else b"<dir>" for p in sorted((study / "data").rglob("*"))}


def test_a_full_disk_during_dataset_add_is_one_line_naming_the_path_and_leaves_data_raw_as_it_was(tmp_path, monkeypatch, capsys):
    study = dataset_repo(tmp_path)
    before = raw_state(study)
    monkeypatch.chdir(study)
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    real_fsync = os.fsync

    def full(fd):  # the data reach the disk at fsync: where a full disk says so
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    for argv in (["dataset", "add", "mine", str(tmp_path / "incoming"), "--replace"], ["dataset", "add", "new", str(tmp_path / "incoming")]):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.splitlines()
        name = argv[2]
        assert err == [f"tema: error: {study / 'data' / 'raw' / name / 'items.csv.gz'}: could not write it (No space left on device); "
                       f"{study / 'data' / 'raw'} is left as it was"], err
        assert raw_state(study) == before  # the old dataset, and no staging folder
    # a folder data/raw cannot be written to at all: the same, one line naming the path
    monkeypatch.setattr(os, "fsync", real_fsync)

    def refused(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))

    monkeypatch.setattr(Path, "mkdir", refused)
    assert cli.main(["dataset", "add", "new", str(tmp_path / "incoming")]) == 2
    assert capsys.readouterr().err.splitlines() == [f"tema: error: {study / 'data' / 'raw' / 'new'}: could not create it (Permission "
                                                    f"denied); {study / 'data' / 'raw'} is left as it was"]
    assert raw_state(study) == before


def test_an_unreadable_file_while_adding_a_dataset_is_one_line_naming_it(tmp_path, monkeypatch, capsys):
    study = dataset_repo(tmp_path)
    before = raw_state(study)
    monkeypatch.chdir(study)
    events = tmp_path / "incoming" / "events.csv"
    real = Path.read_bytes

    def unreadable(self):
        if self == events:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", unreadable)
    assert cli.main(["dataset", "add", "other", str(tmp_path / "incoming")]) == 2
    assert capsys.readouterr().err.splitlines() == [f"tema: error: {events}: Permission denied"]
    assert raw_state(study) == before
