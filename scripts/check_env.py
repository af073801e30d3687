"""Fail fast when this environment is not the one the suite was run with.

Usage: python scripts/check_env.py TORCH_SPEC [LOCK]

TORCH_SPEC is what the Makefile installs for torch (`torch==2.13.0`, a spec with pip options after it, or a
wheel's path or URL); LOCK defaults to requirements.lock beside this folder. Exits 1, naming every difference,
when the installed torch is not the spec's or an installed package's version is not the lock's; a package the
lock pins but the environment lacks is not a difference (the lock covers every extra; an install takes some).
"""

from __future__ import annotations

import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

LOCK = Path(__file__).resolve().parent.parent / "requirements.lock"


def locked_versions(lock: Path) -> dict[str, str]:
    """The lock's `name==version` lines, by canonical name."""
    pins = {}
    for line in lock.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version.strip()
    return pins


def torch_difference(spec: str) -> str | None:
    """Why the installed torch is not what `spec` asks for, or None."""
    try:
        installed = metadata.version("torch")
    except metadata.PackageNotFoundError:
        return f"torch is not installed; expected {spec}"
    first = spec.split()[0]
    if first.endswith(".whl"):
        wanted = str(parse_wheel_filename(first.rsplit("/", 1)[-1])[1])
        return None if installed == wanted else f"torch {installed} is installed; expected {wanted} ({first})"
    try:
        requirement = Requirement(first)
    except InvalidRequirement:
        # a form this check cannot read (a VCS URL, say): pip decided it
        return None
    if requirement.specifier.contains(installed, prereleases=True):
        return None
    return f"torch {installed} is installed; expected {requirement}"


def lock_differences(lock: Path) -> list[str]:
    """Each installed package whose version is not the lock's."""
    pins = locked_versions(lock)
    found = []
    for dist in metadata.distributions():
        name = canonicalize_name(dist.metadata["Name"])
        if name in pins and dist.version != pins[name]:
            found.append(f"{dist.metadata['Name']} {dist.version} is installed; {lock.name} pins {pins[name]}")
    return sorted(found)


def main(argv: list[str]) -> int:
    if not 1 <= len(argv) <= 2:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    lock = Path(argv[1]) if len(argv) == 2 else LOCK
    problems = [p for p in [torch_difference(argv[0]), *lock_differences(lock)] if p]
    if problems:
        print("This environment is not the one the suite was run with:", file=sys.stderr)
        for problem in problems:
            print(f"  {problem}", file=sys.stderr)
        print("Rebuild it: rm -rf .venv && make test (or make lock, where pyproject.toml changed)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
