"""Which files of the `tema` package a module or a notebook imports, read from the source (nothing is imported).

Two questions, two answers, both as repository-relative paths ("tema/models/base.py"), sorted:

- `may_execute`: every tema file that running the code may execute. Imports at module level and inside
  functions count, and so do the package __init__ files Python runs on the way: `import tema.models.base`
  runs tema/__init__.py and tema/models/__init__.py (which imports every model) before tema/models/base.py.
  A dvc stage's deps must cover these for its notebook (tests/test_structure.py checks dvc.yaml).
- `depends_on`: the tema files the module's own definitions are built from, which run fingerprints hash
  (tema.training.code_fingerprint). Narrower on purpose, in two ways, for one reason: here, the imports it leaves
  out are registration and look-up by name, which load every model, and a model's code does not depend on the
  others (counting them would retrain every model whenever any one of them changed):
  * module-level imports only. The package keeps function-local imports of tema modules for stated reasons only
    (a cost at import time, or a file that must stay out of fingerprints, as tema.imports itself in
    tema.training.code_fingerprint). A function-local import that the code does depend on would be missed: keep
    those at module level.
  * a package's __init__ counts where the package itself is imported (`import tema.models`,
    `from tema.models import build`), not where only one of its submodules is (`from tema.models.base import
    ItemSpace` uses tema/models/base.py, though Python runs tema/models/__init__.py, and every model, first).

`cycles` lists the import cycles between tema modules, counting every import statement (module-level and
function-local), but not the package __init__ files above a module itself, which Python has run before the module.
"""

from __future__ import annotations

import ast
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the repository: tema/ lies here
PACKAGE = "tema"


@dataclass(frozen=True)
class Import:
    """One import statement of a file, resolved to tema modules (dotted names)."""

    line: int
    targets: tuple[str, ...]  # the modules whose names the statement uses
    on_the_way: tuple[str, ...]  # the packages above them, which Python runs first
    local: bool  # inside a function: runs when the function is called


def module_file(name: str, root: Path = ROOT) -> Path | None:
    """The file of dotted module `name` under root (a module or a package's __init__), None if there is none."""
    base = root.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def module_name(path: str) -> str:
    """The dotted name of a repository-relative tema file: tema/models/__init__.py -> tema.models."""
    parts = Path(path).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def source_of(path: Path) -> str:
    """A Python file's source, or a notebook's code cells (IPython magics and shell lines blanked)."""
    if path.suffix != ".ipynb":
        return path.read_text()
    try:
        cells = json.loads(path.read_text())["cells"]
    except (ValueError, KeyError) as error:
        raise ValueError(f"{path}: not a notebook (expected JSON with 'cells'): {error}") from None
    code = ["".join(c["source"]) if isinstance(c["source"], list) else c["source"]
            for c in cells if c.get("cell_type") == "code"]
    lines = "\n".join(code).splitlines()
    return "\n".join("" if line.lstrip().startswith(("%", "!")) else line for line in lines)


def statements(body: list[ast.stmt], local: bool = False):
    """(import statement, whether inside a function) for every import in body, nested blocks included."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, local
            continue
        inner = local or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        for child in ast.iter_child_nodes(node):  # if/try/with/for/class bodies, except handlers, match cases
            if isinstance(child, ast.stmt):
                yield from statements([child], inner)
            elif isinstance(child, (ast.ExceptHandler, ast.match_case)):
                yield from statements(child.body, inner)


def imports_of(path: Path, root: Path = ROOT) -> list[Import]:
    """The tema imports of one file (a module under root/tema, or a notebook anywhere), resolved against root."""
    own = own_module(path, root)
    package = own if path.name == "__init__.py" else own.rpartition(".")[0]  # what relative imports start from
    found = []
    for node, local in statements(ast.parse(source_of(path), filename=str(path)).body):
        if isinstance(node, ast.Import):
            modules = [(alias.name, []) for alias in node.names]
        else:
            module = node.module or ""
            if node.level:  # from . import x, from ..base import y
                parts = package.split(".") if package else []
                if node.level > len(parts):
                    raise ValueError(f"{path}:{node.lineno}: relative import above the top package {PACKAGE!r}")
                module = ".".join(parts[: len(parts) - node.level + 1] + ([module] if module else []))
            modules = [(module, [alias.name for alias in node.names])]
        for module, names in modules:
            if module != PACKAGE and not module.startswith(PACKAGE + "."):
                continue
            if module_file(module, root) is None:
                raise ValueError(f"{path}:{node.lineno}: imports {module}, but neither "
                                 f"{module.replace('.', '/')}.py nor {module.replace('.', '/')}/__init__.py exists")
            submodules = [f"{module}.{n}" for n in names if n != "*" and module_file(f"{module}.{n}", root)]
            uses_package = not names or len(submodules) < len(names)  # import a.b, or a name defined in a/b
            targets = ([module] if uses_package else []) + submodules
            above = packages_above(module) + ([] if uses_package else [module])
            found.append(Import(node.lineno, tuple(targets), tuple(above), local))
    return found


def packages_above(module: str) -> list[str]:
    """The packages Python imports before dotted module `module`: tema.models.base -> [tema, tema.models]."""
    parts = module.split(".") if module else []
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def own_module(path: Path, root: Path) -> str:
    """The dotted name of a file under root/tema; "" for anything else (a notebook)."""
    try:
        rel = path.resolve().relative_to(root.resolve() / PACKAGE)
    except ValueError:
        return ""
    return module_name((Path(PACKAGE) / rel).as_posix()) if path.suffix == ".py" else ""


def relative(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def edges(path: Path, root: Path, *, execution: bool) -> dict[str, int]:
    """The tema files one file's imports lead to directly, each with the line of its first such import.

    execution=True (may_execute): every import, with the packages on the way, except the packages above the file
    itself (Python has run them before it). execution=False (depends_on): module-level imports, their targets only."""
    own = own_module(path, root)
    ancestors = set(packages_above(own))
    found: dict[str, int] = {}
    for imp in imports_of(path, root):
        if not execution and imp.local:
            continue
        modules = imp.targets + (tuple(m for m in imp.on_the_way if m not in ancestors) if execution else ())
        for module in modules:
            if module != own:
                found.setdefault(relative(module_file(module, root), root), imp.line)
    return found


def closure(paths: Iterable[str | Path], root: Path = ROOT, *, execution: bool) -> list[str]:
    """The tema files reachable from paths (relative to root, or absolute), the tema modules among paths included;
    for execution, also the package __init__ files above those modules (Python runs them first)."""
    root = root.resolve()
    todo = []
    for start in paths:
        path = (root / start).resolve()
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such module or notebook")
        todo.append(path)
        if execution:
            todo += [module_file(package, root) for package in packages_above(own_module(path, root))]
    seen = {relative(p, root) for p in todo if own_module(p, root)}
    while todo:
        for rel in edges(todo.pop(), root, execution=execution):
            if rel not in seen:
                seen.add(rel)
                todo.append(root / rel)
    return sorted(seen)


def may_execute(paths: Iterable[str | Path], root: Path = ROOT) -> list[str]:
    """Every tema file that running paths (modules or notebooks) may execute: for dvc deps (see the module doc)."""
    return closure(paths, root, execution=True)


def depends_on(paths: Iterable[str | Path], root: Path = ROOT) -> list[str]:
    """The tema files whose code the modules in paths are built from: for fingerprints (see the module doc)."""
    return closure(paths, root, execution=False)


def cycles(root: Path = ROOT) -> list[str]:
    """The import cycles among tema modules, counting every import statement (module-level and function-local):
    one line per group of modules that import each other, round about: its files, then the shortest cycle through
    the first, as "tema/a.py:12 -> tema/b.py:3 -> tema/a.py" (file:line of its import of the next file)."""
    root = root.resolve()
    graph = {relative(p, root): edges(p, root, execution=True) for p in sorted((root / PACKAGE).rglob("*.py"))}
    reach = {f: reachable(graph, f) for f in graph}
    found, covered = [], set()
    for start in graph:
        if start in reach[start] and start not in covered:
            group = sorted(f for f in reach[start] if start in reach[f])
            covered.update(group)
            chain = shortest_cycle(graph, start)
            found.append(f"{', '.join(group)}: "
                         + " -> ".join([f"{f}:{graph[f][nxt]}" for f, nxt in zip(chain, chain[1:], strict=False)] + [start]))
    return found


def reachable(graph: dict[str, dict[str, int]], start: str) -> set[str]:
    """The files that start's imports lead to, in one step or more."""
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), {}):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def shortest_cycle(graph: dict[str, dict[str, int]], start: str) -> list[str] | None:
    """The shortest chain of imports from start back to start ([start, ..., start]), by breadth-first search."""
    came_from: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt in graph.get(node, {}):
                if nxt == start:
                    chain = [node]
                    while chain[-1] != start:
                        chain.append(came_from[chain[-1]])
                    return chain[::-1] + [start]
                if nxt not in came_from:
                    came_from[nxt] = node
                    following.append(nxt)
        frontier = following
    return None
