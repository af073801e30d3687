"""What GET /teachers says, read without pydantic: the teachers served (TeacherInfo) and the features offered.

The service writes the listing with shared.protocol's models; this reads the same JSON into frozen dataclasses of
the same fields, checking each field's type as it goes (a listing is as hostile as any answer), so that a client
needs no more than the standard library to know its teacher. Fields it does not know are ignored, as the models do.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from shared.client.errors import BadAnswer, one_line
from shared.wire import Aggregate


@dataclass(frozen=True)
class MemberInfo:
    """One member of a teacher: where its weights come from, its weight in the ensemble, its version (the hash of its
    weights file: the cache's namespace)."""

    source: str
    path: str
    weight: float
    version: str
    arch: str | None = None
    metadata: dict = field(default_factory=dict)


@dataclass(frozen=True)
class TeacherInfo:
    """A served teacher: classes, input shape (C, H, W), how its members' outputs are combined, its own
    temperature (used where a request names none), its members. Two replicas serve the same teacher when these are
    equal."""

    name: str
    num_classes: int
    input_shape: tuple[int, int, int]
    aggregate: Aggregate
    temperature: float
    members: tuple[MemberInfo, ...]


class _Malformed(ValueError):
    """A listing field of the wrong type: where, and what was expected."""


def parse_listing(content: bytes) -> tuple[list[TeacherInfo], list[str]]:
    """The teachers and features of a /teachers answer, or BadAnswer saying why it does not parse."""
    try:
        listing = _of(json.loads(content), dict, "the listing")
        teachers = [_teacher(item, i) for i, item in enumerate(_of(listing.get("teachers"), list, "teachers"))]
        features = [_of(name, str, "features") for name in _of(listing.get("features", []), list, "features")]
    except (ValueError, RecursionError) as exc:
        # json's errors (JSONDecodeError, UnicodeDecodeError) are ValueErrors, as _Malformed is
        raise BadAnswer(f"a teacher list that does not parse: {one_line(exc)}") from None
    return teachers, features


def _teacher(item: Any, i: int) -> TeacherInfo:
    where = f"teachers[{i}]"
    table = _of(item, dict, where)
    shape = _of(table.get("input_shape"), list, f"{where}.input_shape")
    if len(shape) != 3:
        raise _Malformed(f"{where}.input_shape: {len(shape)} numbers (expected 3: C, H, W)")
    members = _of(table.get("members"), list, f"{where}.members")
    try:
        aggregate = Aggregate(table.get("aggregate"))
    except ValueError:
        raise _Malformed(f"{where}.aggregate: {table.get('aggregate')!r} (expected one of probs, logits)") from None
    return TeacherInfo(
        name=_of(table.get("name"), str, f"{where}.name"),
        num_classes=_of(table.get("num_classes"), int, f"{where}.num_classes"),
        input_shape=tuple(_of(d, int, f"{where}.input_shape") for d in shape),
        aggregate=aggregate,
        temperature=_number(table.get("temperature"), f"{where}.temperature"),
        members=tuple(_member(member, f"{where}.members[{j}]") for j, member in enumerate(members)),
    )


def _member(item: Any, where: str) -> MemberInfo:
    table = _of(item, dict, where)
    arch = table.get("arch")
    return MemberInfo(
        source=_of(table.get("source"), str, f"{where}.source"),
        path=_of(table.get("path"), str, f"{where}.path"),
        weight=_number(table.get("weight"), f"{where}.weight"),
        version=_of(table.get("version"), str, f"{where}.version"),
        arch=None if arch is None else _of(arch, str, f"{where}.arch"),
        metadata=_of(table.get("metadata", {}), dict, f"{where}.metadata"),
    )


_KINDS = {dict: "an object", list: "a list", str: "a string", int: "a whole number"}


def _of(value: Any, kind: type, where: str) -> Any:
    """`value` when it is a `kind` (a bool is no number), else _Malformed."""
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise _Malformed(f"{where}: {one_line(repr(value), 80)} (expected {_KINDS[kind]})")
    return value


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Malformed(f"{where}: {one_line(repr(value), 80)} (expected a number)")
    return float(value)
