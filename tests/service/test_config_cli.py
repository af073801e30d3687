"""The config file, its precedence rules, start-up checks of the members, and the `akd serve` CLI.

Every unusable config is a `ConfigError` whose message names the field (or file) at
fault; the CLI turns it into exit code 2 and one message on stderr, no traceback.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch
from conftest import (
    HANG_S,
    REPO,
    ServerProcess,
    export_member,
    free_port,
    mnist_teacher,
    random_inputs,
    save_member,
    seeded_model,
    wait_healthy,
    write_config,
)

from shared.checkpoint import Checkpoint, save_checkpoint
from shared.codec import decode, encode_inputs
from teacher_service.app import create_app
from teacher_service.config import ConfigError, ServiceConfig, load_config

TEACHER = """
[teachers.mnist]
num_classes = 10
input_shape = [1, 28, 28]

[[teachers.mnist.members]]
path = "a.pt"
"""


def _member(extra: str) -> str:
    return f"""
[teachers.mnist]
num_classes = 10
input_shape = [1, 28, 28]

[[teachers.mnist.members]]
{extra}
"""


def _teacher(fields: str, member: str = 'path = "a.pt"') -> str:
    return f"""
[teachers.mnist]
{fields}

[[teachers.mnist.members]]
{member}
"""


def _clean_env(**extra: str) -> dict[str, str]:
    """The test process's environment without any AKD_* variable, plus `extra`."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith("AKD_")}, **extra}


# --------------------------------------------------------------------------- load_config errors

CONFIG_ERRORS = [
    # id, TOML text, substrings the ConfigError message must hold
    ("missing_teachers", "[server]\nport = 8000\n", ["teachers", "Field required"]),
    ("empty_teachers", "[teachers]\n", ["teachers", "at least 1"]),
    (
        "num_classes_1",
        _teacher("num_classes = 1\ninput_shape = [1, 28, 28]"),
        ["teachers.mnist.num_classes", "greater than or equal to 2", "got 1"],
    ),
    ("num_classes_missing", _teacher("input_shape = [1, 28, 28]"), ["teachers.mnist.num_classes", "Field required"]),
    ("input_shape_2d", _teacher("num_classes = 10\ninput_shape = [28, 28]"), ["teachers.mnist.input_shape"]),
    ("input_shape_zero", _teacher("num_classes = 10\ninput_shape = [0, 28, 28]"), ["teachers.mnist.input_shape"]),
    (
        "temperature_0",
        _teacher("num_classes = 10\ninput_shape = [1, 28, 28]\ntemperature = 0.0"),
        ["teachers.mnist.temperature", "greater than 0"],
    ),
    (
        "aggregate_unknown",
        _teacher('num_classes = 10\ninput_shape = [1, 28, 28]\naggregate = "median"'),
        ["teachers.mnist.aggregate", "'median'"],
    ),
    (
        "no_members",
        "[teachers.mnist]\nnum_classes = 10\ninput_shape = [1, 28, 28]\nmembers = []\n",
        ["teachers.mnist.members", "at least 1"],
    ),
    (
        "weight_0",
        _member('path = "a.pt"\nweight = 0.0'),
        ["teachers.mnist.members.0.weight", "greater than 0", "got 0.0"],
    ),
    (
        "weight_negative",
        _member('path = "a.pt"\nweight = -1.0'),
        ["teachers.mnist.members.0.weight", "greater than 0", "got -1.0"],
    ),
    ("weight_nan", _member('path = "a.pt"\nweight = nan'), ["teachers.mnist.members.0.weight", "finite"]),
    (
        "member_both_sources",
        _member('path = "a.pt"\nrobustbench = "Carmon2019Unlabeled"'),
        ["teachers.mnist.members.0", "exactly one of `path` or `robustbench`"],
    ),
    (
        "member_no_source",
        _member("weight = 1.0"),
        ["teachers.mnist.members.0", "exactly one of `path` or `robustbench`"],
    ),
    ("unknown_server_key", "[server]\nprot = 8000\n" + TEACHER, ["server.prot", "Extra inputs are not permitted"]),
    (
        "unknown_teacher_key",
        _teacher("num_classes = 10\ninput_shape = [1, 28, 28]\ntemprature = 2.0"),
        ["teachers.mnist.temprature", "Extra inputs are not permitted"],
    ),
    (
        "unknown_member_key",
        _member('path = "a.pt"\nwieght = 2.0'),
        ["teachers.mnist.members.0.wieght", "Extra inputs are not permitted"],
    ),
    ("unknown_top_level_table", "[servre]\nport = 8000\n" + TEACHER, ["servre", "Extra inputs are not permitted"]),
    ("port_out_of_range", "[server]\nport = 70000\n" + TEACHER, ["server.port", "70000"]),
    ("device_unknown", '[server]\ndevice = "tpu"\n' + TEACHER, ["server.device", "'tpu'"]),
    ("body_bytes_0", "[server.limits]\nbody_bytes = 0\n" + TEACHER, ["server.limits.body_bytes"]),
    ("invalid_toml", "[teachers.mnist\nnum_classes = 10\n", ["not valid TOML"]),
    ("invalid_toml_value", "[server]\nport = eighty\n", ["not valid TOML"]),
    ("server_not_a_table", "server = 5\n" + TEACHER, ["server"]),
]


@pytest.mark.parametrize(("text", "needles"), [pytest.param(t, n, id=i) for i, t, n in CONFIG_ERRORS])
def test_load_config_errors_name_the_field(tmp_path, text, needles):
    path = tmp_path / "teachers.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    message = str(info.value)
    assert str(path) in message
    for needle in needles:
        assert needle in message, (needle, message)


def test_missing_config_file(tmp_path):
    path = tmp_path / "nowhere" / "teachers.toml"
    with pytest.raises(ConfigError, match="does not exist") as info:
        load_config(path, environ={})
    assert str(path) in str(info.value)


def test_config_path_that_is_a_folder(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path, environ={})
    assert str(tmp_path) in str(info.value)


def test_config_file_that_is_not_utf8(tmp_path):
    path = tmp_path / "teachers.toml"
    path.write_bytes(b"\xff\xfe[teachers]\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert str(path) in str(info.value)


BAD_TOKENS = [
    ("empty", "", "the token is empty"),
    ("spaces", "   ", "the token is empty"),
    ("inner_space", "s3 cret", "a space at position 2"),
    ("non_ascii", "s3cr\u00e9t", "a non-ASCII character at position 4"),
    ("control", "s3\u0001cret", "a control character at position 2"),
]


@pytest.mark.parametrize("where", ["file", "environment"])
@pytest.mark.parametrize(("token", "says"), [pytest.param(t, s, id=i) for i, t, s in BAD_TOKENS])
def test_a_token_http_cannot_carry_unchanged_is_refused(tmp_path, where, token, says):
    """An empty token was accepted, then refused every request; a non-ASCII one matched only when sent as Latin-1.
    The rule: visible ASCII, at least one character. The value itself is never echoed."""
    path = tmp_path / "teachers.toml"
    in_file = f"[server]\ntoken = {json.dumps(token)}\n" if where == "file" else ""
    path.write_text(in_file + TEACHER)
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={} if where == "file" else {"AKD_TOKEN": token})
    message = str(info.value)
    assert "server.token" in message and says in message, message
    assert (not token.strip() or token not in message) and "(value not shown)" in message


def test_a_visible_ascii_token_is_kept_as_given(tmp_path):
    path = tmp_path / "teachers.toml"
    token = "A-z_0.9~+/=!$%&*#@^|"
    path.write_text(f"[server]\ntoken = {json.dumps(token)}\n" + TEACHER)
    assert load_config(path, environ={}).server.token == token


def test_a_cache_dir_that_is_a_file_is_a_config_error(tmp_path):
    path = tmp_path / "teachers.toml"
    path.write_text(TEACHER)
    (tmp_path / "afile").write_text("")
    for given in ("afile", "afile/sub"):
        with pytest.raises(ConfigError, match="is a file; expected a folder") as info:
            load_config(path, environ={"AKD_CACHE_DIR": str(tmp_path / given)})
        assert f"server.cache.dir: {tmp_path / given}" in str(info.value)
    assert load_config(path, environ={"AKD_CACHE_DIR": str(tmp_path / "new" / "cache")}).server.cache.dir


def test_a_config_file_over_the_bound_is_refused_before_it_is_parsed(tmp_path):
    """1 MiB is far more than any config holds; a file past it is refused as it is read, not parsed whole."""
    path = tmp_path / "teachers.toml"
    # valid TOML, just over 1 MiB
    path.write_text(TEACHER + ("#" * 1023 + "\n") * 1024)
    with pytest.raises(ConfigError, match=r"holds 1,048,\d+ bytes; a config file may hold at most 1,048,576 bytes"):
        load_config(path, environ={})
    # under it: read as ever
    path.write_text(TEACHER + ("#" * 1023 + "\n") * 1000)
    assert load_config(path, environ={}).teachers["mnist"].num_classes == 10


def test_every_problem_is_listed(tmp_path):
    path = tmp_path / "teachers.toml"
    path.write_text("[server]\nport = -1\n" + _member('path = "a.pt"\nweight = 0.0'))
    message = str(pytest.raises(ConfigError, load_config, path, environ={}).value)
    assert "server.port" in message
    assert "teachers.mnist.members.0.weight" in message


def test_bad_value_from_the_environment_names_the_field(tmp_path):
    path = tmp_path / "teachers.toml"
    path.write_text(TEACHER)
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={"AKD_PORT": "abc"})
    assert "server.port" in str(info.value)
    assert "'abc'" in str(info.value)


def test_unrelated_environment_variables_are_ignored(tmp_path):
    path = tmp_path / "teachers.toml"
    path.write_text(TEACHER)
    config = load_config(path, environ={"AKD_CONFIG": "elsewhere.toml", "AKD_NOPE": "1", "PORT": "1", "akd_port": "2"})
    assert config.server.port == 8000


# --------------------------------------------------------------------------- paths


def test_member_paths_resolve_against_the_config_folder(tmp_path, monkeypatch):
    project = tmp_path / "project"
    conf_dir = project / "conf"
    a = save_member(project / "weights" / "a.pt", seed=1)
    c = export_member(conf_dir / "local" / "c.pt2", seed=3)
    b = save_member(tmp_path / "abs" / "b.pt", seed=2)
    config_path = conf_dir / "teachers.toml"
    conf_dir.mkdir(parents=True, exist_ok=True)
    config_path.write_text(
        '[server]\ndevice = "cpu"\n'
        + _member('path = "../weights/a.pt"\nweight = 1.0')
        + '\n[[teachers.mnist.members]]\npath = "local/c.pt2"\n'
        + f'\n[[teachers.mnist.members]]\npath = "{b}"\nweight = 2.0\n'
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    # absolute, and relative to the cwd
    for given in (config_path, Path("../project/conf/teachers.toml")):
        config = load_config(given, environ={})
        paths = [m.path for m in config.teachers["mnist"].members]
        assert all(p.is_absolute() for p in paths), paths
        assert [p.resolve() for p in paths] == [a.resolve(), c.resolve(), b.resolve()]
        rb_dir = config.teachers["mnist"].members[0].robustbench_dir
        assert rb_dir.is_absolute() and rb_dir.resolve() == (conf_dir / "models").resolve()

    # and the members really load from there, with the cwd somewhere else
    app = create_app(config)
    teacher = app.state.service.teachers["mnist"]
    assert [m.source for m in teacher.members] == ["checkpoint", "export", "checkpoint"]
    assert [m.path.resolve() for m in teacher.members] == [a.resolve(), c.resolve(), b.resolve()]


def test_server_precedence_cli_over_set_over_env_over_file_over_default(tmp_path, monkeypatch):
    conf_dir = tmp_path / "conf"
    conf_dir.mkdir()
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    bare = conf_dir / "bare.toml"
    bare.write_text(TEACHER)
    filed = conf_dir / "filed.toml"
    filed.write_text('[server]\nport = 9100\nhost = "127.0.0.2"\n[server.cache]\ndir = "file-cache"\n' + TEACHER)
    env = {"AKD_PORT": "9200", "AKD_CACHE_DIR": "env-cache"}

    # default
    s = load_config(bare, environ={}).server
    assert (s.port, s.cache.dir, s.host) == (8000, None, "127.0.0.1")
    # [server] table; its relative cache.dir is relative to the config's folder
    s = load_config(filed, environ={}).server
    assert s.port == 9100 and s.host == "127.0.0.2"
    assert Path(s.cache.dir).is_absolute() and Path(s.cache.dir).resolve() == (conf_dir / "file-cache").resolve()
    # environment over the file; its relative cache.dir is relative to the working directory
    s = load_config(filed, environ=env).server
    assert s.port == 9200 and s.host == "127.0.0.2"
    assert Path(s.cache.dir).is_absolute() and Path(s.cache.dir).resolve() == (cwd / "env-cache").resolve()
    # environment over the default
    s = load_config(bare, environ=env).server
    assert s.port == 9200 and Path(s.cache.dir).resolve() == (cwd / "env-cache").resolve()
    # --set over the environment (also relative to the working directory)
    sets = ["server.port=9250", "server.cache.dir=set-cache"]
    s = load_config(filed, environ=env, sets=sets).server
    assert s.port == 9250 and s.host == "127.0.0.2"
    assert Path(s.cache.dir).is_absolute() and Path(s.cache.dir).resolve() == (cwd / "set-cache").resolve()
    # the command line's flags over --set (also relative to the working directory)
    s = load_config(filed, overrides={"port": 9300, "cache.dir": "cli-cache", "host": None}, environ=env, sets=sets)
    assert s.server.port == 9300 and s.server.host == "127.0.0.2"
    assert Path(s.server.cache.dir).resolve() == (cwd / "cli-cache").resolve()
    # a flag left unset (None) does not hide the environment or the file
    s = load_config(filed, overrides={"port": None, "cache.dir": None, "host": None}, environ=env).server
    assert s.port == 9200 and Path(s.cache.dir).resolve() == (cwd / "env-cache").resolve()
    s = load_config(filed, overrides={"port": None, "cache.dir": None, "host": None}, environ={}).server
    assert s.port == 9100 and Path(s.cache.dir).resolve() == (conf_dir / "file-cache").resolve()
    # environ=None reads the real environment
    monkeypatch.setenv("AKD_PORT", "9400")
    monkeypatch.setenv("AKD_HOST", "0.0.0.0")
    s = load_config(filed).server
    assert s.port == 9400 and s.host == "0.0.0.0"


def test_absolute_and_url_cache_dirs_are_kept(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    store = tmp_path / "abs-cache"
    path = tmp_path / "conf" / "teachers.toml"
    path.parent.mkdir()
    path.write_text(f'[server.cache]\ndir = "{store}"\n' + TEACHER)
    assert load_config(path, environ={}).server.cache.dir == str(store)
    path.write_text('[server.cache]\ndir = "s3://bucket/akd-cache"\n' + TEACHER)
    assert load_config(path, environ={}).server.cache.dir == "s3://bucket/akd-cache"
    assert load_config(path, environ={"AKD_CACHE_DIR": "memory://x"}).server.cache.dir == "memory://x"
    assert load_config(path, overrides={"cache.dir": str(store)}, environ={}).server.cache.dir == str(store)


def test_load_config_returns_a_service_config(tmp_path):
    path = write_config(tmp_path / "t.toml", {"mnist": mnist_teacher([(tmp_path / "a.pt", 3.0)], temperature=2.0)})
    config = load_config(path, environ={})
    assert isinstance(config, ServiceConfig)
    t = config.teachers["mnist"]
    assert (t.num_classes, t.input_shape, t.temperature, t.members[0].weight) == (10, (1, 28, 28), 2.0, 3.0)


# --------------------------------------------------------------------------- members that do not fit (create_app)


def _app_error(tmp_path: Path, teachers: dict) -> str:
    path = write_config(tmp_path / "teachers.toml", teachers, server={"device": "cpu"})
    config = load_config(path, environ={})
    with pytest.raises(ConfigError) as info:
        create_app(config)
    return str(info.value)


def test_checkpoint_with_other_num_classes(tmp_path):
    p = save_member(tmp_path / "five.pt", seed=1, num_classes=5)
    message = _app_error(tmp_path, {"mnist": mnist_teacher([(p, 1.0)])})
    assert "teachers.mnist.members[0]" in message
    assert str(p) in message
    assert "5 classes" in message and "10 classes" in message


def test_checkpoint_with_other_input_shape(tmp_path):
    p = save_member(tmp_path / "rgb.pt", seed=1, shape=(3, 32, 32))
    message = _app_error(tmp_path, {"mnist": mnist_teacher([(p, 1.0)])})
    assert "teachers.mnist.members[0]" in message and str(p) in message
    assert "(3, 32, 32)" in message and "(1, 28, 28)" in message


def test_export_with_other_num_classes(tmp_path):
    p = export_member(tmp_path / "c.pt2", seed=3)
    message = _app_error(tmp_path, {"mnist": {**mnist_teacher([(p, 1.0)]), "num_classes": 5}})
    assert "teachers.mnist.members[0]" in message and str(p) in message
    assert "(2, 10)" in message and "(2, 5)" in message


def test_export_with_other_input_shape(tmp_path):
    p = export_member(tmp_path / "c.pt2", seed=3)
    message = _app_error(tmp_path, {"mnist": {**mnist_teacher([(p, 1.0)]), "input_shape": [3, 32, 32]}})
    assert "teachers.mnist.members[0]" in message and str(p) in message
    assert "(2, 3, 32, 32)" in message


def test_shared_member_that_does_not_fit_the_second_teacher(tmp_path):
    """One file in two teachers is loaded once, but must still be checked against each teacher."""
    p = save_member(tmp_path / "a.pt", seed=1)
    message = _app_error(
        tmp_path,
        {
            "ten": mnist_teacher([(p, 1.0)]),
            "five": {**mnist_teacher([(p, 1.0)]), "num_classes": 5},
        },
    )
    assert "teachers.five.members[0]" in message
    assert "10" in message and "5" in message


def test_missing_member_file_names_the_path(tmp_path):
    a = save_member(tmp_path / "a.pt", seed=1)
    missing = tmp_path / "gone" / "b.pt"
    message = _app_error(tmp_path, {"mnist": mnist_teacher([(a, 1.0), (missing, 1.0)])})
    assert "teachers.mnist.members[1]" in message
    assert str(missing) in message and "does not exist" in message


def test_missing_robustbench_file_names_the_path(tmp_path):
    path = tmp_path / "teachers.toml"
    path.write_text('[server]\ndevice = "cpu"\n' + _member('robustbench = "Carmon2019Unlabeled"'))
    config = load_config(path, environ={})
    with pytest.raises(ConfigError) as info:
        create_app(config)
    expected = tmp_path / "models" / "cifar10" / "Linf" / "Carmon2019Unlabeled.pt"
    assert str(expected) in str(info.value)
    assert "teachers.mnist.members[0]" in str(info.value)


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (lambda tmp: tmp, "is a directory, not a weights file"),
        (lambda tmp: Path("/dev/zero"), "is not a regular file"),
    ],
    ids=["directory", "dev_zero"],
)
def test_member_that_is_not_a_file_says_what_it_is(tmp_path, make, says):
    """Not "does not exist": it does. And /dev/zero is never read (hashing it would not end)."""
    message = _app_error(tmp_path, {"mnist": mnist_teacher([(make(tmp_path), 1.0)])})
    assert says in message and "does not exist" not in message


def test_file_url_cache_is_the_folder_it_names(tmp_path, mnist_members):
    """`file://` stores used to fail at start-up or on every chunk write, and skipped the two-writer lock."""
    from teacher_service.cache.folder_lock import StoreLocked

    folder = tmp_path / "cache dir"
    config_path = write_config(
        tmp_path / "t.toml",
        {"mnist": mnist_teacher([(mnist_members["a"], 1.0)])},
        {"device": "cpu", "cache": {"dir": folder.as_uri()}},
    )
    config = load_config(config_path, environ={})
    assert config.server.cache.dir == str(folder)
    app = create_app(config)
    with pytest.raises(StoreLocked):
        create_app(config)
    service = app.state.service
    ns = service.cache.namespace("v", 3)
    ns.insert([b"k" * 16], torch.ones(1, 3).numpy())
    service.cache.close()
    assert (folder / "v" / "zarr.json").is_file()


@pytest.mark.parametrize("url", ["file://elsewhere/cache", "file:relative", "file:///c?x=1"])
def test_file_url_that_names_no_local_absolute_folder_is_refused(tmp_path, url):
    path = write_config(
        tmp_path / "t.toml", {"mnist": mnist_teacher([(tmp_path / "a.pt", 1.0)])}, {"cache": {"dir": url}}
    )
    with pytest.raises(ConfigError, match="file:///path/to/cache"):
        load_config(path, environ={})


def _garbage(path: Path) -> Path:
    path.write_bytes(b"definitely not a model")
    return path


def _not_akd(path: Path) -> Path:
    torch.save({"hello": 1}, path)
    return path


def _unknown_arch(path: Path) -> Path:
    save_checkpoint(path, Checkpoint("no_such_arch", 10, (1, 28, 28), seeded_model(1).state_dict()))
    return path


def _wrong_state_dict(path: Path) -> Path:
    save_checkpoint(path, Checkpoint("small_cnn", 10, (1, 28, 28), {"x": torch.zeros(1)}))
    return path


@pytest.mark.parametrize(
    ("name", "make"),
    [
        ("garbage.pt", _garbage),
        ("garbage.pt2", _garbage),
        ("not_akd.pt", _not_akd),
        ("unknown_arch.pt", _unknown_arch),
        ("wrong_state_dict.pt", _wrong_state_dict),
    ],
    ids=["garbage_checkpoint", "garbage_export", "not_an_akd_checkpoint", "unknown_arch", "wrong_state_dict"],
)
def test_unreadable_member_is_a_config_error(tmp_path, name, make):
    p = make(tmp_path / name)
    message = _app_error(tmp_path, {"mnist": mnist_teacher([(p, 1.0)])})
    assert "teachers.mnist.members[0]" in message
    assert str(p) in message


# --------------------------------------------------------------------------- the CLI

AKD_SCRIPT = Path(sys.executable).parent / "akd"
COMMANDS = {
    "python_m_akd": [sys.executable, "-m", "akd", "serve"],
    "akd_script": [str(AKD_SCRIPT), "serve"],
    "python_m_teacher_service": [sys.executable, "-m", "teacher_service"],
}


def _bad_configs(tmp_path: Path) -> dict[str, tuple[Path, list[str]]]:
    bad_field = tmp_path / "bad_field.toml"
    bad_field.write_text(_teacher("num_classes = 1\ninput_shape = [1, 28, 28]"))
    missing_member = write_config(
        tmp_path / "missing_member.toml", {"mnist": mnist_teacher([(tmp_path / "gone.pt", 1.0)])}, {"device": "cpu"}
    )
    return {
        "bad_field": (bad_field, ["teachers.mnist.num_classes"]),
        "missing_member": (missing_member, ["does not exist", str(tmp_path / "gone.pt")]),
        "missing_config": (tmp_path / "nope.toml", ["does not exist", str(tmp_path / "nope.toml")]),
        "invalid_toml": (_write(tmp_path / "broken.toml", "[teachers\n"), ["not valid TOML"]),
    }


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _run_cli(argv: list[str], env: dict | None = None, timeout: float = HANG_S) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, cwd=REPO, env=env or _clean_env(), timeout=timeout)


CLI_CASES = [
    *[(command, kind) for command in COMMANDS for kind in ("bad_field", "missing_member")],
    ("python_m_akd", "missing_config"),
    ("akd_script", "invalid_toml"),
]


@pytest.mark.parametrize(("command", "kind"), CLI_CASES, ids=[f"{c}-{k}" for c, k in CLI_CASES])
def test_cli_bad_config_exits_2_without_traceback(tmp_path, command, kind):
    if command == "akd_script":
        assert AKD_SCRIPT.exists(), f"the akd console script is not installed next to {sys.executable}"
    path, needles = _bad_configs(tmp_path)[kind]
    result = _run_cli([*COMMANDS[command], "--config", str(path)])
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith("akd serve: "), result.stderr
    for needle in needles:
        assert needle in result.stderr, (needle, result.stderr)
    assert result.stdout == ""


def test_cli_needs_a_config(tmp_path):
    result = _run_cli([*COMMANDS["python_m_akd"]])
    assert result.returncode == 2
    assert "--config" in result.stderr and "Traceback" not in result.stderr


def test_cli_reads_the_config_path_from_akd_config(tmp_path):
    path, needles = _bad_configs(tmp_path)["bad_field"]
    result = _run_cli([str(AKD_SCRIPT), "serve"], env=_clean_env(AKD_CONFIG=str(path)))
    assert result.returncode == 2
    assert "teachers.mnist.num_classes" in result.stderr and "Traceback" not in result.stderr


def test_cli_bad_flag_is_a_usage_error(tmp_path):
    result = _run_cli([*COMMANDS["python_m_akd"], "--config", "x.toml", "--port", "eighty"])
    assert result.returncode == 2
    assert "--port" in result.stderr and "Traceback" not in result.stderr


@pytest.fixture
def relative_config(tmp_path) -> tuple[Path, Path]:
    """A config whose members are given relative to its folder (the servers run with another cwd)."""
    conf_dir = tmp_path / "conf"
    save_member(conf_dir / "weights" / "a.pt", seed=1)
    export_member(conf_dir / "weights" / "c.pt2", seed=3)
    path = conf_dir / "teachers.toml"
    path.write_text(
        f'[server]\ndevice = "cpu"\nport = {free_port()}\n'
        + _member('path = "weights/a.pt"\nweight = 1.0')
        + '\n[[teachers.mnist.members]]\npath = "weights/c.pt2"\nweight = 3.0\n'
    )
    return path, conf_dir


def _check_serving(base: str, conf_dir: Path) -> None:
    health = httpx.get(base + "/healthz", timeout=HANG_S)
    assert health.status_code == 200
    assert health.json()["status"] == "ok" and health.json()["teachers"] == ["mnist"]
    teachers = httpx.get(base + "/teachers", timeout=HANG_S)
    assert teachers.status_code == 200
    (info,) = teachers.json()["teachers"]
    assert info["name"] == "mnist" and info["num_classes"] == 10 and info["input_shape"] == [1, 28, 28]
    assert [Path(m["path"]).resolve() for m in info["members"]] == [
        (conf_dir / "weights" / "a.pt").resolve(),
        (conf_dir / "weights" / "c.pt2").resolve(),
    ]
    assert [m["weight"] for m in info["members"]] == pytest.approx([0.25, 0.75])
    r = httpx.post(base + "/soft-targets", content=encode_inputs(random_inputs(2, seed=4)), timeout=HANG_S)
    assert r.status_code == 200, r.text
    assert decode(r.content)["probs"].shape == (2, 10)


def test_python_m_teacher_service_serves_and_stops_on_sigterm(tmp_path, relative_config):
    """`--port` beats $AKD_PORT (a port that would not even bind) and the file's port."""
    path, conf_dir = relative_config
    server = ServerProcess(path, tmp_path / "server.log", env={"AKD_PORT": "1"})
    try:
        _check_serving(server.base, conf_dir)
        assert server.stop(), (server.proc.returncode, (tmp_path / "server.log").read_text()[-3000:])
        assert server.proc.returncode in (0, -signal.SIGTERM)
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait(timeout=HANG_S)
    log = (tmp_path / "server.log").read_text()
    assert "Traceback" not in log
    assert "Application shutdown complete" in log


def test_akd_serve_takes_port_and_cache_dir_from_the_environment(tmp_path, relative_config):
    """No --port: $AKD_PORT beats the file's port; a relative $AKD_CACHE_DIR lands in the cwd."""
    path, conf_dir = relative_config
    port = free_port()
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    log_path = tmp_path / "akd.log"
    env = _clean_env(AKD_PORT=str(port), AKD_CACHE_DIR="env-cache")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [str(AKD_SCRIPT), "serve", "--config", str(path)], stdout=log, stderr=subprocess.STDOUT, cwd=cwd, env=env
        )
        try:
            base = f"http://127.0.0.1:{port}"
            wait_healthy(base, alive=lambda: proc.poll() is None, timeout_s=HANG_S)
            _check_serving(base, conf_dir)
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=HANG_S)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=HANG_S)
    text = log_path.read_text()
    assert code in (0, -signal.SIGTERM), (code, text[-3000:])
    assert "Application shutdown complete" in text and "Traceback" not in text
    assert (cwd / "env-cache").is_dir()
    assert not (conf_dir / "env-cache").exists()


@pytest.mark.parametrize(
    "argv,imported", [(["serve", "--help"], ["teacher_service"]), (["--help"], []), (["bench", "--help"], ["bench"])]
)
def test_akd_imports_only_the_subcommand_it_runs(argv, imported):
    """An image without bench once could not even serve (`from bench import cli` ran first): each side loads alone."""
    code = (
        "import sys\nfrom akd.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'bench', 'student_trainer', 'teacher_service'}))"
    )
    done = _run_cli([sys.executable, "-c", code, *argv])
    assert done.stdout.strip().splitlines()[-1] == str(imported), done.stderr
