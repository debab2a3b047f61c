"""The package's structure, read from the source (tema.imports): no import cycles, dvc stages that depend on every
tema file their notebook runs, and run fingerprints that change with the code a model's training runs, and only then."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from tema import datasets, imports
from tema.datasets.registry import FORMATS, reader_file
from tema.models import MODELS
from tema.profiles import profile_params
from tema.training import code_fingerprint


def write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def notebook(*cells: str) -> str:
    return json.dumps({"cells": [{"cell_type": "markdown", "source": ["import tema.doc\n"]}]
                       + [{"cell_type": "code", "source": cell.splitlines(keepends=True)} for cell in cells]})


@pytest.fixture
def toy(tmp_path) -> Path:
    """A small package `tema` with each kind of import (not the real one: the cases stay put as it changes)."""
    write(tmp_path, {
        "tema/__init__.py": "",
        "tema/doc.py": "",
        "tema/base.py": "import json\n",
        "tema/helper.py": "from tema.base import *\n",
        "tema/lazy.py": "",
        "tema/uses_lazy.py": "import tema.base\n\ndef f():\n    from tema import lazy\n",
        "tema/pkg/__init__.py": "from tema.pkg import heavy  # registers\nNAME = 1\n",
        "tema/pkg/heavy.py": "import tema.pkg.sibling\n",
        "tema/pkg/light.py": "from . import sibling\nfrom ..base import x\n",
        "tema/pkg/sibling.py": "class A:\n    if True:\n        try:\n            import tema.helper as h\n"
                               "        except ImportError:\n            pass\n",
        "tema/by_name.py": "from tema.pkg import NAME\n",
        "nb.ipynb": notebook("%matplotlib inline\nfrom tema.pkg.light import thing", "!ls\nimport numpy"),
    })
    return tmp_path


def test_depends_on_follows_module_level_imports_and_packages_imported_themselves(toy):
    assert imports.depends_on(["tema/uses_lazy.py"], toy) == ["tema/base.py", "tema/uses_lazy.py"]
    # relative imports, imports nested in class/if/try blocks, `import a.b as c`, `from a import *`; not tema/pkg's
    # __init__ (and with it heavy.py), which Python runs first: light.py uses none of it
    assert imports.depends_on(["tema/pkg/light.py"], toy) == [
        "tema/base.py", "tema/helper.py", "tema/pkg/light.py", "tema/pkg/sibling.py"]
    assert imports.depends_on(["tema/by_name.py"], toy) == [
        "tema/base.py", "tema/by_name.py", "tema/helper.py", "tema/pkg/__init__.py", "tema/pkg/heavy.py",
        "tema/pkg/sibling.py"]


def test_may_execute_adds_function_local_imports_and_the_packages_on_the_way(toy):
    assert imports.may_execute(["tema/uses_lazy.py"], toy) == [
        "tema/__init__.py", "tema/base.py", "tema/lazy.py", "tema/uses_lazy.py"]
    # a notebook's code cells only (magics and shell lines skipped); tema/pkg/__init__.py runs, and imports heavy.py
    assert imports.may_execute(["nb.ipynb"], toy) == [
        "tema/__init__.py", "tema/base.py", "tema/helper.py", "tema/pkg/__init__.py", "tema/pkg/heavy.py",
        "tema/pkg/light.py", "tema/pkg/sibling.py"]


def test_imports_of_missing_modules_name_the_file_and_line(toy):
    write(toy, {"tema/broken.py": "import os\nfrom tema.gone import x\n"})
    with pytest.raises(ValueError, match=r"broken\.py:2: imports tema\.gone, but neither tema/gone\.py nor"):
        imports.depends_on(["tema/broken.py"], toy)


def test_cycles_count_function_local_imports_but_not_the_packages_above_a_module(toy):
    # tema/pkg/__init__ imports heavy.py, which imports tema.pkg.sibling: Python has run tema/pkg/__init__ before
    # heavy.py (its package), so that is no cycle
    assert imports.cycles(toy) == []
    write(toy, {"tema/pkg/heavy.py": "import tema.pkg.sibling\n\ndef register():\n    import tema.pkg\n"})
    assert imports.cycles(toy) == [  # importing the package itself, even inside a function, is
        "tema/pkg/__init__.py, tema/pkg/heavy.py: tema/pkg/__init__.py:1 -> tema/pkg/heavy.py:4 -> tema/pkg/__init__.py"]


def test_the_package_has_no_import_cycles(root):
    found = imports.cycles(root)
    assert not found, "import cycles (each: the modules that import each other, then one cycle):\n" + "\n".join(found)


def stages(root: Path) -> dict[str, dict]:
    return yaml.safe_load((root / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("name", sorted(stages(Path(__file__).resolve().parents[1])))
def test_a_stage_depends_on_every_tema_file_its_notebook_runs(root, name):
    stage = stages(root)[name]
    body = stage.get("do", stage)  # foreach stages keep cmd and deps under `do`
    found = re.findall(r"notebooks/[\w.-]+\.ipynb", body["cmd"])
    assert found, f"dvc.yaml: stage {name}: no notebooks/*.ipynb in its cmd {body['cmd']!r}"
    deps = [str(d).rstrip("/") for d in body["deps"]]
    assert found[0] in deps, f"dvc.yaml: stage {name} runs {found[0]} but does not list it in deps"
    missing = [f for f in imports.may_execute([found[0]], root)
               if not any(f == d or f.startswith(d + "/") for d in deps)]
    assert not missing, f"dvc.yaml: stage {name}: {found[0]} runs {missing}, which its deps do not cover"
    stale = [d for d in deps if d.startswith("tema") and not (root / d).exists()]
    assert not stale, f"dvc.yaml: stage {name}: deps {stale} do not exist"


READERS = sorted(f"{m.replace('.', '/')}.py" for m in FORMATS.values())


def test_a_dataset_stage_depends_on_its_own_reader_and_raw_folder_and_no_other(root):
    """A reader is imported for its dataset only (tema.datasets.registry), so no notebook's imports reach one: the
    stages that read raw data name theirs through params (`readers`, `tag_datasets`: dataset -> reader file)."""
    for notebook in sorted((root / "notebooks").glob("*.ipynb")):
        reached = set(imports.may_execute([str(notebook.relative_to(root))], root))
        assert not reached & set(READERS), f"{notebook.name} imports a dataset reader: {sorted(reached & set(READERS))}"
    for name, stage in stages(root).items():
        deps = [str(d) for d in stage.get("do", stage)["deps"]]
        assert "tema/datasets" not in deps and not set(deps) & set(READERS), f"{name}: depends on every reader, or on one by name"
        if name in ("prepare", "tags"):
            assert stage["foreach"] in ("${readers}", "${tag_datasets}") and "${item}" in deps and "data/raw/${key}" in deps, name
        elif name == "tags-source":  # a further tag source of a dataset: the items of tag_sources name dataset and reader
            assert stage["foreach"] == "${tag_sources}" and "${item.reader}" in deps and "data/raw/${item.dataset}" in deps
        else:
            assert not any(d.startswith("data/raw") for d in deps), name
    for profile in ("default", "smoke", "full", "art-office"):
        params = profile_params(profile)
        for key in ("readers", "tag_datasets"):
            for dataset, reader in params[key].items():
                assert reader == reader_file(datasets.spec(dataset).format) and reader in READERS, (profile, key, dataset)
        assert list(params["readers"]) == params["datasets"]


@pytest.fixture(scope="module")
def fingerprints(tmp_path_factory, root):
    """Each registered model's code fingerprint in a copy of the package with one file edited (None: no edit)."""
    found: dict[str | None, dict[str, str]] = {}

    def after_editing(path: str | None) -> dict[str, str]:
        if path in found:
            return found[path]
        copy = tmp_path_factory.mktemp("repo")
        shutil.copytree(root / "tema", copy / "tema", ignore=shutil.ignore_patterns("__pycache__"))
        if path is not None:
            with open(copy / path, "a") as f:
                f.write("\n# an edit\n")
        found[path] = {model: code_fingerprint(model, copy) for model in MODELS}
        return found[path]

    return after_editing


def changed(fingerprints, path: str) -> set[str]:
    before, after = fingerprints(None), fingerprints(path)
    return {model for model in MODELS if before[model] != after[model]}


def models_in(*modules: str) -> set[str]:
    return {name for name, cls in MODELS.items() if cls.__module__ in modules}


def test_a_copy_of_the_package_fingerprints_alike(fingerprints):
    assert fingerprints(None) == {model: code_fingerprint(model) for model in MODELS}


def test_an_edit_to_sasrec_retrains_the_models_built_on_its_blocks(fingerprints):
    expected = models_in("tema.models.sasrec", "tema.models.tema", "tema.models.c2dsr")
    assert {"sasrec", "tema", "sasrec-text", "c2dsr"} <= expected
    assert changed(fingerprints, "tema/models/sasrec.py") == expected


def test_an_edit_to_one_model_leaves_the_others(fingerprints):
    assert changed(fingerprints, "tema/models/c2dsr.py") == {"c2dsr"}
    assert changed(fingerprints, "tema/models/gru4rec.py") == models_in("tema.models.gru4rec")


def test_edits_outside_the_training_code_change_no_fingerprint(fingerprints):
    for path in ("tema/datasets/food_kitchen.py", "tema/datasets/art_office.py", "tema/datasets/generic.py",
                 "tema/models/__init__.py", "tema/train.py", "tema/schema.py"):
        assert changed(fingerprints, path) == set(), path


def test_an_edit_to_the_loop_or_what_it_imports_retrains_every_model(fingerprints):
    for path in ("tema/training.py", "tema/artifacts.py", "tema/models/base.py"):
        assert changed(fingerprints, path) == set(MODELS), path


def test_the_loop_depends_on_what_code_fingerprint_documents(root):
    assert imports.depends_on(["tema/training.py"], root) == [
        "tema/artifacts.py", "tema/atomic.py", "tema/config.py", "tema/data.py", "tema/models/base.py", "tema/models/registry.py",
        "tema/protocols.py", "tema/training.py"]
