"""The demo's output folder: where each run, the service and the records live, and the records themselves.

What a stage measured stays on disk for the report of any later invocation: service/stats.json
(merge_service_stats) and stages.json (add_stage_time), each updated under a lock, atomically.

The folder's marker records the plan that made it (PlanRecord): a re-run reuses finished runs by their names, so a
run of another plan of the same name (more epochs, another attack) would be taken for this plan's; `prepare_out`
refuses that before any work, unless told to start over (--fresh) or to go on anyway (--force).
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

# in every folder the demo made: --fresh deletes only those. It holds the PlanRecord of the plan that made it
# (empty where an older akd made it).
MARKER = ".akd-demo"


@dataclass(frozen=True)
class PlanRecord:
    """Which plan made an output folder: its name as given (a built-in plan, a file, its --set) and its fingerprint
    (Plan.fingerprint), which alone decides whether two plans are the same."""

    name: str
    sha256: str

    def __str__(self) -> str:
        return f"plan {self.name} (sha256 {self.sha256[:12]})"


def read_plan_record(out: Path) -> PlanRecord | None:
    """The plan recorded in `out`'s marker; None where there is none (no marker, or an older akd's empty one)."""
    try:
        raw = json.loads((out / MARKER).read_text())
        return PlanRecord(str(raw["plan"]), str(raw["sha256"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


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


def prepare_out(out: Path, fresh: bool, plan: PlanRecord, force: bool = False) -> None:
    """Make `out` ready for `plan`, before any work. --fresh empties it (only a folder akd demo made: it carries the
    marker), saying so. A folder another plan made is refused, in one line that says the ways on, unless `force`,
    which uses it and keeps its record: it stays the folder of the plan that made it, which re-runs without --force.
    A folder without a record (new, or an older akd's) records `plan`."""
    made_by = read_plan_record(out)
    if fresh and out.exists() and any(out.iterdir()):
        if not (out / MARKER).exists():
            raise DemoError(
                f"--fresh would delete {out}, which akd demo did not create (no {MARKER} in it); pick another --out"
            )
        print(f"akd demo: --fresh: removing {out} (made by {made_by or 'an older akd demo'})", flush=True)
        shutil.rmtree(out)
        made_by = None
    elif made_by is not None and made_by.sha256 != plan.sha256:
        if not force:
            raise DemoError(
                f"{out} was made by {made_by}, not {plan}: --fresh starts over (removes its runs), --force uses it "
                "anyway (finished runs of the same name are reused as they are), or pick another --out"
            )
        print(f"akd demo: --force: using {out}, made by {made_by}, for {plan}", flush=True)
    try:
        out.mkdir(parents=True, exist_ok=True)
        if made_by is None:
            # locked: stages started at once (compose's trainers) write it through the one temp file
            with open(out / f"{MARKER}.lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                with replaced_atomically(out / MARKER) as tmp:
                    tmp.write_text(json.dumps({"plan": plan.name, "sha256": plan.sha256}))
    except PermissionError as exc:
        # a container's user that is not the bind mount's owner, most often (README, "Docker compose")
        raise DemoError(
            f"{exc.filename or out} is not writable by this user (uid {os.getuid()}): make it so, or under docker "
            "compose run the containers as its owner (AKD_UID and AKD_GID)"
        ) from None


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
