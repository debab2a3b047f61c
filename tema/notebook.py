"""Execute a stage notebook with papermill and publish it as a reproducible report (ipynb + HTML).

Reports must be byte-identical when a stage re-runs on the same inputs, so the executed notebook is
stripped of what changes from run to run: papermill's and nbclient's timestamps and durations, random
cell ids, and
the stderr stream (progress bars with rates and ETA, which papermill still echoes live to the terminal).
"""

from __future__ import annotations

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


def execute(notebook: str | Path, output: str | Path, parameters: dict[str, Any] | None = None) -> Path:
    """Run `notebook` into `output` (relative paths from the repository root); writes output.html too."""
    import papermill as pm

    root = config.repo_root()
    notebook, output = Path(notebook), Path(output)
    src = notebook if notebook.is_absolute() else root / notebook
    dst = output if output.is_absolute() else root / output
    dst.parent.mkdir(parents=True, exist_ok=True)
    pm.execute_notebook(
        str(src), str(dst), parameters=parameters or {}, kernel_name="python3",
        cwd=str(src.parent), log_output=True, progress_bar=False,
    )
    nb = sanitize(nbformat.read(dst, as_version=4))
    # papermill records the paths it was given: keep them relative so reports hold no machine paths
    nb.metadata.get("papermill", {}).update({"input_path": str(notebook), "output_path": str(output)})
    nbformat.write(nb, dst)
    dst.with_suffix(".html").write_text(to_html(nb), encoding="utf-8")
    return dst
