"""Hostile command lines: each gets one clear line on stderr and exit code 2, never a traceback, a hang or a run.

Real `akd` subprocesses (the installed console script) on real files: a FIFO, /dev/zero, a 2 MiB config, a file
where a folder belongs, counts that select nothing. Every config any subcommand reads goes through one reader
(shared/configfile.py), so each hostile config is given to every subcommand that takes `--config`.

Each run is bounded by HANG_S; it also runs under a 4 GiB address-space limit, so that a reader that read /dev/zero
to its end would fail with MemoryError rather than take the machine's memory (an import of torch and the data stay
far below it).
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import HANG_S, mnist_teacher, save_member, write_config

AKD = Path(sys.executable).parent / "akd"
ADDRESS_SPACE = 4 << 30
# shared.configfile.MAX_CONFIG_BYTES, as the message writes it
CONFIG_BOUND = "1,048,576 bytes"


def _limited() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))


def akd(*argv: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("AKD_")}
    return subprocess.run(
        [str(AKD), *argv],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**clean, **(env or {})},
        timeout=HANG_S,
        preexec_fn=_limited,
    )


def refused(done: subprocess.CompletedProcess, command: str, *needles: str) -> str:
    """Exit 2, no traceback, one line on stderr starting `akd COMMAND: `, each needle in it."""
    stderr = done.stderr
    assert done.returncode == 2, (done.returncode, stderr[-3000:])
    assert "Traceback" not in stderr, stderr[-3000:]
    assert stderr.startswith(f"akd {command}: ") and len(stderr.strip().splitlines()) == 1, stderr[-3000:]
    for needle in needles:
        assert needle in stderr, (needle, stderr)
    return stderr


@pytest.fixture(scope="module")
def member(tmp_path_factory) -> Path:
    return save_member(tmp_path_factory.mktemp("hostile") / "a.pt", seed=1)


# --------------------------------------------------------------------------- config files: regular, and bounded


def _fifo(folder: Path) -> tuple[Path, str]:
    os.mkfifo(folder / "config.toml")
    return folder / "config.toml", "is a FIFO (named pipe); expected a regular TOML file"


def _dev_zero(folder: Path) -> tuple[Path, str]:
    return Path("/dev/zero"), "is a character device; expected a regular TOML file"


def _oversized(folder: Path) -> tuple[Path, str]:
    """Valid TOML, 2 MiB of it, read whole and parsed before whatever its size. `epochs = 0` makes every config
    type refuse it at once when it is read (no training or serving starts): only the bound's message is this one."""
    path = folder / "config.toml"
    path.write_text("epochs = 0\n" + ("#" * 1023 + "\n") * 2048)
    return path, f"holds {path.stat().st_size:,} bytes; a config file may hold at most {CONFIG_BOUND}"


HOSTILE_CONFIGS = {"fifo": _fifo, "dev_zero": _dev_zero, "oversized": _oversized}
# every subcommand that reads a --config, with what else it needs to get that far
CONFIG_COMMANDS = {
    "serve": [],
    "train": [],
    "warm": [],
    "demo": ["--out", "out"],
    "bench": ["--out", "out"],
}


@pytest.mark.parametrize("kind", HOSTILE_CONFIGS)
@pytest.mark.parametrize("command", CONFIG_COMMANDS)
def test_a_config_that_is_not_a_small_regular_file_is_refused_by_every_subcommand(tmp_path, command, kind):
    """A FIFO hung `akd serve --config` waiting for a writer, /dev/zero read until MemoryError, a 2 MiB file was
    read whole: each is now one line naming the file and what it is, before anything starts."""
    config, says = HOSTILE_CONFIGS[kind](tmp_path)
    done = akd(command, "--config", str(config), *CONFIG_COMMANDS[command], cwd=tmp_path)
    refused(done, command, f"config file {config} {says}")
    # demo and bench made nothing
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- a file where a folder belongs


@pytest.mark.parametrize("under", ["", "sub"], ids=["the_file", "a_folder_in_it"])
def test_serve_with_a_cache_dir_that_is_a_file(tmp_path, member, under):
    config = write_config(tmp_path / "t.toml", {"mnist": mnist_teacher([(member, 1.0)])}, {"device": "cpu"})
    (tmp_path / "afile").write_text("not a folder")
    cache_dir = tmp_path / "afile" / under if under else tmp_path / "afile"
    done = akd("serve", "--config", str(config), "--cache-dir", str(cache_dir), "--port", "0", cwd=tmp_path)
    refused(done, "serve", f"server.cache.dir: {cache_dir}", f"{tmp_path / 'afile'} is a file; expected a folder")
    assert (tmp_path / "afile").read_text() == "not a folder"


@pytest.mark.parametrize("under", ["", "sub"], ids=["the_file", "a_folder_in_it"])
def test_train_with_an_out_dir_that_is_a_file(tmp_path, under):
    (tmp_path / "afile").write_text("not a folder")
    out_dir = tmp_path / "afile" / under if under else tmp_path / "afile"
    done = akd("train", "--set", f"out_dir={out_dir}", "--set", "epochs=1", cwd=tmp_path)
    refused(done, "train", f"out_dir {out_dir}", f"{tmp_path / 'afile'} is a file; expected a folder")
    assert (tmp_path / "afile").read_text() == "not a folder"


@pytest.mark.parametrize("under", ["", "sub"], ids=["the_file", "a_folder_in_it"])
@pytest.mark.parametrize("command", [["demo", "--quick"], ["bench", "--quick"]], ids=["demo", "bench"])
def test_demo_and_bench_with_an_out_that_is_a_file(tmp_path, under, command):
    (tmp_path / "afile").write_text("not a folder")
    out = tmp_path / "afile" / under if under else tmp_path / "afile"
    done = akd(*command, "--out", str(out), cwd=tmp_path)
    refused(done, command[0], f"--out {out}", f"{tmp_path / 'afile'} is a file; expected a folder")
    assert (tmp_path / "afile").read_text() == "not a folder"


# --------------------------------------------------------------------------- akd eval: counts and --out


EVAL_REFUSALS = {
    "limit_0": (["--limit", "0"], "--limit must be at least 1, got 0"),
    # took 999 of 1,000 images
    "limit_negative": (["--limit", "-1"], "--limit must be at least 1, got -1"),
    "autoattack_limit_negative": (
        ["--autoattack-limit", "-1"],
        "--autoattack-limit must be at least 0 (0: no AutoAttack), got -1",
    ),
    "out_under_a_file": (["--out", "afile/r.json"], "--out afile/r.json: its folder afile is a file; expected a"),
    "out_a_folder": (["--out", "results"], "--out results is a folder; expected the path of a JSON file to write"),
}


@pytest.mark.parametrize("case", EVAL_REFUSALS)
def test_eval_refuses_counts_that_select_nothing_and_an_out_it_cannot_write(tmp_path, member, case):
    """Refused before the checkpoint loads: `--limit 0` was a torch.cat traceback, `--limit -1` quietly evaluated
    all but the last image, an --out under a file or naming a folder a traceback (the latter after the whole run)."""
    (tmp_path / "afile").write_text("not a folder")
    (tmp_path / "results").mkdir()
    extra, says = EVAL_REFUSALS[case]
    argv = ["eval", "--checkpoint", str(member), "--attacks", "clean", "--out", "r.json", *extra]
    refused(akd(*argv, cwd=tmp_path), "eval", says)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "results"]
    assert list((tmp_path / "results").iterdir()) == []


def test_eval_makes_the_folders_of_its_out(tmp_path, member):
    out = tmp_path / "new" / "deeper" / "r.json"
    argv = ["eval", "--checkpoint", str(member), "--attacks", "clean", "--limit", "10", "--out", str(out)]
    done = akd(*argv, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert out.is_file() and out.with_suffix(".reliability.png").is_file()


# --------------------------------------------------------------------------- tokens refused at start-up


def test_serve_refuses_an_empty_token_from_the_environment(tmp_path):
    """AKD_TOKEN="" was taken as a token every request then failed (401). The member is missing too: the token is
    refused first, in the config, before anything loads."""
    config = write_config(tmp_path / "t.toml", {"mnist": mnist_teacher([(tmp_path / "gone.pt", 1.0)])})
    done = akd("serve", "--config", str(config), cwd=tmp_path, env={"AKD_TOKEN": ""})
    refused(done, "serve", "server.token: the token is empty")


@pytest.mark.parametrize("token", ["", " ", "s3crét"], ids=["empty", "space", "non_ascii"])
def test_train_refuses_a_teacher_token_http_cannot_carry(tmp_path, token):
    """The trainer sent no header for an empty token (and httpx cannot send a non-ASCII one); the same rule as the
    service's. The rest is a run that would start (an ARD run, a service that is down, given up on at once): the
    token is refused first, in the config, before any data loads."""
    argv = ["--set", "method=ard", "--set", "teacher.url=http://127.0.0.1:9", "--set", "teacher.give_up_after_s=0.5"]
    done = akd("train", "--set", f"teacher.token={token!r}", *argv, cwd=tmp_path)
    stderr = refused(done, "train", "teacher.token: the token", "(value not shown)")
    assert not token.strip() or token not in stderr
    assert not (tmp_path / "runs").exists()
