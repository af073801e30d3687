"""The layout is the architecture: packages import one way, and the README's layout names every module.

  shared            imports no other package of the project (both sides agree on it; it depends on neither)
  teacher_service   imports shared only
  student_trainer   imports shared, and of the service only its one in-process entry (teacher_service.local)
  pipeline          orchestrates both sides; nothing imports it (but the `akd` entry point, by name)
Every import counts, those inside functions too.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from conftest import REPO

PACKAGES = ("shared", "teacher_service", "student_trainer", "pipeline", "bench")
ALLOWED = {
    "shared": set(),
    "teacher_service": {"shared"},
    "student_trainer": {"shared", "teacher_service.local"},
    "pipeline": {"shared", "student_trainer", "teacher_service"},
}


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


def allowed(importer: str, imported: str) -> bool:
    top = imported.split(".")[0]
    return top == importer or any(imported == rule or imported.startswith(rule + ".") for rule in ALLOWED[importer])


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_packages_import_one_way(package):
    wrong = {
        f"{path.relative_to(REPO)} imports {name}"
        for path in modules(package)
        for name in imports(path)
        if not allowed(package, name)
    }
    assert not wrong, sorted(wrong)


def test_nothing_imports_the_pipeline_but_the_entry_point_by_name():
    importers = {
        str(path.relative_to(REPO))
        for package in PACKAGES
        if package != "pipeline"
        for path in modules(package)
        if any(name.split(".")[0] == "pipeline" for name in imports(path))
    }
    assert not importers, importers
    assert '"pipeline.cli"' in (REPO / "shared" / "cli.py").read_text()


CACHE_MODULE_LINES = 400  # one concern a module: past this, a module of the cache holds more than one
LIGHT_CACHE_MODULES = {  # importing these loads no store: what the config and the registry may import of the cache
    "teacher_service.cache.settings",
    "teacher_service.cache.row_formats",
    "teacher_service.cache.location",
}


def test_no_module_of_the_cache_is_over_its_bound():
    long = {
        str(path.relative_to(REPO)): lines
        for path in sorted((REPO / "teacher_service" / "cache").glob("*.py"))
        if (lines := len(path.read_text().splitlines())) > CACHE_MODULE_LINES
    }
    assert not long, long


@pytest.mark.parametrize(
    "module",
    ["config.py", "registry.py", "cache/settings.py", "cache/row_formats.py", "cache/location.py"],
)
def test_the_config_and_registry_import_only_the_light_modules_of_the_cache(module):
    """The package itself counts as heavy: `from teacher_service.cache import store` loads the store."""
    of_cache = {
        name
        for name in imports(REPO / "teacher_service" / module)
        if name == "teacher_service.cache" or name.startswith("teacher_service.cache.")
    }
    assert of_cache <= LIGHT_CACHE_MODULES, sorted(of_cache - LIGHT_CACHE_MODULES)


def test_the_readme_layout_names_every_module():
    readme = (REPO / "README.md").read_text()
    layout = readme.split("## Layout", 1)[1].split("```")[1]
    lines = {line.split()[0].rstrip("/"): line for line in layout.splitlines() if line and not line.startswith(" ")}
    named = {package: "" for package in ALLOWED}
    current = None
    for line in layout.splitlines():
        if line and not line.startswith(" "):
            current = line.split()[0].rstrip("/")
        if current in named:
            named[current] += " " + line
    missing = [
        f"{package}/{path.relative_to(REPO / package)}"
        for package in ALLOWED
        for path in modules(package)
        if path.name not in ("__init__.py", "__main__.py")
        and not re.search(rf"(?<![\w/]){re.escape(path.relative_to(REPO / package).parts[0])}\b", named[package])
    ]
    assert set(lines) >= set(ALLOWED) and not missing, missing
