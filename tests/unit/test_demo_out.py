"""`akd demo --out DIR` is one plan's folder: a later demo with another plan is refused before any work, in one line
that names the plan that made it and the ways on (--fresh, --force). No training here: the guard and the command's
refusal only (the stages are made to fail if reached)."""

from __future__ import annotations

import json

import pytest

from akd import cli
from pipeline import DemoError
from pipeline.demo import Demo
from pipeline.layout import MARKER, PlanRecord, prepare_out, read_plan_record
from pipeline.plan import load_plan

QUICK = PlanRecord("quick", "a" * 64)
DEFAULT = PlanRecord("default", "b" * 64)


def test_a_folder_records_the_plan_that_made_it_and_takes_that_plan_again(tmp_path):
    out = tmp_path / "demo"
    prepare_out(out, fresh=False, plan=QUICK)
    assert read_plan_record(out) == QUICK
    (out / "teachers").mkdir()
    prepare_out(out, fresh=False, plan=QUICK)
    assert (out / "teachers").is_dir() and read_plan_record(out) == QUICK


def test_another_plan_is_refused_in_one_line_naming_the_maker_and_the_ways_on(tmp_path):
    prepare_out(tmp_path, fresh=False, plan=QUICK)
    with pytest.raises(DemoError) as refused:
        prepare_out(tmp_path, fresh=False, plan=DEFAULT)
    message = str(refused.value)
    assert "\n" not in message
    assert "made by plan quick (sha256 aaaaaaaaaaaa)" in message and "not plan default" in message
    assert "--fresh" in message and "--force" in message


def test_force_uses_the_folder_and_it_stays_the_makers(tmp_path, capsys):
    prepare_out(tmp_path, fresh=False, plan=QUICK)
    (tmp_path / "teachers").mkdir()
    prepare_out(tmp_path, fresh=False, plan=DEFAULT, force=True)
    assert (tmp_path / "teachers").is_dir() and read_plan_record(tmp_path) == QUICK
    assert "--force: using" in capsys.readouterr().out


def test_fresh_says_it_removes_the_old_runs_then_records_the_new_plan(tmp_path, capsys):
    out = tmp_path / "demo"
    prepare_out(out, fresh=False, plan=QUICK)
    (out / "teachers").mkdir()
    prepare_out(out, fresh=True, plan=DEFAULT)
    assert not (out / "teachers").exists() and read_plan_record(out) == DEFAULT
    assert f"--fresh: removing {out} (made by plan quick" in capsys.readouterr().out


def test_a_folder_an_older_akd_made_records_the_plan_that_uses_it_next(tmp_path):
    (tmp_path / MARKER).touch()
    prepare_out(tmp_path, fresh=False, plan=DEFAULT)
    assert json.loads((tmp_path / MARKER).read_text()) == {"plan": "default", "sha256": "b" * 64}


def test_a_plan_is_what_it_asks_for_not_how_it_is_scheduled():
    quick = load_plan(None, "quick").fingerprint()
    assert load_plan(None, "quick", ["jobs=3", "threads_per_job=2"]).fingerprint() == quick
    assert load_plan(None, "quick", ["common.epochs=1"]).fingerprint() != quick
    assert load_plan(None, "default").fingerprint() != quick


def test_the_command_refuses_before_any_stage_runs(tmp_path, monkeypatch, capsys):
    def reached(*args, **kwargs):
        raise AssertionError("a stage ran on a folder another plan made")

    for stage in ("stage_teachers", "stage_students", "stage_evaluate", "stage_report"):
        monkeypatch.setattr(Demo, stage, reached)
    # the malloc settings are a whole process's: not this test process's
    monkeypatch.setattr(cli, "keep_freed_memory_at_start", lambda prog: 0)
    monkeypatch.delenv("AKD_DEMO_QUICK", raising=False)
    monkeypatch.delenv("AKD_DEMO_PLAN", raising=False)
    prepare_out(tmp_path, fresh=False, plan=PlanRecord("quick", load_plan(None, "quick").fingerprint()))

    assert cli.main(["demo", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"akd demo: {tmp_path} was made by plan quick (sha256 ")
    assert "not plan default" in err and "--fresh" in err and "--force" in err


def test_a_folder_this_user_cannot_write_is_one_line_naming_the_uid(tmp_path, monkeypatch):
    """What a compose container whose user is not the bind mount's owner meets (as root here, so made to happen)."""

    def refused(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr("pathlib.Path.mkdir", refused)
    with pytest.raises(DemoError) as refusal:
        prepare_out(tmp_path / "demo", fresh=False, plan=QUICK)
    assert str(refusal.value).startswith(f"{tmp_path / 'demo'} is not writable by this user (uid ")
    assert "AKD_UID" in str(refusal.value) and "\n" not in str(refusal.value)


def test_an_evaluation_autoattacked_on_another_image_count_is_redone(tmp_path):
    """A plan whose AutoAttack image bound changed does not keep an evaluation made under the old bound (AutoAttack runs
    on the first min(bound, evaluated) images); everything else equal, the same bound keeps it."""
    from pipeline.demo import evaluation_current

    attack = {"norm": "linf", "eps": 0.3}
    checkpoint = tmp_path / "last.pt"
    checkpoint.write_bytes(b"weights")
    eval_json = tmp_path / "eval-final.json"
    autoattack = {"version": "standard", "n": 500}
    eval_json.write_text(json.dumps({"n": 1000, "attack": {**attack, "autoattack": autoattack}}))

    assert evaluation_current(eval_json, checkpoint, attack, "standard", 500)
    assert not evaluation_current(eval_json, checkpoint, attack, "standard", 1000)
    assert not evaluation_current(eval_json, checkpoint, attack, "standard", 100)
    # a bound past the evaluated images means all of them
    eval_json.write_text(json.dumps({"n": 500, "attack": {**attack, "autoattack": autoattack}}))
    assert evaluation_current(eval_json, checkpoint, attack, "standard", 1000)
