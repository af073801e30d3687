"""The layout is the architecture: packages import one way, and the layout in docs/architecture.md names every module.

  shared            imports no other package of the project (both sides agree on it; it depends on neither), and
                    names none by string either: no importlib in it
  teacher_service   imports shared only
  student_trainer   imports shared, and of the service only its one in-process entry (teacher_service.local)
  pipeline          orchestrates both sides; nothing imports it but bench (and the `akd` entry point, by name)
  bench             measures both sides, and may use the pipeline's (its service start-up, its machine record);
                    nothing imports it (but the `akd` entry point, by name)
  akd               the entry point, above every package: it may name any of them; nothing imports it but the
                    `__main__` modules, each the same three lines
and no two modules import each other, however indirectly: each can be read, and loaded, before those that import it.
Every import counts, those inside functions and under `if TYPE_CHECKING:` too.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
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
# The packages the layout names module by module (bench's line names its parts and "one module per benchmark").
LAID_OUT = ("akd", "shared", "teacher_service", "student_trainer", "pipeline")
# What a `__main__.py` holds besides its docstring: `python -m <package>` is `akd` with that package's commands.
MAIN_SHAPE = ("Import(names=[alias(name='sys')])", "ImportFrom(module='akd.cli', names=[alias(name='main')], level=0)")


def modules(package: str) -> list[Path]:
    return sorted((REPO / package).rglob("*.py"))


def _from_module(node: ast.ImportFrom, package: str) -> str:
    """The module a `from ... import` reads from, relative imports resolved against `package` (the file's folder)."""
    base = node.module or ""
    # relative: the package `level - 1` folders up, then the module named
    if node.level:
        parts = package.split(".")
        base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
    return base


def imports(path: Path) -> set[str]:
    """Every project module `path` imports, anywhere in it (relative imports resolved)."""
    package = ".".join(path.relative_to(REPO).parent.parts)
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            found.add(_from_module(node, package))
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
            # the docstring
            body = body[1:]
        assert len(body) == 3 and tuple(ast.dump(node) for node in body[:2]) == MAIN_SHAPE, path
        call = body[2].value if isinstance(body[2], ast.Expr) else None
        assert isinstance(call, ast.Call) and ast.unparse(call.func) == "sys.exit" and len(call.args) == 1, path
        assert isinstance(call.args[0], ast.Call) and ast.unparse(call.args[0].func) == "main", path


# One idea a module: past these, a module holds more than one (the cache's modules are one concern each).
MODULE_LINES = 600
CACHE_MODULE_LINES = 400
# importing these loads no store: what the config and the registry may import of the cache
LIGHT_CACHE_MODULES = {
    "teacher_service.cache.settings",
    "teacher_service.cache.row_formats",
    "teacher_service.cache.location",
}


def python_files(*folders: str) -> list[Path]:
    """Every Python file of the project's packages and of `folders`, but the kept measurement scripts (records)."""
    return [
        path
        for folder in (*PACKAGES, *folders)
        for path in sorted((REPO / folder).rglob("*.py"))
        if "measurement-scripts" not in path.parts
    ]


def test_no_module_is_over_its_bound():
    long = {
        str(path.relative_to(REPO)): lines
        for path in python_files("scripts")
        if (lines := len(path.read_text().splitlines())) > MODULE_LINES
    }
    assert not long, long


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


def test_the_layout_names_every_module():
    page = (REPO / "docs" / "architecture.md").read_text()
    layout = page.split("## Layout", 1)[1].split("```")[1]
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


def module_name(path: Path) -> str | None:
    """`a/b/c.py` -> "a.b.c", `a/b/__init__.py` -> "a.b"; None for a file no import can name (a folder like
    bench/measurement-scripts/ holds scripts run by path)."""
    parts = path.relative_to(REPO).with_suffix("").parts
    parts = parts[:-1] if parts[-1] == "__init__" else parts
    return ".".join(parts) if all(part.isidentifier() for part in parts) else None


def module_graph() -> dict[str, set[str]]:
    """Each project module -> the project modules it imports. `from a import b` imports the module a.b where there is
    one, else a; a name reaching below any module (a function, a class) counts as its module."""
    files = {name: path for package in PACKAGES for path in modules(package) if (name := module_name(path))}
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        named = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                named.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = _from_module(node, package)
                named.update(f"{base}.{alias.name}" for alias in node.names)
        graph[name] = {module for dotted in named if (module := _longest_module(dotted, files)) not in (None, name)}
    return graph


def _longest_module(dotted: str, files: dict[str, Path]) -> str | None:
    while dotted and dotted not in files:
        dotted = dotted.rpartition(".")[0]
    return dotted or None


def import_cycles(graph: dict[str, set[str]]) -> set[frozenset[str]]:
    """The modules that import one another, directly or through others, each group once (a strongly connected
    component of more than one module)."""
    reach = {}
    for start in graph:
        seen, todo = set(), [start]
        while todo:
            for module in graph[todo.pop()] - seen:
                seen.add(module)
                todo.append(module)
        reach[start] = seen
    return {frozenset(other for other in reach[m] if m in reach[other]) for m in graph if m in reach[m]}


def test_no_import_cycles_between_modules():
    cycles = import_cycles(module_graph())
    assert not cycles, sorted(sorted(cycle) for cycle in cycles)


def test_the_cycle_check_sees_type_checking_imports_and_submodules():
    """The scan must count what a cycle is usually made of: an import kept for type hints, and a module imported from
    its package by name."""
    graph = module_graph()
    # under `if TYPE_CHECKING:`
    assert "student_trainer.config" in graph["student_trainer.losses"]
    # `from bench import sharing`
    assert "bench.sharing" in graph["bench.peer"]
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == {frozenset("abc")}


PRAGMAS = ("# noqa", "# type:", "# pragma", "# fmt:")


def trailing_comments(path: Path) -> list[str]:
    """`path:line` of every comment that follows code on its line (a tool's pragma may)."""
    source = path.read_text()
    lines = source.splitlines()
    return [
        f"{path.relative_to(REPO)}:{token.start[0]}"
        for token in tokenize.generate_tokens(io.StringIO(source).readline)
        if token.type == tokenize.COMMENT
        and lines[token.start[0] - 1][: token.start[1]].strip()
        and not token.string.startswith(PRAGMAS)
    ]


def test_comments_stand_above_the_line_they_explain():
    """A comment trailing its code makes the formatter wrap the code around it, and is lost when the line moves."""
    found = [where for path in python_files("tests", "scripts") for where in trailing_comments(path)]
    assert not found, found[:20]
