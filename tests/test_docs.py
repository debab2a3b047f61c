"""The README and docs/ point only at files that exist, and the README keeps CI's two commands.

1. Every relative Markdown link `[text](path)` in README.md and docs/**/*.md resolves, from the page that holds
   it, to an existing file or folder (`#anchors` stripped; http(s) and mailto links are not checked). A link's
   anchor into a Markdown page must name one of that page's headings.
2. Every `*.md` file named in README.md, docs/*.md, tema/**/*.py, notebooks/*.ipynb, benchmarks/*.py and dvc.yaml is
   a file of the repository (tracked, or new and not ignored): a docstring citing a page that is not in the
   repository fails.
3. README.md is a user guide of at most MAX_README_LINES lines, with the install and test commands that .ci/run runs.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_README_LINES = 200
INSTALL = 'python3 -m venv .venv && . .venv/bin/activate && pip install -c constraints.txt -e ".[dev]" && dvc repro'
TESTS = ". .venv/bin/activate && ruff check . && python -m pytest -q"
# (citing file, *.md name) pairs that may name no file of the repository, each with its reason. Keep it empty.
ALLOWED_MISSING: dict[tuple[str, str], str] = {}

FENCE = re.compile(r"^ {0,3}(```|~~~).*?^ {0,3}\1[^\n]*$", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")  # [text](target "title"), images too
SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)  # http:, https:, mailto: ...
URL = re.compile(r"\b(?:https?|ftp)://\S+|\bmailto:\S+|\b(?:github|gitlab)\.com/\S+")
MD_NAME = re.compile(r"(?<![\w.-])((?:[\w.-]+/)*[\w.-]+\.md)\b")
HEADING = re.compile(r"^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$")


# -- what the checks read ---------------------------------------------------------------------------------------------

def prose(text: str) -> str:
    """The text without fenced code blocks and inline code, line numbers kept: a link in code is not a link."""
    text = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    return INLINE_CODE.sub("", text)


def links(text: str) -> list[tuple[int, str, str]]:
    """(line, path, anchor) of every relative link of a Markdown text; external and same-page links left out."""
    out = []
    for number, line in enumerate(prose(text).splitlines(), 1):
        for target in LINK.findall(line):
            if SCHEME.match(target):
                continue
            path, _, anchor = target.partition("#")
            if path:
                out.append((number, path.split("?", 1)[0], anchor))
    return out


def slug(heading: str) -> str:
    """A heading's anchor as GitHub makes it: lowercase, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"[`*]|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    found: set[str] = set()
    for line in FENCE.sub("", page.read_text(encoding="utf-8")).splitlines():
        match = HEADING.match(line)
        if match:
            base = slug(match.group(1))
            name, n = base, 1
            while name in found:  # a repeated heading gets -1, -2, ...
                name, n = f"{base}-{n}", n + 1
            found.add(name)
    return found


def broken_links(pages: list[Path], root: Path) -> list[str]:
    """One line per link of `pages` that resolves to nothing, or to a Markdown page without its anchor."""
    problems = []
    for page in pages:
        for number, path, anchor in links(page.read_text(encoding="utf-8")):
            target = (page.parent / path).resolve()
            where = f"{page.relative_to(root)}:{number}"
            if not target.exists():
                shown = target.relative_to(root) if target.is_relative_to(root) else target
                problems.append(f"{where}: link to {path} ({shown}) does not exist")
            elif anchor and target.is_file() and target.suffix == ".md" and anchor not in anchors(target):
                problems.append(f"{where}: link to {path}#{anchor}: {path} has no heading with that anchor")
    return problems


def md_mentions(text: str) -> list[tuple[int, str]]:
    """(line, name) of every *.md file name in a text, URLs left out."""
    return [(number, re.sub(r"^(?:\.\.?/)+", "", name)) for number, line in enumerate(text.splitlines(), 1)
            for name in MD_NAME.findall(URL.sub(" ", line))]


def text_of(path: Path) -> str:
    """A file's text; of a notebook, its cells' sources (not their outputs)."""
    text = path.read_text(encoding="utf-8")
    if path.suffix != ".ipynb":
        return text
    sources = (cell.get("source", "") for cell in json.loads(text).get("cells", []))
    return "\n".join(s if isinstance(s, str) else "".join(s) for s in sources)


def missing_md_files(paths: list[Path], files: set[str], root: Path) -> list[str]:
    """One line per *.md name in `paths` that is no file of `files` (repository paths; a name may omit leading folders)."""
    problems = []
    for path in paths:
        for number, name in md_mentions(text_of(path)):
            if (str(path.relative_to(root)), name) in ALLOWED_MISSING:
                continue
            if not any(f == name or f.endswith("/" + name) for f in files):
                problems.append(f"{path.relative_to(root)}:{number}: names {name}, which is no file of the repository")
    return problems


def repository_files() -> set[str]:
    """The repository's files: tracked, or untracked and not ignored (a page written but not added yet). Without git
    (an unpacked archive): every file outside hidden folders."""
    try:
        listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                                capture_output=True, check=True).stdout.decode()
    except (OSError, subprocess.CalledProcessError):
        return {str(p.relative_to(ROOT)) for p in ROOT.rglob("*")
                if p.is_file() and not any(part.startswith(".") for part in p.relative_to(ROOT).parts)}
    return {p for p in listed.split("\0") if p and (ROOT / p).is_file()}


def markdown_pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def citing_files() -> list[Path]:
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "tema").rglob("*.py")),
             *sorted((ROOT / "notebooks").glob("*.ipynb")), *sorted((ROOT / "benchmarks").glob("*.py")), ROOT / "dvc.yaml"]
    return [f for f in files if f.is_file()]


# -- the repository ---------------------------------------------------------------------------------------------------

def test_every_relative_markdown_link_resolves():
    pages = markdown_pages()
    assert len(pages) > 1 and all(p.is_file() for p in pages)
    problems = broken_links(pages, ROOT)
    assert not problems, "broken links in README.md and docs/:\n" + "\n".join(problems)


def test_every_named_md_file_is_in_the_repository():
    problems = missing_md_files(citing_files(), repository_files(), ROOT)
    assert not problems, "*.md files named but not in the repository:\n" + "\n".join(problems)
    stale = [f"{path}: {name}" for path, name in ALLOWED_MISSING
             if not (ROOT / path).is_file() or name not in {n for _, n in md_mentions(text_of(ROOT / path))}]
    assert not stale, "ALLOWED_MISSING entries no longer needed, remove them:\n" + "\n".join(stale)


def test_the_readme_is_a_short_guide_with_the_commands_ci_runs():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    lines = text.splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines, at most {MAX_README_LINES}: move details to docs/"
    assert INSTALL in lines, f"README.md lacks the install command, exactly this line:\n{INSTALL}"
    assert TESTS in lines, f"README.md lacks the test command, exactly this line:\n{TESTS}"
    for note in ("torch==2.13.0", "--extra-index-url https://download.pytorch.org/whl/cpu", "environment.yml"):
        assert note in text, f"README.md lacks the install note's {note!r}"
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    for command in ('pip install -c constraints.txt -e ".[dev]"', "ruff check .", "python -m pytest -q"):
        assert command in ci and command in INSTALL + TESTS, f"README.md's commands and .ci/run must both run {command!r}"


# -- the checks fail where they should --------------------------------------------------------------------------------

def test_a_broken_link_is_reported_with_its_page_and_line(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A page\n\n## Some part: `code`\n\nSee [b](../README.md).\n", encoding="utf-8")
    (tmp_path / "README.md").write_text(
        "# Title\n"
        "[a](docs/a.md) [part](docs/a.md#some-part-code) [folder](docs/) [web](https://example.org/x.md)\n"
        "`[code](nowhere.md)`\n"
        "```\n[block](nowhere.md)\n```\n"
        "[gone](docs/gone.md#x) and [part](docs/a.md#no-such-part)\n", encoding="utf-8")
    problems = broken_links([tmp_path / "README.md", tmp_path / "docs" / "a.md"], tmp_path)
    assert problems == ["README.md:7: link to docs/gone.md (docs/gone.md) does not exist",
                        "README.md:7: link to docs/a.md#no-such-part: docs/a.md has no heading with that anchor"]


def test_a_missing_md_file_is_reported(tmp_path):
    cited = tmp_path / "module.py"
    cited.write_text('"""See design.md, docs/method.md and README.md;\nnot https://example.org/x/README2.md."""\n',
                     encoding="utf-8")
    notebook = tmp_path / "n.ipynb"
    notebook.write_text(json.dumps({"cells": [{"source": ["# see\n", "shared/docs/offline-models.md"]}]}), encoding="utf-8")
    problems = missing_md_files([cited, notebook], {"docs/method.md", "README.md", "docs/offline-models.md"}, tmp_path)
    assert problems == ["module.py:1: names design.md, which is no file of the repository",
                        "n.ipynb:2: names shared/docs/offline-models.md, which is no file of the repository"]


@pytest.mark.parametrize("text, expected", [
    ("[a](docs/x.md)", [(1, "docs/x.md", "")]),
    ("[a](docs/x.md#part) [b](#local) [c](https://x.org/y.md) [d](mailto:me@x.org)", [(1, "docs/x.md", "part")]),
    ('![img](figure.png) and\n[a](../README.md "title")', [(1, "figure.png", ""), (2, "../README.md", "")]),
    ("```\n[a](inside-code.md)\n```\n`[b](inline.md)`", []),
])
def test_which_links_are_checked(text, expected):
    assert links(text) == expected


@pytest.mark.parametrize("heading, anchor", [
    ("Tuning with the same budget for every model", "tuning-with-the-same-budget-for-every-model"),
    ("Metrics: `dvc metrics show`", "metrics-dvc-metrics-show"),
    ("Known limitation: `--dry` on a fresh clone", "known-limitation---dry-on-a-fresh-clone"),
    ("Tags: generation, refinement, caches and endpoints", "tags-generation-refinement-caches-and-endpoints"),
])
def test_heading_anchors(heading, anchor):
    assert slug(heading) == anchor
