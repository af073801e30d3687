"""The project speaks of itself: no tracked text or path tells how the work on it was organised.

Records of runs name their machine, date and commit; nothing names a working session, an issue's number or section,
a lent or borrowed machine, or a target set by someone else ("the issue's 1.8x"). Every git-tracked file's path, and
every line of every tracked text file (binary files skipped), is checked against those patterns; a hit fails naming
file:line. The few technical uses of the words are allowed by name below (POSIX sessions: `start_new_session`).
Cheap: one `git ls-files` and about 9 MB read, under a second.
"""

from __future__ import annotations

import re
import subprocess

import pytest
from conftest import REPO

FORBIDDEN = re.compile(
    r"session|\bissue\s*(?:#|no\.?\s*)?\d|\bissue's\b|\blent\b|\bborrowed\b|\bon loan\b|these machines|§", re.I
)
# A technical use of a forbidden word, and the files it may appear in (None: anywhere). Each is removed from a line
# before the line is checked.
TECHNICAL = {
    # subprocess.Popen's argument: the child gets a POSIX session (setsid) of its own
    "start_new_session": None,
    # the demo's service child: setsid, then a parent-death signal
    "_own_session_ending_with_parent": {"pipeline/demo.py"},
    "its own session": {"pipeline/demo.py", "bench/servers.py"},
    "sessions of their own": {"tests/e2e/test_ddp.py"},
}
THIS_FILE = "tests/unit/test_project_text.py"


def tracked() -> list[str]:
    try:
        done = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the tracked files cannot be listed")
    return [path for path in done.stdout.split("\0") if path]


def text_of(path: str) -> str | None:
    """The file's text, or None for a binary file (a NUL byte, or not UTF-8) or one that is gone."""
    try:
        data = (REPO / path).read_bytes()
    except (FileNotFoundError, IsADirectoryError):
        return None
    if b"\0" in data:
        return None
    try:
        return data.decode()
    except UnicodeDecodeError:
        return None


def without_technical_uses(line: str, path: str) -> str:
    for phrase, files in TECHNICAL.items():
        if files is None or path in files:
            line = re.sub(re.escape(phrase), "", line, flags=re.I)
    return line


def test_no_tracked_path_names_how_the_work_was_organised():
    hits = [path for path in tracked() if FORBIDDEN.search(path)]
    assert not hits, hits


def test_no_tracked_text_names_how_the_work_was_organised():
    hits = []
    for path in tracked():
        text = None if path == THIS_FILE else text_of(path)
        for number, line in enumerate((text or "").splitlines(), 1):
            found = FORBIDDEN.search(without_technical_uses(line, path))
            if found:
                hits.append(f"{path}:{number}: {found.group(0)!r} in {line.strip()[:100]}")
    assert not hits, "\n".join(hits)
