"""`akd demo --quick` end to end, as a user runs it: every stage, a complete output folder, reuse on re-run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import HANG_S, REPO

from pipeline.report import CLAIMS
from pipeline.verdicts import RULE

STUDENTS = ("pgd-at", "akd-ensemble", "akd-single", "rslad-ensemble")
TEACHERS = ("at-s10", "at-s11", "weak-s12")
NUMBERS = ("clean_acc", "pgd_acc", "autoattack_acc", "ece")


def akd(*args: str, timeout: float = HANG_S) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "akd", *args], capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    done = akd("demo", "--quick", "--out", str(out))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out, done


def test_quick_demo_prints_the_table_and_leaves_a_complete_folder(quick_demo):
    out, done = quick_demo
    assert (
        "| student | clean acc | PGD acc | AutoAttack acc | ECE | ECE on PGD | train time (min) | teacher rows served "
        "| "
        "cache hit rate |"
    ) in done.stdout
    results = json.loads((out / "results.json").read_text())
    assert set(results["students"]) == set(STUDENTS) and set(results["teachers"]) == set(TEACHERS)
    for run in [*(r for runs in results["students"].values() for r in runs), *results["teachers"].values()]:
        # the best-validation checkpoint and the last epoch, both evaluated
        for which in ("best", "final"):
            assert all(isinstance(run[which][k], float) for k in NUMBERS if k != "autoattack_acc"), run
        assert run["overfitting"]["gap"] == pytest.approx(run["overfitting"]["best"] - run["overfitting"]["final"])
    assert all(isinstance(r["final"]["autoattack_acc"], float) for runs in results["students"].values() for r in runs)
    assert all(isinstance(t["best"]["autoattack_acc"], float) for t in results["teachers"].values())
    distilled = [r for name in STUDENTS[1:] for r in results["students"][name]]
    assert all(r["teacher_rows"] > 0 for r in distilled) and results["students"]["pgd-at"][0]["teacher_rows"] == 0
    assert results["service"]["rows"] == sum(r["teacher_rows"] for r in distilled)
    text = (out / "RESULTS.md").read_text()
    assert "## The claims" in text and RULE in text
    # the quick plan has one seed: no verdict from one pair
    assert text.count("**inconclusive (1 replicate; a verdict needs 3)**") == len(CLAIMS)
    assert text.index("![validation PGD accuracy per epoch](pictures/robust-overfitting.png)") < text.index(
        "## Students"
    )
    # 2 epochs: nothing to overfit
    assert "this regime does **not** robust-overfit" in text
    guidelines = text.split("## The guidelines one at a time")[1].split("##")[0]
    assert all(f"| {name} |" in guidelines for name in STUDENTS[1:]) and "| pgd-at |" not in guidelines
    assert "paired differences seed 0 " in text
    assert set(results["stages"]) == {"teachers", "students", "evaluate"} and results["elapsed_s"] > 0
    assert f"{results['service']['rows']:,.0f} rows served to the students" in text and "- time: teachers " in text
    for picture in [
        "robust-overfitting.png",
        "students-curves.png",
        "teachers-curves.png",
        *[f"{s}.reliability.png" for s in STUDENTS],
    ]:
        assert (out / "pictures" / picture).read_bytes()[:4] == b"\x89PNG", picture
    for run in [*(out / "teachers").iterdir(), *(out / "students").iterdir()]:
        assert {"best.pt", "last.pt", "eval.json", "eval-final.json", "metrics.jsonl", "run.toml"} <= {
            p.name for p in run.iterdir()
        }, run
    assert (out / "service" / "teachers.toml").exists() and (out / "service" / "cache" / "zarr.json").exists()
    assert (
        "[teachers] started" in done.stdout
        and "[students] started" in done.stdout
        and "[serve] teacher service up" in done.stdout
    )


def test_a_report_only_rerun_keeps_the_service_figures_and_the_time(quick_demo, tmp_path):
    """The report stage alone, in a later invocation, reports what the earlier stages measured, not zeros."""
    out, _ = quick_demo
    copy = shutil.copytree(out, tmp_path / "copy")
    before = json.loads((copy / "results.json").read_text())
    (copy / "results.json").unlink()
    again = akd("demo", "--quick", "--stage", "report", "--out", str(copy))
    assert again.returncode == 0, again.stderr
    after = json.loads((copy / "results.json").read_text())
    assert after["service"] == before["service"] and after["service"]["rows"] > 0
    # the report is not timed
    assert after["stages"] == before["stages"] and after["elapsed_s"] == before["elapsed_s"] > 0
    assert (
        f"{after['service']['rows']:,.0f} rows served to the students"
        in again.stdout + (copy / "RESULTS.md").read_text()
    )
    assert f"total {after['elapsed_s'] / 60:.1f} min" in (copy / "RESULTS.md").read_text()


def test_quick_demo_evaluates_every_model_under_one_threat_model_and_says_which(quick_demo, tmp_path):
    from pipeline.demo import Demo, evaluation_current
    from pipeline.plan import load_plan

    out, done = quick_demo
    runs = [*(out / "teachers").iterdir(), *(out / "students").iterdir()]

    # the PGD part of the threat model; AutoAttack's is checked apart
    def pgd(run, name):
        return {k: v for k, v in json.loads((run / name).read_text())["attack"].items() if k != "autoattack"}

    attacks = {run.name: pgd(run, "eval.json") for run in runs}
    assert len(attacks) == len(TEACHERS) + len(STUDENTS)
    # not its training attack (eps 0.05, PGD-1)
    assert attacks["weak-s12"]["eps"] == 0.1 and attacks["weak-s12"]["steps"] == 10
    # nor the others' PGD-2
    assert all(a == attacks["at-s10"] for a in attacks.values()), attacks
    # the final epochs too
    assert all(pgd(run, "eval-final.json") == attacks["at-s10"] for run in runs)
    autoattacked = {
        run.parent.name: {
            name
            for name in ("eval.json", "eval-final.json")
            if json.loads((run / name).read_text())["attack"]["autoattack"]
        }
        for run in runs
    }
    # where the claims look
    assert autoattacked == {"teachers": {"eval.json"}, "students": {"eval-final.json"}}
    assert json.loads((out / "teachers" / "at-s10" / "eval.json").read_text())["attack"]["autoattack"]["n"] == 8
    assert (
        "== evaluate: 14 evaluations (each model's best-validation and final epoch; AutoAttack on the students' final "
        "and "
        "the teachers' early-stopped), all under linf eps 0.1, PGD-10 step size 0.025" in done.stdout
    )
    header = (
        "- threat model (every teacher and student): linf eps 0.1, PGD-10 step size 0.025, random start, 0 restarts; "
        "AutoAttack standard (apgd-ce, apgd-t, fab-t, square; pyautoattack "
    )
    line = next(line for line in (out / "RESULTS.md").read_text().splitlines() if line.startswith("- threat model"))
    assert line.startswith(header) and line.endswith(") on 8 images"), line
    wanted = Demo(load_plan(None, "quick"), out, "test").eval_attack().model_dump()
    weak_run = out / "teachers" / "weak-s12"
    # reused on a re-run ...
    assert evaluation_current(weak_run / "eval.json", weak_run / "best.pt", wanted, "standard", 8)
    # redone
    assert not evaluation_current(weak_run / "eval.json", weak_run / "best.pt", {**wanted, "steps": 20}, "standard", 8)
    # for another plan
    assert not evaluation_current(weak_run / "eval.json", weak_run / "best.pt", wanted, "apgd", 8)
    assert not evaluation_current(weak_run / "eval.json", weak_run / "best.pt", wanted, "standard", None)
    assert not evaluation_current(weak_run / "eval.json", weak_run / "best.pt", wanted, "standard", 50)
    # a model evaluated otherwise is called out, never mixed in silently
    copy = shutil.copytree(out, tmp_path / "copy")
    weak = copy / "teachers" / "weak-s12" / "eval.json"
    recorded = json.loads(weak.read_text())
    weak.write_text(json.dumps({**recorded, "attack": {**recorded["attack"], "eps": 0.05}}))
    Demo(load_plan(None, "quick"), copy, "test").stage_report()
    text = (copy / "RESULTS.md").read_text()
    assert (
        "**WARNING: the models were NOT evaluated under one threat model" in text and "weak-s12: linf eps 0.05," in text
    )
    assert "(every teacher and student)" not in text


def test_evaluate_stage_shows_where_each_model_is(quick_demo):
    from pipeline.jobs import Job, job_progress, last_progress

    out, _ = quick_demo
    log = out / "teachers" / "at-s10" / "eval.log"
    # `akd eval` logs each attack and batch
    assert "akd.eval: pgd 1/1 batches" in log.read_text()
    where = last_progress(log)
    # its last step: AutoAttack, after PGD
    assert where and not where.startswith("pgd")
    assert job_progress(Job("eval at-s10", [], log)) == f"eval at-s10 ({where})"


def test_a_plan_run_in_parts_reports_what_is_finished_and_names_the_rest(quick_demo, tmp_path):
    out, _ = quick_demo
    copy = shutil.copytree(out, tmp_path / "copy")
    # evaluated at its best epoch only, so far
    (copy / "students" / "akd-single-s0" / "eval-final.json").unlink()
    again = akd("demo", "--quick", "--stage", "report", "--out", str(copy))
    assert again.returncode == 0, again.stderr
    text = (copy / "RESULTS.md").read_text()
    assert (
        "- **not finished yet** (not trained or not evaluated for every seed; run the same command again to go on): "
        "akd-single" in text
    )
    assert "| akd-single |" not in text and "| akd-ensemble |" in text
    # interrupted after its first epoch: not evaluated, and said so
    unfinished = copy / "students" / "rslad-ensemble-s0"
    (unfinished / "metrics.jsonl").write_text((unfinished / "metrics.jsonl").read_text().splitlines()[0] + "\n")
    for name in ("eval.json", "eval-final.json"):
        (unfinished / name).unlink()
    evaluated = akd("demo", "--quick", "--stage", "evaluate", "--out", str(copy))
    assert evaluated.returncode == 0, evaluated.stderr
    assert "[evaluate] not trained yet, so not evaluated: rslad-ensemble-s0" in evaluated.stdout
    assert (
        not (unfinished / "eval.json").exists() and (copy / "students" / "akd-single-s0" / "eval-final.json").exists()
    )
    for run in (copy / "teachers").iterdir():
        (run / "eval.json").unlink()
    none = akd("demo", "--quick", "--stage", "report", "--out", str(copy))
    assert none.returncode == 2 and "nothing to report yet" in none.stderr and "Traceback" not in none.stderr


def test_rerun_reuses_checkpoints_and_evaluations_even_after_the_folder_moved(quick_demo):
    out, _ = quick_demo
    before = json.loads((out / "results.json").read_text())
    # what the demo wrote must not point back to where it was
    moved = out.rename(out.parent / "moved")
    again = akd("demo", "--quick", "--out", str(moved))
    assert again.returncode == 0, again.stderr
    # from the moved service config and checkpoints
    assert "[serve] teacher service up" in again.stdout
    # no training, no evaluation: everything was there
    assert "started" not in again.stdout
    assert again.stdout.count("reusing") == len(TEACHERS) + len(STUDENTS)
    assert "| pgd-at |" in again.stdout
    after = json.loads((moved / "results.json").read_text())
    # the service served nothing new: its figures are kept, not zeroed
    assert after["service"] == before["service"]
    assert {stage: t["runs"] for stage, t in after["stages"].items()} == {"teachers": 2, "students": 2, "evaluate": 2}
    assert after["elapsed_s"] > before["elapsed_s"]


def processes_mentioning(text: str) -> list[str]:
    """Command lines of the running processes that mention `text` (read from /proc)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            line = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            # it ended while we looked
            continue
        if text in line:
            found.append(line)
    return found


@pytest.mark.parametrize("to_group", [False, True], ids=["to-the-demo", "to-its-process-group"])
def test_sigterm_stops_the_jobs_and_the_service_and_keeps_the_stage_time(tmp_path, to_group):
    """`kill PID`, and `timeout` or a terminal's Ctrl-C, which signal the whole process group, service included."""
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "akd", "demo", "--quick", "--out", str(out)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        for (
            line
            # bounded by the quick plan's length: the students stage starts within it, or the demo ends
        ) in proc.stdout:
            if line.startswith("[students] started"):
                break
        if to_group:
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            proc.send_signal(signal.SIGTERM)
        rest = proc.communicate(timeout=HANG_S)[0]
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, rest
    # the service outlived the signal long enough to be asked
    assert "could not read the service's stats" not in rest
    assert "[serve] teacher service stopped" in rest
    # no trainer and no service left running on (they end as the demo does: give them a moment)
    deadline = time.monotonic() + HANG_S
    while processes_mentioning(str(out)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert processes_mentioning(str(out)) == []
    # the interrupted stage's time counts
    assert "students" in json.loads((out / "stages.json").read_text())


def test_fresh_only_deletes_a_folder_the_demo_made(tmp_path):
    (tmp_path / "thesis.tex").write_text("precious")
    done = akd("demo", "--quick", "--fresh", "--out", str(tmp_path))
    assert done.returncode == 2 and "akd demo did not create" in done.stderr
    assert (tmp_path / "thesis.tex").exists()


@pytest.mark.parametrize(
    "plan,message",
    [
        ("seeds = []\nteachers = [{name = 't'}]\nstudents = [{name = 's', method = 'at'}]", "seeds"),
        (
            "seeds = [0]\nteachers = [{name = 't'}]\nstudents = [{name = 's', method = 'akd'}]",
            "distillation methods need `uses`",
        ),
        (
            "seeds = [0]\nteachers = [{name = 't'}]\nstudents = [{name = 's', method = 'akd', uses = 'u'}]",
            "served teachers",
        ),
        ("seeds = [0]\nteachers = [{name = 't', epochs = 0}]\nstudents = [{name = 's', method = 'at'}]", "epochs"),
    ],
)
def test_bad_plans_are_refused_before_any_work(tmp_path, plan, message):
    (tmp_path / "plan.toml").write_text(plan)
    done = akd("demo", "--config", str(tmp_path / "plan.toml"), "--out", str(tmp_path / "out"))
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_paths_in_a_plan_file_resolve_against_its_folder(tmp_path):
    from pipeline.plan import load_plan

    plan = tmp_path / "plans" / "plan.toml"
    plan.parent.mkdir()
    plan.write_text(
        "seeds = [0]\ncommon = { data_dir = 'data' }\nteachers = [{name = 't', data_dir = '../elsewhere'}]\n"
        "students = [{name = 's', method = 'at'}]\n"
    )
    cfg = load_plan(plan)
    assert cfg.common["data_dir"] == str(plan.parent / "data")
    assert cfg.teachers[0].overrides["data_dir"] == str(tmp_path / "elsewhere")


def test_a_plan_file_can_change_a_built_in_plan_without_copying_it(tmp_path):
    """`base = "overfit"`: the file's tables merge over the plan's, its lists replace the plan's whole (how
    RESULTS.md's extra teacher sets were declared)."""
    from pipeline.plan import load_plan

    plan = tmp_path / "plan.toml"
    plan.write_text(
        "base = 'overfit'\nseeds = [5]\ncommon = { epochs = 70 }\n"
        "teachers = [{name = 'at-s20', seed = 20, arch = 'small_cnn'}]\n"
        "students = [{name = 'pgd-at', method = 'at'}, {name = 'akd', method = 'akd', uses = 'ensemble'}]\n"
    )
    cfg, overfit = load_plan(plan), load_plan(None, "overfit")
    assert cfg.seeds == [5] and [t.name for t in cfg.teachers] == ["at-s20"]
    assert [s.name for s in cfg.students] == ["pgd-at", "akd"]
    assert cfg.common["epochs"] == 70 and cfg.common["limit_train"] == overfit.common["limit_train"] == 500
    assert cfg.eval_attack == overfit.eval_attack and cfg.autoattack_limit == overfit.autoattack_limit

    plan.write_text("base = 'overfitt'\n")
    done = akd("demo", "--config", str(plan), "--out", str(tmp_path / "out"))
    assert done.returncode == 2 and "unknown plan 'overfitt'" in done.stderr and "overfit" in done.stderr
    assert not (tmp_path / "out").exists()


DEFERS_A_SIGTERM = """
import os, signal
from pipeline.jobs import sigterm_deferred
def the_demos_handler(signum, frame):
    raise SystemExit(128 + signum)
signal.signal(signal.SIGTERM, the_demos_handler)
steps = []
try:
    with sigterm_deferred():
        os.kill(os.getpid(), signal.SIGTERM)  # as a job's Popen returns
        sum(range(100000))  # bytecodes, at any of which an undeferred handler would raise
        steps.append("job recorded")
    sum(range(100000))
    steps.append("went on")
except SystemExit as exc:
    print(steps, exc.code)
"""


def test_a_sigterm_as_a_job_starts_is_handled_once_the_job_is_recorded():
    """The demo's SIGTERM handler raises wherever the main thread is; inside a job's start it left that job running,
    unknown to the cleanup, for minutes after the demo ended. A fresh process: its own handlers."""
    result = subprocess.run(
        [sys.executable, "-c", DEFERS_A_SIGTERM], cwd=REPO, capture_output=True, text=True, timeout=HANG_S
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"['job recorded'] {128 + signal.SIGTERM}", result.stdout
