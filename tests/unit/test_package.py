"""What a user expects of the package itself: `akd --version` names it and its version, the one the package's
metadata holds, and its licence is there."""

from __future__ import annotations

import tomllib
from importlib import metadata

import pytest
from conftest import REPO

from akd import cli
from shared.version import VERSION

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def test_version_prints_the_name_and_the_version_the_package_declares(capsys, monkeypatch):
    # the malloc settings are a whole process's: not this test process's
    monkeypatch.setattr(cli, "keep_freed_memory_at_start", lambda prog: 0)
    with pytest.raises(SystemExit) as done:
        cli.main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out == f"akd {VERSION}\n"
    # pyproject.toml takes it from shared/version.py, so the installed metadata says the same
    assert "version" in PYPROJECT["project"]["dynamic"] and "version" not in PYPROJECT["project"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "shared.version.VERSION"}
    assert metadata.version("akd") == VERSION


def test_the_licence_is_the_mit_licence_pyproject_declares():
    text = (REPO / "LICENSE").read_text()
    assert PYPROJECT["project"]["license"] == "MIT"
    assert text.startswith("MIT License\n\nCopyright (c) 2026 the akd authors\n")
    assert "Permission is hereby granted, free of charge" in text and 'THE SOFTWARE IS PROVIDED "AS IS"' in text
