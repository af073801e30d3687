"""Model files from anyone, loaded without running code from them.

A member file is data, but three of its formats can reach Python's unpickler or
`eval` while loading:

- project checkpoints (`.pt`) and RobustBench weights go through `torch.load`;
  the restricted (weights-only) unpickler rebuilds tensors and plain containers only;
- `torch.export` archives (`.pt2`) hold pickled tensors (weights, constants, sample
  inputs), which `torch.export.load` may unpickle with `weights_only=False`, pickled
  "custom" and "opaque" objects, symbolic shape expressions that sympy parses with
  `eval`, graph nodes whose targets resolve to any attribute under `torch`, and
  guard code that `.module()` compiles with `exec`.

So every load runs with torch's own switch that makes each `torch.load` weights-only whatever its call site asks;
a `.pt2` is checked before torch reads it (operator targets must be operators in torch's registry, looked up there by
name, or the symbolic-shape functions torch.export writes; shape expressions plain arithmetic over symbols; no
pickled objects), and its module is built without the stored guard code. A file that fails a check is refused with
`UnsafeFile`, which says what it holds.
"""

from __future__ import annotations

import ast
import functools
import json
import os
import pickle
import re
import threading
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import torch
from torch import nn

FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
FORCE_NO_WEIGHTS_ONLY = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"
_switch_lock = threading.RLock()

# a graph description this large is not an honest export
MAX_JSON_BYTES = 256 << 20
MAX_EXPRESSION_CHARS = 10_000


class UnsafeFile(ValueError):
    """A model file that holds something loading it would execute."""


@contextmanager
def weights_only_unpickling() -> Iterator[None]:
    """Every `torch.load` inside (ours, torch.export's, robustbench's) uses the restricted unpickler.

    Torch reads `TORCH_FORCE_WEIGHTS_ONLY_LOAD` on each call and lets it override an
    explicit `weights_only=False`; the opposite switch is removed for the duration.
    """
    with _switch_lock:
        saved = {name: os.environ.pop(name, None) for name in (FORCE_WEIGHTS_ONLY, FORCE_NO_WEIGHTS_ONLY)}
        os.environ[FORCE_WEIGHTS_ONLY] = "1"
        try:
            yield
        finally:
            os.environ.pop(FORCE_WEIGHTS_ONLY, None)
            os.environ.update({name: value for name, value in saved.items() if value is not None})


def not_a_model_file(path: Path) -> str | None:
    """Why `path` cannot be a model file, or None: a directory or a device (`/dev/zero` never ends) is not one."""
    if not path.exists():
        return "does not exist"
    if path.is_dir():
        return "is a directory, not a weights file"
    if not path.is_file():
        return "is not a regular file (a device, pipe or socket); give the path of a weights file"
    return None


def load_export(path: str | Path) -> nn.Module:
    """A `.pt2` file's module, after `check_export_archive`; raises UnsafeFile or ValueError."""
    # one open file for the check and the load: what was checked is what loads
    with open(path, "rb") as file:
        check_export_archive(file, str(path))
        file.seek(0)
        with weights_only_unpickling():
            try:
                program = torch.export.load(file)
            except Exception as exc:
                # torch raises many types for a bad or refused archive
                if isinstance(exc, pickle.UnpicklingError):
                    raise refused_pickle(path, exc) from exc
                raise ValueError(f"{path} is not a readable torch.export (.pt2) file: {first_line(exc)}") from exc
    # guard code stored in the file is never compiled
    return program.module(check_guards=False)


def check_export_archive(file: IO[bytes], name: str) -> None:
    """Refuse archives whose loading would run code; see the module docstring for what is checked."""
    try:
        archive = zipfile.ZipFile(file)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ValueError(f"{name} is not a readable torch.export (.pt2) file: {exc}") from exc
    with archive:
        for entry in archive.infolist():
            _check_entry_name(entry.filename, name)
            if entry.filename.endswith(".json"):
                if entry.file_size > MAX_JSON_BYTES:
                    raise UnsafeFile(
                        f"{name}: {entry.filename} is {entry.file_size} bytes, more than an export's graph "
                        f"({MAX_JSON_BYTES})"
                    )
                try:
                    document = json.loads(archive.read(entry))
                except (ValueError, zipfile.BadZipFile, OSError) as exc:
                    raise ValueError(f"{name}: {entry.filename} is not valid JSON: {exc}") from exc
                _check_document(document, f"{name}: {entry.filename}")


def _check_entry_name(entry: str, name: str) -> None:
    from torch.export.pt2_archive.constants import CUSTOM_OBJ_FILENAME_PREFIX, OPAQUE_OBJ_FILENAME_PREFIX

    leaf = entry.rsplit("/", 1)[-1]
    if leaf.startswith((CUSTOM_OBJ_FILENAME_PREFIX, OPAQUE_OBJ_FILENAME_PREFIX)):
        raise UnsafeFile(f"{name} holds a pickled Python object ({entry}); only tensors are accepted in a served model")


def _check_document(node: Any, where: str) -> None:
    """Walk a JSON document: node targets, operator arguments, shape expressions, payload files."""
    from torch.export.pt2_archive.constants import CUSTOM_OBJ_FILENAME_PREFIX, OPAQUE_OBJ_FILENAME_PREFIX

    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            for key, value in item.items():
                if isinstance(value, str):
                    if key in ("target", "as_operator"):
                        _check_operator(value, where)
                    elif key == "expr_str":
                        check_shape_expression(value, where)
                    elif key == "path_name" and value.startswith(
                        (CUSTOM_OBJ_FILENAME_PREFIX, OPAQUE_OBJ_FILENAME_PREFIX)
                    ):
                        raise UnsafeFile(f"{where} names a pickled Python object ({value}); only tensors are accepted")
                else:
                    stack.append(value)


@functools.cache
def _sym_op_targets() -> frozenset[str]:
    """The symbolic-shape functions a graph may call (`_operator.mul`, `torch.sym_max`, `math.trunc`, ...), named as
    torch.export's serializer writes them (module, then name). It writes no other Python function: `getitem` on a
    node's outputs is folded into the node that makes them and never appears as a target."""
    from torch._export.serde.serialize import _SYM_OPS

    return frozenset(f"{op.__module__}.{op.__name__}" for op in _SYM_OPS)


_OPERATOR_TYPES = (torch._ops.OpOverload, torch._ops.OpOverloadPacket, torch._ops.HigherOrderOperator)


def _check_operator(target: str, where: str) -> None:
    """A node may call an operator in torch's registry or one of the symbolic-shape functions; nothing else.

    Operators are `torch.ops.<namespace>.<name>.<overload>` (or the overload packet without `.<overload>`), and
    higher-order operators `torch.ops.higher_order.<name>`. The name is looked up in the registries themselves
    (torch's dispatcher, torch's table of higher-order operators), and resolved through `torch.ops` only once they
    hold it: nothing the file names is imported, called, or looked up on any other object, so underscore names
    (`aten._to_copy`) pass like any registered operator, and a name that is not registered is refused.
    """
    if target in _sym_op_targets():
        return
    parts = target.split(".")
    if parts[:2] != ["torch", "ops"] or len(parts) not in (4, 5) or not all(p.isidentifier() for p in parts[2:]):
        raise UnsafeFile(
            f"{where}: graph node target {target!r} is not a torch operator: expected "
            "torch.ops.<namespace>.<name>.<overload> or one of the symbolic-shape functions torch.export writes; "
            "refused"
        )
    if not _registered_operator(*parts[2:]):
        raise UnsafeFile(
            f"{where}: graph node target {target!r} is not an operator registered with torch "
            f"(no {parts[2]}::{'.'.join(parts[3:])} in its operator registry); refused"
        )


def _registered_operator(namespace: str, name: str, overload: str | None = None) -> bool:
    """Whether torch's registries hold this operator, and `torch.ops` (what the loader resolves) gives an operator.

    The registry is asked first, so that a made-up namespace never gets a `torch.ops` namespace object made for it.
    """
    if namespace == "higher_order":
        found = overload is None and name in torch._ops._higher_order_ops
    else:
        schemas = torch._C._jit_get_schemas_for_operator(f"{namespace}::{name}")
        found = bool(schemas) if overload is None else overload in {s.overload_name or "default" for s in schemas}
    if not found:
        return False
    resolved: Any = torch.ops
    for attr in (namespace, name, overload) if overload else (namespace, name):
        resolved = getattr(resolved, attr, None)
    return isinstance(resolved, _OPERATOR_TYPES)


# sympy names a torch.export shape expression uses: its symbolic-int functions and core sympy types.
_SYMPY_NAMES = frozenset(
    {
        "Symbol",
        "Integer",
        "Float",
        "Rational",
        "Max",
        "Min",
        "Abs",
        "floor",
        "ceiling",
        "sqrt",
        "Pow",
        "Mul",
        "Add",
        "Eq",
        "Ne",
        "Lt",
        "Le",
        "Gt",
        "Ge",
        "And",
        "Or",
        "Not",
        "Piecewise",
        "ITE",
        "oo",
        "zoo",
        "nan",
        "true",
        "false",
        "True",
        "False",
        "FloorDiv",
        "ModularIndexing",
        "Where",
        "PythonMod",
        "Mod",
        "CleanDiv",
        "CeilToInt",
        "FloorToInt",
        "CeilDiv",
        "IntTrueDiv",
        "FloatTrueDiv",
        "LShift",
        "RShift",
        "IsNonOverlappingAndDenseIndicator",
        "TruncToFloat",
        "TruncToInt",
        "RoundToInt",
        "RoundDecimal",
        "ToFloat",
        "FloatPow",
        "PowByNatural",
        "Identity",
        "OpaqueUnaryFn_sqrt",
    }
)
# s0, u3, s77: the names torch gives shape symbols
_SYMBOL = re.compile(r"[a-z]+\d+")
_EXPRESSION_NODES = (
    ast.Expression,
    ast.Call,
    ast.Name,
    ast.Load,
    ast.Constant,
    ast.keyword,
    ast.Tuple,
    ast.BinOp,
    ast.UnaryOp,
    ast.Compare,
    ast.BoolOp,
    ast.operator,
    ast.unaryop,
    ast.cmpop,
    ast.boolop,
)


def check_shape_expression(text: str, where: str = "shape expression") -> None:
    """sympy parses these strings with `eval`: allow only calls of known sympy names on numbers and symbols."""
    if len(text) > MAX_EXPRESSION_CHARS:
        raise UnsafeFile(f"{where}: a shape expression of {len(text)} characters; at most {MAX_EXPRESSION_CHARS}")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        raise UnsafeFile(f"{where}: shape expression {text[:80]!r} is not plain arithmetic") from None
    for node in ast.walk(tree):
        if not isinstance(node, _EXPRESSION_NODES):
            raise UnsafeFile(f"{where}: shape expression {text[:80]!r} contains {type(node).__name__}; refused")
        if isinstance(node, ast.Call) and not (isinstance(node.func, ast.Name) and node.func.id in _SYMPY_NAMES):
            raise UnsafeFile(
                f"{where}: shape expression {text[:80]!r} calls something other than a sympy function; refused"
            )
        if isinstance(node, ast.Name) and node.id not in _SYMPY_NAMES and not _SYMBOL.fullmatch(node.id):
            raise UnsafeFile(f"{where}: shape expression {text[:80]!r} names {node.id!r}; refused")
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and not _SYMBOL.fullmatch(node.value):
            raise UnsafeFile(f"{where}: shape expression {text[:80]!r} holds the string {node.value!r}; refused")
        if isinstance(node, ast.keyword) and (node.arg is None or not node.arg.isalpha()):
            raise UnsafeFile(
                f"{where}: shape expression {text[:80]!r} has a keyword argument that is not a sympy assumption"
            )


def refused_pickle(path: str | Path, exc: BaseException) -> UnsafeFile:
    """The error for a file the weights-only unpickler turned away."""
    return UnsafeFile(f"{path} holds pickled Python objects, not only tensors, and was refused: {first_line(exc)}")


def first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
