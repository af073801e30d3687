"""The layout is the architecture: packages import one way, and the README's layout names every module.

  shared            imports no other package of the project (both sides agree on it; it depends on neither), and
                    names none by string either: no importlib in it
  teacher_service   imports shared only
  student_trainer   imports shared, and of the service only its one in-process entry (teacher_service.local)
  pipeline          orchestrates both sides; nothing imports it but bench (and the `akd` entry point, by name)
  bench             measures both sides, and may use the pipeline's (its service start-up, its machine record);
                    nothing imports it (but the `akd` entry point, by name)
  akd               the entry point, above every package: it may name any of them; nothing imports it but the
                    `__main__` modules, each the same three lines
Every import counts, those inside functions too.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from conftest import REPO

PACKAGES = ("akd", "shared", "teacher_service", "student_trainer", "pipeline", "bench")
ALLOWED = {
    "akd": set(PACKAGES),
    "shared": set(),
    "teacher_service": {"shared"},
    "student_trainer": {"shared", "teacher_service.local"},
    "pipeline": {"shared", "student_trainer", "teacher_service"},
    "bench": {"shared", "student_trainer", "teacher_service", "pipeline"},
}
# The packages the README's layout names module by module (bench's line names its parts and "one module per benchmark").
LAID_OUT = ("akd", "shared", "teacher_service", "student_trainer", "pipeline")
# What a `__main__.py` holds besides its docstring: `python -m <package>` is `akd` with that package's commands.
MAIN_SHAPE = ("Import(names=[alias(name='sys')])", "ImportFrom(module='akd.cli', names=[alias(name='main')], level=0)")


def modules(package: str) -> list[Path]:
    return sorted((REPO / package).rglob("*.py"))


def imports(path: Path) -> set[str]:
    """Every project module `path` imports, anywhere in it (relative imports resolved)."""
    package = ".".join(path.relative_to(REPO).parent.parts)
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: the package `level - 1` folders up, then the module named
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            found.add(base)
    return {name for name in found if name.split(".")[0] in PACKAGES}


def allowed(importer: str, imported: str, path: Path) -> bool:
    top = imported.split(".")[0]
    if top == "akd" and path.name == "__main__.py":
        return True
    return top == importer or any(imported == rule or imported.startswith(rule + ".") for rule in ALLOWED[importer])


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_packages_import_one_way(package):
    wrong = {
        f"{path.relative_to(REPO)} imports {name}"
        for path in modules(package)
        for name in imports(path)
        if not allowed(package, name, path)
    }
    assert not wrong, sorted(wrong)


def test_nothing_imports_the_pipeline_but_bench_and_the_entry_point_by_name():
    importers = {
        str(path.relative_to(REPO))
        for package in PACKAGES
        if package not in ("pipeline", "bench")
        for path in modules(package)
        if any(name.split(".")[0] == "pipeline" for name in imports(path))
    }
    assert not importers, importers
    assert '"pipeline.cli"' in (REPO / "akd" / "cli.py").read_text()


def test_nothing_imports_akd_but_a_main_module():
    importers = {
        str(path.relative_to(REPO))
        for package in [*PACKAGES, "scripts"]
        if package != "akd"
        for path in modules(package)
        if path.name != "__main__.py" and any(name.split(".")[0] == "akd" for name in imports(path))
    }
    assert not importers, importers


def test_shared_names_no_module_to_import_by_string():
    """A side named by string in shared would be a dependency the import graph does not show: only akd does that."""
    dynamic = {
        str(path.relative_to(REPO))
        for path in modules("shared")
        for node in ast.walk(ast.parse(path.read_text()))
        if (isinstance(node, ast.Import) and any(alias.name.split(".")[0] == "importlib" for alias in node.names))
        or (isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "importlib")
        or (isinstance(node, ast.Name) and node.id == "__import__")
    }
    assert not dynamic, sorted(dynamic)


def test_every_main_module_is_akd_with_its_package_commands():
    """`import sys`, `from akd.cli import main`, `sys.exit(main(...))`: no `python -m` has a parser of its own."""
    mains = sorted(path for package in PACKAGES for path in modules(package) if path.name == "__main__.py")
    assert {path.parent.name for path in mains} >= {"akd", "teacher_service", "student_trainer", "pipeline"}
    for path in mains:
        body = ast.parse(path.read_text()).body
        if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
            body = body[1:]  # the docstring
        assert len(body) == 3 and tuple(ast.dump(node) for node in body[:2]) == MAIN_SHAPE, path
        call = body[2].value if isinstance(body[2], ast.Expr) else None
        assert isinstance(call, ast.Call) and ast.unparse(call.func) == "sys.exit" and len(call.args) == 1, path
        assert isinstance(call.args[0], ast.Call) and ast.unparse(call.args[0].func) == "main", path


def test_the_readme_layout_names_every_module():
    readme = (REPO / "README.md").read_text()
    layout = readme.split("## Layout", 1)[1].split("```")[1]
    lines = {line.split()[0].rstrip("/"): line for line in layout.splitlines() if line and not line.startswith(" ")}
    named = {package: "" for package in LAID_OUT}
    current = None
    for line in layout.splitlines():
        if line and not line.startswith(" "):
            current = line.split()[0].rstrip("/")
        if current in named:
            named[current] += " " + line
    missing = [
        f"{package}/{path.relative_to(REPO / package)}"
        for package in LAID_OUT
        for path in modules(package)
        if path.name not in ("__init__.py", "__main__.py")
        and not re.search(rf"(?<![\w/]){re.escape(path.relative_to(REPO / package).parts[0])}\b", named[package])
    ]
    assert set(lines) >= set(LAID_OUT) and not missing, missing
