"""Execute a stage notebook with papermill and publish it as a reproducible report (ipynb + HTML).

Reports must be byte-identical when a stage re-runs on the same inputs, so the executed notebook is
stripped of what changes from run to run: papermill's and nbclient's timestamps and durations, random
cell ids, and
the stderr stream (progress bars with rates and ETA, which papermill still echoes live to the terminal).

A failed run leaves no report that looks current: the previous ipynb and HTML are removed before the run, and
the failed run's notebook is published with a "This run FAILED" banner at the top (then the error is raised).
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import nbformat

from tema import config

VOLATILE_NB_KEYS = ("start_time", "end_time", "duration")


def sanitize(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    pm = nb.metadata.get("papermill", {})
    for key in VOLATILE_NB_KEYS:
        pm.pop(key, None)
    nb.metadata.pop("widgets", None)
    for number, cell in enumerate(nb.cells):
        cell.id = f"cell-{number}"  # papermill gives its injected-parameters cell a random id
        cell.metadata.pop("papermill", None)
        cell.metadata.pop("execution", None)
        if cell.cell_type == "code":
            cell.outputs = [o for o in cell.outputs if not (o.output_type == "stream" and o.get("name") == "stderr")]
    return nb


def to_html(nb: nbformat.NotebookNode) -> str:
    from nbconvert import HTMLExporter

    exporter = HTMLExporter(template_name="lab")
    body, _ = exporter.from_notebook_node(nb)
    return body


def failure_summary(err: BaseException) -> str:
    """'<exception name>: <message>', as a traceback's last line; for a failed cell, the cell's exception."""
    if getattr(err, "ename", None):  # papermill's PapermillExecutionError carries the cell's exception
        return f"{err.ename}: {err.evalue}"
    return f"{type(err).__name__}: {err}" if str(err) else type(err).__name__


def failure_banner(notebook: str | Path, summary: str) -> nbformat.NotebookNode:
    """The first cell of a failed run's report, so that it cannot be mistaken for a current one."""
    style = "border: 3px solid #c00; background: #fee; color: #900; padding: 0.8em 1em; font-size: 1.2em"
    cell = nbformat.v4.new_markdown_cell(
        f'<div style="{style}"><strong>This run FAILED</strong>: {html.escape(summary)}<br>'
        f"This is the report of the failed run of {html.escape(str(notebook))}, up to the error; "
        "it replaces the previous report.</div>"
    )
    cell.metadata["tags"] = ["run-failed"]
    return cell


def publish(nb: nbformat.NotebookNode, dst: Path, notebook: Path, output: Path) -> None:
    """Write the sanitized notebook to dst and its HTML beside it (dst with the suffix .html)."""
    nb = sanitize(nb)
    # papermill records the paths it was given: keep them relative so reports hold no machine paths
    nb.metadata.get("papermill", {}).update({"input_path": str(notebook), "output_path": str(output)})
    nbformat.write(nb, dst)
    dst.with_suffix(".html").write_text(to_html(nb), encoding="utf-8")


def publish_failure(dst: Path, notebook: Path, output: Path, err: BaseException) -> None:
    """The report of a failed run: what papermill wrote (nothing, when it failed before the first cell), under a
    FAILED banner naming the error."""
    try:
        nb = nbformat.read(dst, as_version=4)
    except Exception:  # papermill wrote nothing, or not a whole notebook: the banner alone is the report
        nb = nbformat.v4.new_notebook()
    nb.cells.insert(0, failure_banner(notebook, failure_summary(err)))
    publish(nb, dst, notebook, output)


def execute(notebook: str | Path, output: str | Path, parameters: dict[str, Any] | None = None) -> Path:
    """Run `notebook` into `output` (relative paths from the repository root); writes output.html too.

    The previous report is removed first. When the run fails, the report written is that of the failed run, with
    a FAILED banner at the top, and the error is raised again (so the command exits non-zero).
    """
    import papermill as pm  # papermill and nbconvert take seconds to import; only stages that run a notebook need them

    root = config.repo_root()
    notebook, output = Path(notebook), Path(output)
    src = notebook if notebook.is_absolute() else root / notebook
    dst = output if output.is_absolute() else root / output
    dst.parent.mkdir(parents=True, exist_ok=True)
    for previous in (dst, dst.with_suffix(".html")):
        previous.unlink(missing_ok=True)
    try:
        pm.execute_notebook(
            str(src), str(dst), parameters=parameters or {}, kernel_name="python3",
            cwd=str(src.parent), log_output=True, progress_bar=False,
        )
    except BaseException as err:
        try:
            publish_failure(dst, notebook, output, err)
        except Exception as report_err:  # the run's own error is what matters; say why there is no report
            err.add_note(f"tema: could not write the failed run's report {dst}: {report_err!r}")
        raise
    publish(nbformat.read(dst, as_version=4), dst, notebook, output)
    return dst
