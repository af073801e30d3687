"""The demo's output folder: where each run, the service and the records live, and the records themselves.

What a stage measured stays on disk for the report of any later invocation: service/stats.json
(merge_service_stats) and stages.json (add_stage_time), each updated under a lock, atomically.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from pipeline import DemoError
from shared.atomic import replaced_atomically

# in every folder the demo made: --fresh deletes only those
MARKER = ".akd-demo"


@dataclass(frozen=True)
class Layout:
    """Where everything lives inside the demo's output folder."""

    # absolute: subprocesses and generated files must not depend on a working directory
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(os.path.abspath(self.root)))

    def teacher(self, name: str) -> Path:
        return self.root / "teachers" / name

    def student(self, name: str, seed: int) -> Path:
        return self.root / "students" / f"{name}-s{seed}"

    @property
    def service_config(self) -> Path:
        return self.root / "service" / "teachers.toml"

    @property
    def service_log(self) -> Path:
        return self.root / "service" / "service.log"

    @property
    def cache(self) -> Path:
        return self.root / "service" / "cache"

    @property
    def service_stats(self) -> Path:
        return self.root / "service" / "stats.json"

    @property
    def stage_times(self) -> Path:
        return self.root / "stages.json"


def prepare_out(out: Path, fresh: bool) -> None:
    """--fresh empties the folder, but only one this command made (it carries a marker)."""
    if fresh and out.exists() and any(out.iterdir()):
        if not (out / MARKER).exists():
            raise DemoError(
                f"--fresh would delete {out}, which akd demo did not create (no {MARKER} in it); pick another --out"
            )
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).touch()


def update_json(path: Path, change) -> dict:
    """Read-modify-write of a small JSON record, locked and atomic: concurrent stages (compose's trainers) lose no
    update."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        value = change(json.loads(path.read_text()) if path.exists() else {})
        with replaced_atomically(path) as tmp:
            tmp.write_text(json.dumps(value, indent=2))
    return value


def merge_service_stats(old: dict, new: dict, cumulative: bool) -> dict:
    """The service's record after one more students stage: never zeros over figures a re-run did not redo.

    A stage whose service served no rows (a re-run reusing every student) leaves the record as it was. A service the
    demo started itself counts from zero, so its counts add to the record (an interrupted stage plus its resume is the
    whole); an external one (--teacher-url, compose) counts since it started, across trainers, so the higher count
    is the later one and replaces the record.
    """
    if not new.get("rows") or not old:
        return old or new
    if cumulative:
        return new if new["rows"] >= old.get("rows", 0) else old
    summed = {k: old.get(k, 0) + new.get(k, 0) for k in ("rows", "hits", "misses")}
    return {**summed, "largest_batch": max(old.get("largest_batch", 0), new.get("largest_batch", 0))}


def add_stage_time(layout: Layout, stage: str, seconds: float) -> dict:
    """stages.json: each stage's wall time summed over every invocation on this folder (a reused stage adds its
    seconds).

    The report runs in a later invocation than the training more often than not, so the time behind the results has to
    be on disk; summing keeps an interrupted run's work and its resume, and --fresh starts the record over.
    """

    def add(times: dict) -> dict:
        before = times.get(stage, {"seconds": 0.0, "runs": 0})
        return {**times, stage: {"seconds": before["seconds"] + seconds, "runs": before["runs"] + 1}}

    return update_json(layout.stage_times, add)


def read_stage_times(layout: Layout) -> dict[str, dict]:
    return json.loads(layout.stage_times.read_text()) if layout.stage_times.exists() else {}
