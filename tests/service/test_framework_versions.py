"""The frameworks whose internals teacher_service/framework.py relies on are the versions it was tested with.

`framework.TESTED_VERSIONS` is where those versions are written; pyproject.toml pins each package to its minor
version, and the installed one must be it: another may have changed what the direct route and the guarded protocol
rely on, so the suite says so by name rather than through some later test's odd failure.
"""

from __future__ import annotations

import logging
import tomllib
from importlib.metadata import version

from conftest import REPO, live_server, mnist_teacher, save_member, write_config
from packaging.requirements import Requirement
from packaging.version import Version

from teacher_service import framework


def test_the_installed_frameworks_are_the_tested_ones():
    untested = framework.untested_versions()
    assert not untested, "\n".join(untested)


def test_pyproject_pins_each_framework_to_its_tested_minor_version():
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = {r.name: r.specifier for r in map(Requirement, dependencies)}
    for package, tested in framework.TESTED_VERSIONS.items():
        major, minor = map(int, tested.split("."))
        wanted = f">={major}.{minor},<{major}.{minor + 1}"
        assert package in pins, f"pyproject.toml does not pin {package}; tested with {tested}.x"
        assert pins[package] == Requirement(f"{package}{wanted}").specifier, (
            f"pyproject.toml has {package}{pins[package]}; tested with {tested}.x, so {package}{wanted}"
        )


def test_an_untested_framework_is_named_with_both_versions_and_warned_of_at_start_up(tmp_path, monkeypatch, caplog):
    installed = version("uvicorn")
    other = Version(installed)
    untested = f"{other.major}.{other.minor + 1}"
    monkeypatch.setitem(framework.TESTED_VERSIONS, "uvicorn", untested)
    expected = f"uvicorn {installed} is installed, but teacher_service/framework.py is tested with uvicorn {untested}.x"
    assert framework.untested_versions() == [expected]
    teachers = {"solo": mnist_teacher([(save_member(tmp_path / "a.pt", seed=1), 1.0)])}
    config = write_config(tmp_path / "teachers.toml", teachers, server={"device": "cpu"})
    with caplog.at_level(logging.WARNING, logger="akd.service"), live_server(config):
        # started: the warning is in, and the service serves
        pass
    warnings = [r.getMessage() for r in caplog.records if r.name == "akd.service"]
    assert warnings == [f"{expected}; the service relies on its internals, which may have changed"]
