"""Reading TOML configs and turning pydantic errors into messages a person can act on.

The service and the trainer both declare their configs as TOML validated by pydantic. Every config file any
subcommand reads is read here, as a regular file of bounded size (read_config_bytes), and the value types and checks
the configs share (a count, a bearer token, a folder to write into) are declared here once, with the generic table
work on raw configs: `--set key=value` on top of a file, paths made absolute, tables merged.
"""

from __future__ import annotations

import argparse
import os
import stat
import tomllib
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import Annotated, Any, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

# The value types configs share, each meaning one thing everywhere.

# how many of something: at least one
Count = Annotated[int, Field(ge=1)]
# a finite amount above zero (seconds, a rate, a weight)
Positive = Annotated[float, Field(gt=0, allow_inf_nan=False)]
# a share of a whole, 0 to 1
Fraction = Annotated[float, Field(ge=0, le=1)]

# a config file is a page of settings; past this it is not one (or never ends: /dev/zero)
MAX_CONFIG_BYTES = 1 << 20
# their values are never echoed in an error message
SECRET_FIELDS = frozenset({"token"})


def bearer_token(value: str) -> str:
    """A bearer token as HTTP carries it unchanged: visible ASCII only (RFC 9110 VCHAR), at least one character.

    A header value is Latin-1 bytes with its surrounding spaces stripped, so an empty token would refuse every
    request (and a client given one sends no header at all), and a space, control or non-ASCII character would
    match, if ever, only as bytes the sender did not mean to send.
    """
    if not value.strip():
        raise ValueError("the token is empty; leave `token` out for no token, or give a secret")
    for i, char in enumerate(value):
        if not "!" <= char <= "~":
            raise ValueError(
                f"the token has {_char_kind(char)} at position {i}; expected visible ASCII characters only "
                "(! to ~), as an HTTP header carries them unchanged"
            )
    return value


def _char_kind(char: str) -> str:
    if char.isspace():
        return "a space"
    return "a non-ASCII character" if ord(char) > 127 else "a control character"


# both sides of `Authorization: Bearer <token>`
BearerToken = Annotated[str, AfterValidator(bearer_token)]


class ConfigError(ValueError):
    """A config that cannot be used, with every problem spelled out."""


class StrictConfig(BaseModel):
    """The base of every config table: a misspelt key is an error, never a silently ignored setting."""

    model_config = ConfigDict(extra="forbid")


Model = TypeVar("Model", bound=BaseModel)


def validated(model: type[Model], raw: dict, source: str) -> Model:
    """`raw` as a `model`, or a ConfigError naming `source` and every problem in it."""
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise validation_error(exc, source) from None


def read_toml(path: str | Path) -> dict:
    """A TOML config file (read_config_bytes' rules), parsed; any problem is a ConfigError naming the file."""
    path = Path(path)
    try:
        return tomllib.loads(read_config_bytes(path).decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None


def read_config_bytes(path: str | Path, limit: int = MAX_CONFIG_BYTES) -> bytes:
    """The bytes of a config file: a regular file of at most `limit` bytes, else a ConfigError saying what it is.

    Every config every subcommand reads comes through here. The file is opened without blocking (a FIFO would
    otherwise wait for a writer forever) and checked on the open descriptor (no window between check and read), and
    at most `limit` + 1 bytes are ever read, whatever the size the file claims.
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be opened: {exc.strerror}") from None
    try:
        _check_regular(path, os.fstat(fd), limit)
    except ConfigError:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb") as file:
        data = file.read(limit + 1)
    if len(data) > limit:
        raise ConfigError(f"config file {path} is over {limit:,} bytes; a config file may hold at most that")
    return data


def _check_regular(path: Path, st: os.stat_result, limit: int) -> None:
    if stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"config file {path} is a folder; expected a TOML file")
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"config file {path} is {_file_kind(st.st_mode)}; expected a regular TOML file")
    if st.st_size > limit:
        raise ConfigError(
            f"config file {path} holds {st.st_size:,} bytes; a config file may hold at most {limit:,} bytes"
        )


def _file_kind(mode: int) -> str:
    kinds = [
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ]
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def existing_folder_or_new(path: str | Path, what: str) -> Path:
    """`path` as a folder to write into: one that exists, or one that can be made (its nearest existing ancestor is a
    folder). Else a ConfigError naming `what`, before any work is done that would then have nowhere to go."""
    path = Path(path)
    for ancestor in (path, *path.parents):
        if ancestor.is_dir():
            return path
        if ancestor.exists() or ancestor.is_symlink():
            where = "is" if ancestor == path else f"cannot be made: {ancestor} is"
            raise ConfigError(f"{what} {path} {where} {_kind_of(ancestor)}; expected a folder")
    return path


def _kind_of(path: Path) -> str:
    if path.is_symlink() and not path.exists():
        return "a broken symbolic link"
    mode = path.stat().st_mode
    return "a file" if stat.S_ISREG(mode) else _file_kind(mode)


def validation_error(exc: ValidationError, source: str) -> ConfigError:
    """Every problem of a config, each as `field: what is wrong (got value)`: one line when it is one problem."""
    problems = [_problem(err) for err in exc.errors()]
    if len(problems) == 1:
        return ConfigError(f"invalid config {source}: {problems[0]}")
    return ConfigError("\n".join([f"invalid config {source}:", *(f"  {problem}" for problem in problems)]))


def _problem(err: dict) -> str:
    where = ".".join(str(p) for p in err["loc"]) or "(top level)"
    got = "value not shown" if SECRET_FIELDS & set(map(str, err["loc"])) else f"got {err.get('input')!r}"
    return f"{where}: {err['msg'].removeprefix('Value error, ')} ({got})"


def add_set_argument(parser: argparse.ArgumentParser, help_text: str) -> None:
    """`--set KEY=VALUE` (repeatable, collected in `args.sets`): one config key changed from the command line."""
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE", help=help_text)


def parse_set(assignment: str) -> tuple[list[str], Any]:
    """`attack.steps=3` -> (["attack", "steps"], 3); values are TOML, or a bare string."""
    key, sep, text = assignment.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects key=value (e.g. attack.steps=3), got {assignment!r}")
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text
    return key.strip().split("."), value


def apply_sets(raw: dict, assignments: list[str], base: Path, path_keys: Collection[str] = ()) -> dict:
    """Each `--set key=value` written into `raw` (sub-tables made as needed). A string value of a key whose last part
    is in `path_keys` is a path given on the command line: made absolute against `base` (the working directory)."""
    for assignment in assignments:
        path, value = parse_set(assignment)
        if path[-1] in path_keys and isinstance(value, str):
            value = str(absolute_path(Path(value), base))
        node = raw
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {assignment}: {part!r} is not a table")
        node[path[-1]] = value
    return raw


def absolute_path(path: Path, base: Path) -> Path:
    """`path`, relative ones against `base`, normalised (no `..`) but not resolved (symbolic links stay)."""
    return Path(os.path.normpath(path if path.is_absolute() else base / path))


def resolve_file_paths(raw: dict, base: Path, keys: Iterable[str]) -> dict:
    """The path fields of one raw table (`keys`, dotted: `teacher.config`), made absolute against `base` (the folder
    of the file they came from); a key not there, or not a string, is left as it is."""
    for key in keys:
        *tables, leaf = key.split(".")
        node = raw
        for table in tables:
            node = node.get(table) if isinstance(node, dict) else None
        if isinstance(node, dict) and isinstance(node.get(leaf), str):
            node[leaf] = str(absolute_path(Path(node[leaf]), base))
    return raw


def merged(base: dict, top: dict) -> dict:
    """Two raw tables as one, `top` over `base`: sub-tables present in both merge, any other value of `top` wins.
    Neither is changed."""
    out = dict(base)
    for key, value in top.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out
