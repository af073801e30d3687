"""Reading TOML configs and turning pydantic errors into messages a person can act on.

The service and the trainer both declare their configs as TOML validated by pydantic.
"""

from __future__ import annotations

import argparse
import tomllib
from pathlib import Path
from typing import Annotated, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

# The value types configs share, each meaning one thing everywhere.
Count = Annotated[int, Field(ge=1)]  # how many of something: at least one
Positive = Annotated[float, Field(gt=0, allow_inf_nan=False)]  # a finite amount above zero (seconds, a rate, a weight)
Fraction = Annotated[float, Field(ge=0, le=1)]  # a share of a whole, 0 to 1


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
    path = Path(path)
    try:
        return tomllib.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a folder; expected a TOML file") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None


def validation_error(exc: ValidationError, source: str) -> ConfigError:
    lines = [f"invalid config {source}:"]
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        lines.append(f"  {where}: {err['msg']} (got {err.get('input')!r})")
    return ConfigError("\n".join(lines))


def add_set_argument(parser: argparse.ArgumentParser, help_text: str) -> None:
    """`--set KEY=VALUE` (repeatable, collected in `args.sets`): one config key changed from the command line."""
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE", help=help_text)
