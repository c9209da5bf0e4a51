"""The layout keeps its promises: ``finetune/stages`` holds exactly the dvc.yaml stages, each stage's
docstring names the params sections dvc.yaml tracks for it, and each stage's ``deps:`` cover every finetune
module the stage runs (imported from it, transitively, lazily too), so changing one reruns the stage."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

from conftest import ROOT

SRC = ROOT / "src"
PACKAGE = SRC / "finetune"
STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]


def module_file(name: str) -> Path | None:
    """The file of module ``finetune.x.y`` (a package's ``__init__.py``), or None if it is no module."""
    base = SRC.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def has_code(path: Path) -> bool:
    """More than a docstring and ``__version__``-like names: a package ``__init__`` holding only those
    changes no behaviour."""
    def metadata(node: ast.stmt) -> bool:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            return True
        return isinstance(node, ast.Assign) and all(isinstance(t, ast.Name) and t.id.startswith("__")
                                                    for t in node.targets)

    return not all(metadata(node) for node in ast.parse(path.read_text(encoding="utf-8")).body)


def imported(path: Path) -> set[Path]:
    """The finetune module files ``path`` runs: those it imports anywhere (function-level imports too), and
    those it starts as programs (``-m finetune.x.y``, or a sibling file it names, like the sandbox's
    ``runner.py``). A package counts when its ``__init__`` runs code of its own."""
    names, siblings = set(), set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}  # a submodule, or just a name
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            if re.fullmatch(r"finetune(\.\w+)+", node.value):
                names.add(node.value)
            elif re.fullmatch(r"\w+\.py", node.value) and (path.parent / node.value).is_file():
                siblings.add(path.parent / node.value)
    found = set(siblings)
    for name in names:
        parts = name.split(".")
        for depth in range(1, len(parts) + 1):  # the module and every package above it
            file = module_file(".".join(parts[:depth])) if parts[0] == "finetune" else None
            if file is not None and (file.name != "__init__.py" or has_code(file)):
                found.add(file)
    return found


def closure(start: list[Path]) -> set[Path]:
    seen, todo = set(), list(start)
    while todo:
        path = todo.pop()
        if path not in seen:
            seen.add(path)
            todo += [p for p in imported(path) if p not in seen]
    return seen


def covered(deps: list[str]) -> set[Path]:
    """Every Python file a stage's deps name (a folder: the files in it)."""
    out = set()
    for dep in deps:
        path = ROOT / dep
        out |= set(path.rglob("*.py")) if path.is_dir() else {path}
    return out


def stage_module(name: str) -> Path:
    return PACKAGE / "stages" / f"{name}.py"


def test_stages_are_exactly_the_dvc_stages():
    modules = {p.stem for p in (PACKAGE / "stages").glob("*.py") if p.name != "__init__.py"}
    assert modules == set(STAGES), "finetune/stages holds one module per dvc.yaml stage and nothing else"
    for name, stage in STAGES.items():
        assert stage["cmd"].startswith(f"bin/project-python -m finetune {name} "), name


@pytest.mark.parametrize("name", sorted(STAGES))
def test_docstring_names_the_params_dvc_tracks(name):
    doc = " ".join(ast.get_docstring(ast.parse(stage_module(name).read_text(encoding="utf-8"))).split())
    said = re.search(r"Reads the (.+?) sections?\b", doc)
    assert said, f"stages/{name}.py: its docstring says which params sections it reads (`Reads the ``x`` ... sections`)"
    assert re.findall(r"``([^`]+)``", said.group(1)) == STAGES[name].get("params", []), (
        f"stages/{name}.py's docstring and dvc.yaml's params: for {name} disagree")


@pytest.mark.parametrize("name", sorted(STAGES))
def test_deps_cover_every_module_the_stage_runs(name):
    deps = STAGES[name]["deps"]
    # lm-eval loads the task folder's Python (eval/tasks/utils.py), which calls into finetune too
    extra_code = [p for dep in deps if (ROOT / dep).is_dir() and not dep.startswith("src/")
                  for p in (ROOT / dep).rglob("*.py")]
    needed = {p for p in closure([stage_module(name), *extra_code]) if p.is_relative_to(PACKAGE)}
    have = covered(deps)
    missing = sorted(str(p.relative_to(ROOT)) for p in needed - have)
    assert not missing, f"dvc.yaml: stage {name} runs these but its deps lack them: {missing}"
    listed = [ROOT / d for d in deps if d.startswith("src/")]
    for path in listed:
        assert path.exists(), f"dvc.yaml: stage {name}: {path.relative_to(ROOT)} does not exist"
    unused = sorted(str(p.relative_to(ROOT)) for p in listed
                    if not (set(p.rglob("*.py")) if p.is_dir() else {p}) & needed)
    assert not unused, f"dvc.yaml: stage {name} depends on code it never imports (a needless rerun): {unused}"


def test_the_walk_sees_lazy_imports_and_packages():
    """The check can fail: a function-level import counts, and so does a package that runs code."""
    assert PACKAGE / "use" / "handoff.py" in closure([stage_module("quantize")])  # imported inside quantize()
    needed = closure([stage_module("eval")])
    assert PACKAGE / "sandbox" / "launch.py" in needed  # through sandbox/__init__.py, which runs code
    assert PACKAGE / "core" / "__init__.py" not in needed  # a docstring only


def _module_aliases(tree: ast.Module) -> set[str]:
    """The names a file binds to finetune modules (``from finetune.core import gguf``, ``import ... as m``)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.asname for a in node.names if a.name.startswith("finetune") and a.asname}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("finetune"):
            names |= {a.asname or a.name for a in node.names if module_file(f"{node.module}.{a.name}")}
    return names


def test_no_module_private_is_set_from_outside():
    """Benchmarks and tests reach the code through public names: nothing assigns (or monkeypatches) a
    finetune module's private attribute from another file."""
    found = []
    for path in [*SRC.rglob("*.py"), *(ROOT / "tests").glob("*.py"), *(ROOT / "bench").glob("*.py")]:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        modules = _module_aliases(tree)
        for node in ast.walk(tree):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
                node, ast.AugAssign) else []
            for target in targets:
                if (isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name)
                        and target.value.id in modules and target.attr.startswith("_")):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {target.value.id}.{target.attr} = ...")
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "setattr"
                    and len(node.args) >= 2 and isinstance(node.args[0], ast.Name) and node.args[0].id in modules
                    and isinstance(node.args[1], ast.Constant) and str(node.args[1].value).startswith("_")):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: setattr({node.args[0].id}, "
                             f"{node.args[1].value!r})")
    assert not found, found
