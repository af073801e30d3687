"""Real training on real data (slices of mnist5k): it learns, distils through a live service, resumes exactly."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import httpx
import pytest
import torch
from conftest import HANG_S, REPO, live_server, metric_series, write_config

from shared.checkpoint import load_checkpoint
from shared.configfile import ConfigError
from student_trainer.config import load_train_config
from student_trainer.train import Trainer, train

QUICK = ["limit_train=800", "val_size=300", "epochs=2", "batch_size=64", "attack.steps=3", "lr=0.05"]
CHANCE = 0.1


def read_metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    """A short PGD-AT run: the robust teacher for the distillation tests."""
    out = tmp_path_factory.mktemp("runs") / "at"
    train(load_train_config(sets=QUICK + [f"out_dir={out}"]))
    return out


@pytest.fixture(scope="module")
def served_teacher(teacher_run, tmp_path_factory):
    folder = tmp_path_factory.mktemp("service")
    member = {"path": str(teacher_run / "best.pt")}
    config = write_config(
        folder / "teachers.toml",
        {"mnist": {"num_classes": 10, "input_shape": [1, 28, 28], "members": [member]}},
        {"cache": {"dir": "cache"}},
    )
    with live_server(config) as (base, _):
        yield base, config


def test_at_run_learns_and_leaves_checkpoints(teacher_run):
    metrics = read_metrics(teacher_run)
    assert [m["epoch"] for m in metrics] == [1, 2]
    last = metrics[-1]
    assert last["val_clean_acc"] > 5 * CHANCE and last["val_robust_acc"] > 2.5 * CHANCE, last
    for name in ("epoch_001.pt", "epoch_002.pt", "best.pt", "last.pt", "curves.png", "dynamics.npz", "config.json"):
        assert (teacher_run / name).exists(), name
    best = load_checkpoint(teacher_run / "best.pt")
    assert best.metadata["epoch"] == max(metrics, key=lambda m: m["val_robust_acc"])["epoch"]
    assert best.metadata["config"]["method"] == "at" and best.extra == {}
    assert set(load_checkpoint(teacher_run / "last.pt").extra) >= {"optimizer", "scheduler", "data_gen", "attack_gen"}


def test_akd_student_learns_against_a_live_service(served_teacher, tmp_path):
    base, _ = served_teacher
    out = tmp_path / "akd"
    train(
        load_train_config(
            sets=QUICK + [f"out_dir={out}", "method=akd", "alpha=0.5", f"teacher.url={base}", "teacher.name=mnist"]
        )
    )
    metrics = read_metrics(out)
    assert metrics[-1]["val_clean_acc"] > 5 * CHANCE and metrics[-1]["val_robust_acc"] > 2.5 * CHANCE, metrics[-1]
    # one query per adversarial row
    assert [m["teacher_rows"] for m in metrics] == [800, 800]
    # adversarial rows are new every step
    assert metrics[-1]["teacher_cache_hits"] == 0
    # so they bypass the cache (teacher.cache.adversarial = "bypass")
    assert cached_rows(base) == 0


def test_a_config_can_store_adversarial_rows_and_one_string_sets_both_modes(served_teacher, tmp_path):
    base, _ = served_teacher
    akd = [*QUICK, "epochs=1", f"out_dir={tmp_path / 'akd'}", "method=akd", "alpha=0.5", f"teacher.url={base}"]
    cfg = load_train_config(sets=[*akd, 'teacher.cache="use"'])
    assert (cfg.teacher.cache.clean, cfg.teacher.cache.adversarial) == ("use", "use")
    before = cached_rows(base)
    train(cfg)
    assert cached_rows(base) == before + 800
    with pytest.raises(ConfigError, match="adversarial"):
        load_train_config(sets=[*QUICK, f"teacher.url={base}", 'teacher.cache.adversarial="keep"'])


def test_ard_queries_clean_inputs_that_hit_the_cache_from_the_second_epoch(served_teacher, tmp_path):
    base, _ = served_teacher
    out = tmp_path / "ard"
    train(load_train_config(sets=QUICK + [f"out_dir={out}", "method=ard", "epochs=2", f"teacher.url={base}"]))
    first, second = read_metrics(out)
    assert first["teacher_rows"] == second["teacher_rows"] == 800
    # mnist5k is not augmented: epoch 2 sees the same clean rows
    assert second["teacher_cache_hits"] == 800
    # then asked for by key
    assert (first["teacher_rows_uploaded"], second["teacher_rows_uploaded"]) == (800, 0)


def checkpoint_tensors(value, name: str = "") -> dict[str, torch.Tensor]:
    """Every tensor in a checkpoint's part (its weights, or the optimiser's state), by where it sits."""
    if isinstance(value, torch.Tensor):
        return {name: value}
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list | tuple) else []
    return {k: t for key, item in items for k, t in checkpoint_tensors(item, f"{name}/{key}").items()}


@pytest.mark.parametrize(
    "method, teacher, queries",
    [("akd", "url", 2), ("ard", "url", 2), ("rslad", "url", 2), ("iad", "url", 4), ("iad", "config", 4)],
    ids=["akd", "ard", "rslad", "iad", "iad, local teacher"],
)
def test_overlap_trains_the_weights_of_the_synchronous_path_bit_for_bit(
    served_teacher, tmp_path, monkeypatch, method, teacher, queries
):
    """teacher.overlap on (the queries sent early, the next batch's clean one asked ahead) and off, the same run
    otherwise: the same weights and optimiser state, every tensor equal. Cheap: 32 rows, two steps of PGD-1, the
    module's service (or its config, run in-process: asked early, computed at once)."""
    from student_trainer.teacher_client import LocalTeacher, RemoteTeacher

    base, config = served_teacher
    submitted = []
    for kind in (RemoteTeacher, LocalTeacher):
        submit = kind.submit
        monkeypatch.setattr(
            kind, "submit", lambda self, x, submit=submit, **kw: submitted.append(x) or submit(self, x, **kw)
        )
    sets = ["limit_train=32", "val_size=16", "batch_size=16", "epochs=1", "attack.steps=1", "alpha=0.5"]
    sets += [f"method={method}", "iad_warmup_epochs=0", f"teacher.{teacher}={base if teacher == 'url' else config}"]
    runs = {}
    for overlap in ("true", "false"):
        before = len(submitted)
        train(load_train_config(sets=[*sets, f"out_dir={tmp_path / overlap}", f"teacher.overlap={overlap}"]))
        runs[overlap] = load_checkpoint(tmp_path / overlap / "last.pt")
        # overlap on: every query went through submit; off: none
        assert len(submitted) - before == (queries if overlap == "true" else 0)
    on, off = runs["true"], runs["false"]
    for part in (lambda c: c.state_dict, lambda c: c.extra["optimizer"]):
        a, b = checkpoint_tensors(part(on)), checkpoint_tensors(part(off))
        assert a.keys() == b.keys() and a
        assert [k for k in a if not torch.equal(a[k], b[k])] == []
    # what the service's cache held differs: the second run's clean rows hit the first's
    apart = {"epoch_time_s", "teacher_cache_hits", "teacher_rows_uploaded"}
    strip = lambda ms: [{k: v for k, v in m.items() if k not in apart} for m in ms]  # noqa: E731
    assert strip(read_metrics(tmp_path / "true")) == strip(read_metrics(tmp_path / "false"))
    assert read_metrics(tmp_path / "true")[0]["teacher_rows"] == 16 * queries


def test_rslad_with_a_local_teacher_config(served_teacher, tmp_path):
    _, config = served_teacher
    out = tmp_path / "rslad"
    train(
        load_train_config(
            sets=QUICK + [f"out_dir={out}", "method=rslad", "alpha=0.8", "epochs=1", f"teacher.config={config}"]
        )
    )
    (metrics,) = read_metrics(out)
    assert metrics["teacher_rows"] == 800 and metrics["val_clean_acc"] > 3 * CHANCE


def test_resume_reaches_the_same_weights_as_an_uninterrupted_run(tmp_path):
    sets = ["limit_train=256", "val_size=100", "epochs=2", "batch_size=64", "attack.steps=2", "schedule=onecycle"]
    whole = load_train_config(sets=sets + [f"out_dir={tmp_path / 'whole'}"])
    train(whole)
    parted = load_train_config(sets=sets + [f"out_dir={tmp_path / 'parted'}"])
    interrupted = Trainer(parted)
    interrupted.fit(stop_after=1)
    interrupted.close()
    train(parted, resume=True)
    a, b = load_checkpoint(tmp_path / "whole" / "last.pt"), load_checkpoint(tmp_path / "parted" / "last.pt")
    assert a.state_dict.keys() == b.state_dict.keys()
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)
    strip = lambda ms: [{k: v for k, v in m.items() if k != "epoch_time_s"} for m in ms]  # noqa: E731
    assert strip(read_metrics(tmp_path / "whole")) == strip(read_metrics(tmp_path / "parted"))


def akd(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "akd", *args], capture_output=True, text=True, timeout=HANG_S, cwd=REPO
    )


@pytest.mark.parametrize(
    "sets,message",
    [
        (["method=akd"], "method 'akd' distils a teacher"),
        (["dataset=imagenet"], "unknown dataset 'imagenet'"),
        (["attack.norm=l3"], "attack.norm"),
        (["epochs"], "--set expects key=value"),
        (["teacher.url=http://x", "teacher.config=t.toml", "method=ard"], "exactly one of `url`"),
    ],
)
def test_bad_run_configs_exit_2_with_a_clear_message(sets, message):
    done = akd("train", *[f"--set={s}" for s in sets])
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_missing_dataset_folder_says_what_to_put_where(tmp_path):
    done = akd("train", "--set", "dataset=cifar10", "--set", f"data_dir={tmp_path}")
    assert done.returncode == 2 and "cifar-10-batches-py" in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_akd_eval_writes_json_table_and_diagram(teacher_run, tmp_path):
    out = tmp_path / "eval.json"
    done = akd(
        "eval",
        "--checkpoint",
        str(teacher_run / "best.pt"),
        "--attacks",
        "clean,pgd,autoattack",
        "--limit",
        "12",
        "--autoattack-limit",
        "4",
        "--set",
        "attack.eps=0.3",
        "--out",
        str(out),
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert {"clean_acc", "pgd_acc", "autoattack_acc", "ece"} <= set(report)
    # AutoAttack is the costly part
    assert report["n"] == 12 and report["autoattack_n"] == 4 and report["attack"]["eps"] == 0.3
    assert report["autoattack_acc"] <= report["clean_acc"]
    # the threat model is recorded whole: PGD's and AutoAttack's
    aa = report["attack"]["autoattack"]
    assert aa["version"] == "standard" and aa["attacks"] == ["apgd-ce", "apgd-t", "fab-t", "square"] and aa["n"] == 4
    assert report["attack"]["steps"] == 10 and not report["attack"]["standard"]
    line = next(line for line in done.stdout.splitlines() if line.startswith("threat model: "))
    assert line.startswith(
        "threat model: linf eps 0.3, PGD-10 step size 0.075, random start, 0 restarts; "
        "AutoAttack standard (apgd-ce, apgd-t, fab-t, square; pyautoattack "
    ) and line.endswith(") on 4 images (set with --set attack.*)")
    assert "| PGD accuracy |" in done.stdout
    assert out.with_suffix(".reliability.png").read_bytes()[:4] == b"\x89PNG"


@pytest.fixture(scope="module")
def weak_run(tmp_path_factory):
    """A run trained with a weak, cheap attack (eps 0.05, PGD-2): what `akd eval` must not measure it with."""
    out = tmp_path_factory.mktemp("runs") / "weak"
    train(
        load_train_config(
            sets=[
                "arch=tiny_cnn",
                "limit_train=128",
                "val_size=50",
                "epochs=1",
                "batch_size=64",
                "attack.steps=2",
                "attack.eps=0.05",
                f"out_dir={out}",
            ]
        )
    )
    return out


def test_akd_eval_uses_the_datasets_standard_threat_model_not_the_training_attack(weak_run, tmp_path):
    out = tmp_path / "eval.json"
    done = akd("eval", "--checkpoint", str(weak_run / "best.pt"), "--limit", "32", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert (
        "threat model: linf eps 0.1, PGD-10 step size 0.025, random start, 0 restarts (the dataset's standard)"
        in done.stdout
    )
    attack = json.loads(out.read_text())["attack"]
    assert (
        attack["norm"] == "linf"
        and attack["eps"] == 0.1
        and attack["steps"] == 10
        and attack["step_size"] == pytest.approx(0.025)
    )
    assert attack["restarts"] == 0 and attack["random_start"] and attack["standard"] and attack["autoattack"] is None


def test_akd_eval_honours_an_explicit_threat_model(weak_run, tmp_path):
    out = tmp_path / "eval.json"
    done = akd(
        "eval",
        "--checkpoint",
        str(weak_run / "best.pt"),
        "--limit",
        "32",
        "--set",
        "attack.eps=0.05",
        "--set",
        "attack.steps=2",
        "--out",
        str(out),
    )
    assert done.returncode == 0, done.stderr
    assert (
        "threat model: linf eps 0.05, PGD-2 step size 0.0625, random start, 0 restarts (set with --set attack.*)"
        in done.stdout
    )
    attack = json.loads(out.read_text())["attack"]
    assert (
        attack["eps"] == 0.05
        and attack["steps"] == 2
        and attack["step_size"] == pytest.approx(0.0625)
        and not attack["standard"]
    )


def test_akd_eval_runs_the_apgd_subset_of_autoattack_and_names_it(weak_run, tmp_path):
    out = tmp_path / "eval.json"
    done = akd(
        "eval",
        "--checkpoint",
        str(weak_run / "best.pt"),
        "--attacks",
        "clean,autoattack",
        "--autoattack-version",
        "apgd",
        "--limit",
        "16",
        "--out",
        str(out),
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    aa = report["attack"]["autoattack"]
    assert aa["version"] == "apgd" and aa["attacks"] == ["apgd-ce", "apgd-t"] and aa["n"] == 16
    assert "AutoAttack apgd (apgd-ce, apgd-t; pyautoattack" in done.stdout
    assert 0 <= report["autoattack_acc"] <= report["clean_acc"]
    bad = akd("eval", "--checkpoint", str(weak_run / "best.pt"), "--autoattack-version", "plus", "--out", str(out))
    assert bad.returncode == 2 and "invalid choice: 'plus'" in bad.stderr


def test_akd_eval_of_a_torch_export(teacher_run, tmp_path):
    model = load_checkpoint(teacher_run / "best.pt").build()
    exported = tmp_path / "teacher.pt2"
    torch.export.save(
        torch.export.export(model, (torch.rand(4, 1, 28, 28),), dynamic_shapes=({0: torch.export.Dim("batch")},)),
        exported,
    )
    out = tmp_path / "eval.json"
    done = akd("eval", "--checkpoint", str(exported), "--set", "dataset=mnist5k", "--limit", "64", "--out", str(out))
    assert done.returncode == 0, done.stderr
    from_export = json.loads(out.read_text())
    done = akd("eval", "--checkpoint", str(teacher_run / "best.pt"), "--limit", "64", "--out", str(tmp_path / "b.json"))
    assert from_export["clean_acc"] == json.loads((tmp_path / "b.json").read_text())["clean_acc"]


def wait_for_first_epoch(proc: subprocess.Popen, out) -> None:
    """Until the run in `out` saved its first epoch (`last.pt`); fails if it ended first."""
    import time

    deadline = time.monotonic() + HANG_S
    while not (out / "last.pt").exists():
        assert time.monotonic() < deadline and proc.poll() is None, "the run ended before its first epoch"
        time.sleep(0.05)


def test_akd_train_resume_after_kill_9(tmp_path):
    """A run killed mid-training continues from last.pt with `akd train --resume DIR` and finishes."""
    import signal

    out = tmp_path / "run"
    sets = ["limit_train=256", "val_size=100", "epochs=3", "batch_size=64", "attack.steps=2", f"out_dir={out}"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "akd", "train", *[f"--set={s}" for s in sets]],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_first_epoch(proc, out)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    done_before = len(read_metrics(out))
    assert done_before < 3, "the run finished before it could be killed; make it longer"
    done = akd("train", "--resume", str(out))
    assert done.returncode == 0, done.stderr
    assert [m["epoch"] for m in read_metrics(out)] == [1, 2, 3]
    assert load_checkpoint(out / "last.pt").metadata["epoch"] == 3


def test_resume_continues_a_run_in_the_folder_it_was_moved_to(tmp_path):
    first = tmp_path / "first"
    sets = ["limit_train=128", "val_size=50", "epochs=1", "batch_size=64", "attack.steps=1", f"out_dir={first}"]
    assert akd("train", *[f"--set={s}" for s in sets]).returncode == 0
    moved = first.rename(tmp_path / "moved")
    done = akd("train", "--resume", str(moved), "--set", "epochs=2")
    assert done.returncode == 0, done.stderr
    assert [m["epoch"] for m in read_metrics(moved)] == [1, 2] and not first.exists()


def test_progress_is_a_bar_on_a_terminal_and_log_lines_otherwise(caplog):
    import io

    from student_trainer.progress import Progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal = Terminal()
    bar = Progress(total_epochs=2, steps_per_epoch=3, stream=terminal)
    for _ in range(3):
        bar.step(loss=1.5, adv_acc=0.25)
    bar.epoch_done({"train_loss": 1.5, "val_robust_acc": 0.3, "epoch_time_s": 1.0})
    bar.close()
    shown = terminal.getvalue()
    # elapsed<remaining
    assert "loss=1.500" in shown and "3/6" in shown and re.search(r"\d\d:\d\d<\d\d:\d\d", shown)
    assert "epoch 1/2 train_loss 1.5000 val_robust_acc 0.3000 (1.0s, ETA" in shown

    with caplog.at_level("INFO", logger="akd.train"):
        lines = Progress(total_epochs=2, steps_per_epoch=3, stream=io.StringIO(), log_every_s=0)
        lines.step(loss=1.5, adv_acc=0.25)
        lines.epoch_done({"train_loss": 1.5, "val_robust_acc": 0.3, "epoch_time_s": 1.0})
    messages = [r.getMessage() for r in caplog.records]
    assert any("epoch 1/2 step 1/3 loss 1.500" in m and "ETA" in m for m in messages)
    assert any(m.startswith("epoch 1/2 train_loss 1.5000 val_robust_acc 0.3000") for m in messages)


def test_akd_compare_puts_runs_side_by_side(teacher_run, tmp_path):
    import shutil

    twin = tmp_path / "twin"
    shutil.copytree(teacher_run, twin)
    out = tmp_path / "compare"
    done = akd("compare", str(teacher_run), str(twin), "--out", str(out))
    assert done.returncode == 0, done.stderr
    report = (out / "compare.md").read_text()
    best = max(read_metrics(teacher_run), key=lambda m: m["val_robust_acc"])
    assert f"| at | {best['val_robust_acc']:.4f} | {best['epoch']} |" in report and "| twin |" in report
    assert "mean forgetting events" in report and "## Clean training correctness" in report
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    missing = akd("compare", str(teacher_run), str(tmp_path / "nope"), "--out", str(out))
    assert missing.returncode == 2 and "not run folders" in missing.stderr


def test_service_dying_mid_run_ends_training_with_one_line_that_says_how_to_resume(teacher_run, tmp_path):
    """The same failure as an unreachable service at start-up: one message, rc 2, and the command that continues the
    run."""
    from conftest import ServerProcess

    config = write_config(
        tmp_path / "teachers.toml",
        {"mnist": {"num_classes": 10, "input_shape": [1, 28, 28], "members": [{"path": str(teacher_run / "best.pt")}]}},
    )
    server = ServerProcess(config, tmp_path / "server.log")
    out = tmp_path / "run"
    sets = [
        "limit_train=256",
        "val_size=100",
        "epochs=50",
        "batch_size=64",
        "attack.steps=1",
        f"out_dir={out}",
        "method=akd",
        f"teacher.url={server.base}",
        "teacher.give_up_after_s=1",
    ]
    with open(
        tmp_path / "train.err",
        "w+",
        # a file, not a pipe: the run's log lines can never fill it and block the run
    ) as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "akd", "train", *[f"--set={s}" for s in sets]],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
        try:
            wait_for_first_epoch(proc, out)
        finally:
            server.kill9()
        proc.wait(timeout=HANG_S)
    stderr = (tmp_path / "train.err").read_text()
    assert proc.returncode == 2, stderr
    assert "Traceback" not in stderr
    assert f"continue with: akd train --resume {out}" in stderr
    assert "akd train: " in stderr and "unavailable" in stderr


def test_service_unreachable_at_start_up_is_one_message_that_says_what_to_do(tmp_path):
    from conftest import free_port

    out = tmp_path / "run"
    done = akd(
        "train",
        "--set",
        "method=akd",
        "--set",
        f"teacher.url=http://127.0.0.1:{free_port()}",
        "--set",
        "teacher.give_up_after_s=0.5",
        "--set",
        f"out_dir={out}",
        "--set",
        "limit_train=64",
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and "unavailable" in done.stderr
    assert "once the service is up, run the same command again" in done.stderr


def test_resume_survives_a_torn_dynamics_file(tmp_path):
    """A kill -9 while an older akd wrote dynamics.npz left it torn, and resuming then failed with a traceback.

    dynamics.npz is now written whole (temp file + rename) before last.pt commits the epoch; one that cannot be
    read costs its history, not the run.
    """
    out = tmp_path / "run"
    sets = ["limit_train=128", "val_size=50", "epochs=1", "batch_size=64", "attack.steps=1", f"out_dir={out}"]
    assert akd("train", *[f"--set={s}" for s in sets]).returncode == 0
    assert not list(out.glob(".*.tmp")), "a temp file was left behind"
    # what the kill left
    (out / "dynamics.npz").write_bytes(b"")
    done = akd("train", "--resume", str(out), "--set", "epochs=2")
    assert done.returncode == 0, done.stderr
    assert "dynamics.npz is unreadable" in done.stderr and "restart at epoch 2" in done.stderr
    assert [m["epoch"] for m in read_metrics(out)] == [1, 2]
    from student_trainer.dynamics import CorrectnessLog

    # the resumed epoch only: the torn history is gone
    assert len(CorrectnessLog.load(out / "dynamics.npz").epochs) == 1


def test_eps_warmup_ramps_the_training_radius_while_validation_stays_at_full_radius(tmp_path):
    cfg = load_train_config(
        sets=[
            "limit_train=256",
            "val_size=100",
            "epochs=3",
            "batch_size=64",
            "attack.steps=2",
            "attack.eps=0.2",
            "eps_warmup_epochs=2",
            "track_dynamics=false",
            f"out_dir={tmp_path}",
        ]
    )
    trainer = Trainer(cfg)
    radii, method = [], trainer.method
    trainer.method = lambda step: radii.append(step.attack.eps) or method(step)
    trainer.fit()
    trainer.close()
    # 4: the radius grows by 0.2 / 8 each step, then stays at 0.2
    steps = trainer.steps_per_epoch
    torch.testing.assert_close(
        torch.tensor(radii), torch.tensor([0.2 * min(1, (i + 1) / (2 * steps)) for i in range(3 * steps)])
    )
    metrics = read_metrics(tmp_path)
    assert [round(m["train_eps"], 6) for m in metrics] == [0.1, 0.2, 0.2]
    assert trainer.val_attack.eps == 0.2
    # how far the attack moved the inputs (mean L-inf norm): inside each epoch's ball, and off x
    assert all(0 < m["train_perturbation"] <= m["train_eps"] + 1e-6 for m in metrics[1:])
    # the warm-up's radii, 0.025 to 0.1
    assert 0 < metrics[0]["train_perturbation"] <= 0.1 + 1e-6


def test_init_from_starts_at_the_checkpoints_weights_and_refuses_another_architecture(teacher_run, tmp_path):
    start = load_checkpoint(teacher_run / "best.pt")
    cfg = load_train_config(sets=QUICK + [f"init_from={teacher_run / 'best.pt'}", f"out_dir={tmp_path / 'warm'}"])
    trainer = Trainer(cfg)
    assert all(torch.equal(v, start.state_dict[k]) for k, v in trainer.model.state_dict().items())
    trainer.close()
    done = akd(
        "train",
        "--set",
        "arch=tiny_cnn",
        "--set",
        f"init_from={teacher_run / 'best.pt'}",
        "--set",
        f"out_dir={tmp_path / 'bad'}",
    )
    assert done.returncode == 2 and "holds small_cnn" in done.stderr and "this run trains tiny_cnn" in done.stderr, (
        done.stderr
    )
    assert "Traceback" not in done.stderr


def test_eps_warmup_longer_than_training_is_a_config_error():
    done = akd("train", "--set", "epochs=2", "--set", "eps_warmup_epochs=3")
    assert done.returncode == 2 and "eps_warmup_epochs (3) is longer than training (2 epochs)" in done.stderr, (
        done.stderr
    )


def test_validation_attack_takes_its_own_keys_and_the_training_attacks_for_the_rest():
    cfg = load_train_config(sets=["attack.eps=0.3", "attack.steps=5", "eval.attack.steps=10"])
    assert (cfg.val_attack.eps, cfg.val_attack.steps) == (0.3, 10)
    # derived for its own steps, not the training's
    assert cfg.val_attack.step_size == pytest.approx(2.5 * 0.3 / 10)
    assert load_train_config(sets=["attack.eps=0.3", "eval.attack.eps=0.2"]).val_attack.eps == 0.2
    assert (
        load_train_config(sets=["attack.eps=0.3"]).val_attack == load_train_config(sets=["attack.eps=0.3"]).train_attack
    )


def cached_rows(base: str) -> float:
    """Rows the service's cache holds, over every member."""
    text = httpx.get(base + "/metrics", timeout=HANG_S).text
    return sum(value for series, value in metric_series(text).items() if series.startswith("akd_cache_rows"))


@pytest.mark.parametrize("method", ["akd", "ard"])
def test_shared_memory_trains_the_weights_of_request_bodies_bit_for_bit(served_teacher, tmp_path, monkeypatch, method):
    """teacher.shared_memory on (the module's service runs in this process: the same host, so the rows and answers go
    through the client's region) and off (request bodies), the same run otherwise: every tensor of the weights and
    optimiser state equal. Cheap: 32 rows, two steps of PGD-1; the cache bypassed, so both runs send every row."""
    from shared.client.shared_memory import ClientRegion

    base, _ = served_teacher
    through_region = []
    write_rows = ClientRegion.write_rows
    monkeypatch.setattr(
        ClientRegion, "write_rows", lambda self, rows: through_region.append(len(rows)) or write_rows(self, rows)
    )
    sets = ["limit_train=32", "val_size=16", "batch_size=16", "epochs=1", "attack.steps=1", "alpha=0.5"]
    sets += [f"method={method}", f"teacher.url={base}", "teacher.cache=bypass"]
    runs = {}
    for shared in ("true", "false"):
        before = sum(through_region)
        train(load_train_config(sets=[*sets, f"out_dir={tmp_path / shared}", f"teacher.shared_memory={shared}"]))
        runs[shared] = load_checkpoint(tmp_path / shared / "last.pt")
        # on: every row went through the region; off: none
        assert sum(through_region) - before == (
            read_metrics(tmp_path / shared)[0]["teacher_rows"] if shared == "true" else 0
        )
    assert sum(through_region) > 0
    for part in (lambda c: c.state_dict, lambda c: c.extra["optimizer"]):
        a, b = checkpoint_tensors(part(runs["true"])), checkpoint_tensors(part(runs["false"]))
        assert a.keys() == b.keys() and a
        assert [k for k in a if not torch.equal(a[k], b[k])] == []
