"""Stage notebooks (tema.notebook.execute): reproducible reports, and a failed run's report says that it failed."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from papermill.exceptions import PapermillExecutionError

from tema import notebook

PREVIOUS = "<html><body>the previous run's report, all green</body></html>"


@pytest.fixture
def repo(tmp_path, monkeypatch) -> Path:
    """A repository root (config.repo_root() finds it) with a tiny stage notebook that fails when asked to."""
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "params.yaml").write_text("{}\n")
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    params = nbformat.v4.new_code_cell("fail = False")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell("print('computed', 6 * 7)"),
                nbformat.v4.new_code_cell("if fail:\n    raise ValueError('boom')\nprint('done')")]
    (tmp_path / "notebooks").mkdir()
    nbformat.write(nb, tmp_path / "notebooks" / "tiny.ipynb")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def previous_report(repo: Path) -> Path:
    html = repo / "reports" / "tiny.html"
    html.parent.mkdir(parents=True, exist_ok=True)
    html.write_text(PREVIOUS)
    html.with_suffix(".ipynb").write_text("{}")
    return html


def test_success_is_byte_identical_across_runs(repo):
    dst = notebook.execute("notebooks/tiny.ipynb", "reports/tiny.ipynb")
    first = dst.read_bytes(), dst.with_suffix(".html").read_bytes()
    notebook.execute("notebooks/tiny.ipynb", "reports/tiny.ipynb")
    assert (dst.read_bytes(), dst.with_suffix(".html").read_bytes()) == first
    assert b"computed 42" in first[0] and b"FAILED" not in first[1]


def test_failed_cell_publishes_a_failed_report(repo):
    html = previous_report(repo)
    with pytest.raises(PapermillExecutionError, match="boom"):
        notebook.execute("notebooks/tiny.ipynb", "reports/tiny.ipynb", {"fail": True})
    page = html.read_text(encoding="utf-8")
    assert "This run FAILED</strong>: ValueError: boom" in page and PREVIOUS not in page
    nb = nbformat.read(html.with_suffix(".ipynb"), as_version=4)
    assert nb.cells[0].metadata["tags"] == ["run-failed"] and "ValueError: boom" in nb.cells[0].source
    assert "computed 42" in str(nb.cells)  # the failed run's outputs up to the error are kept
    assert nb.metadata["papermill"]["input_path"] == "notebooks/tiny.ipynb"  # sanitized: no machine paths


def test_failure_before_papermill_writes_anything(repo):
    html = previous_report(repo)
    with pytest.raises(FileNotFoundError):
        notebook.execute("notebooks/missing.ipynb", "reports/tiny.ipynb")
    page = html.read_text(encoding="utf-8")
    assert "This run FAILED</strong>: FileNotFoundError" in page and PREVIOUS not in page
    assert nbformat.read(html.with_suffix(".ipynb"), as_version=4).cells[0].metadata["tags"] == ["run-failed"]
