"""Member files from anyone: loading one never runs code from it.

Each crafted file below plants a payload where its format reaches Python's
unpickler, `eval` or `exec`; the payload would write a marker file. Every test
asserts the marker is absent and the file is refused with a message that says
why, through the service's loader, `akd serve` and `akd eval` (which share it).
"""

from __future__ import annotations

import io
import json
import pickle
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import (
    HANG_S,
    REPO,
    export_member,
    mnist_teacher,
    random_inputs,
    robustbench_config,
    seeded_model,
    write_config,
)

from shared.safe_load import UnsafeFile, check_shape_expression, load_export
from teacher_service.config import ConfigError, load_config
from teacher_service.registry import load_teachers


class Plant:
    """Unpickling this writes `marker`: the proof that loading ran code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


def payload_code(marker: Path) -> str:
    return f"open({str(marker)!r}, 'w').write('ran')"


def torch_saved(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def rewrite(src: Path, dst: Path, edit) -> Path:
    """Copy a .pt2 archive entry by entry, letting `edit` change the entries (name -> bytes) on the way."""
    with zipfile.ZipFile(src) as archive:
        entries = {info.filename: archive.read(info) for info in archive.infolist()}
    prefix = next(iter(entries)).split("/", 1)[0] + "/"
    edit(entries, prefix)
    with zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return dst


def edit_json(entries: dict, name: str, change) -> None:
    document = json.loads(entries[name])
    change(document)
    entries[name] = json.dumps(document).encode()


def pickled_weight(marker):
    def edit(entries, prefix):
        edit_json(
            entries,
            prefix + "data/weights/model_weights_config.json",
            lambda d: d["config"]["net.0.weight"].update(use_pickle=True),
        )
        entries[prefix + "data/weights/weight_0"] = torch_saved(Plant(marker))

    return edit


def pickled_tensor_constant(marker):
    def edit(entries, prefix):
        edit_json(
            entries,
            prefix + "data/constants/model_constants_config.json",
            lambda d: d["config"].update(
                c0={"path_name": "tensor_0", "is_param": False, "use_pickle": True, "tensor_meta": None}
            ),
        )
        entries[prefix + "data/constants/tensor_0"] = torch_saved(Plant(marker))

    return edit


def pickled_object(kind: str):
    """A constant stored as a pickled Python object: torch.export names them `opaque_obj_*` and `custom_obj_*`."""

    def craft(marker):
        def edit(entries, prefix):
            edit_json(
                entries,
                prefix + "data/constants/model_constants_config.json",
                lambda d: d["config"].update(
                    c0={"path_name": f"{kind}_0", "is_param": False, "use_pickle": True, "tensor_meta": None}
                ),
            )
            entries[prefix + f"data/constants/{kind}_0"] = pickle.dumps(Plant(marker))

        return edit

    return craft


opaque_object, custom_object = pickled_object("opaque_obj"), pickled_object("custom_obj")


def sample_inputs(marker):
    def edit(entries, prefix):
        entries[prefix + "data/sample_inputs/model.pt"] = torch_saved(Plant(marker))

    return edit


def shape_expression(marker):
    def edit(entries, prefix):
        model = prefix + "models/model.json"
        text = entries[model].decode()
        honest = "Symbol('s31', positive=True, integer=True)"
        assert honest in text, "the honest export's batch symbol moved; update this test"
        entries[model] = text.replace(json.dumps(honest)[1:-1], json.dumps(payload_code(marker))[1:-1]).encode()

    return edit


def node_target(marker):
    def edit(entries, prefix):
        model = prefix + "models/model.json"
        entries[model] = entries[model].replace(b'"torch.ops.aten.relu.default"', b'"torch.os.system"')

    return edit


LOAD_REFUSALS = {
    "pickled_weight": (pickled_weight, "pickled Python objects"),
    "pickled_tensor_constant": (pickled_tensor_constant, "pickled Python objects"),
    "opaque_object": (opaque_object, "pickled Python object"),
    "custom_object": (custom_object, "pickled Python object"),
    "sample_inputs": (sample_inputs, "pickled Python objects"),
    "shape_expression": (shape_expression, "shape expression"),
    "node_target": (node_target, "'torch.os.system' is not a torch operator"),
}


@pytest.fixture
def honest_export(tmp_path) -> Path:
    return export_member(tmp_path / "honest.pt2", seed=3)


@pytest.mark.parametrize("kind", sorted(LOAD_REFUSALS))
def test_crafted_export_is_refused_and_runs_nothing(tmp_path, honest_export, kind):
    craft, says = LOAD_REFUSALS[kind]
    marker = tmp_path / "ran"
    crafted = rewrite(honest_export, tmp_path / f"{kind}.pt2", craft(marker))
    with pytest.raises(ValueError, match=says):
        load_export(crafted)
    assert not marker.exists()
    config = load_config(write_config(tmp_path / "t.toml", {"m": mnist_teacher([(crafted, 1.0)])}), environ={})
    with pytest.raises(ConfigError, match=r"teachers\.m\.members\[0\]") as info:
        load_teachers(config, torch.device("cpu"))
    assert str(crafted) in str(info.value)
    assert not marker.exists()


# Graph node targets an honest export never holds: Python functions, torch internals, names no registry holds.
FOREIGN_TARGETS = {
    "builtins.exec": "is not a torch operator",
    "_operator.attrgetter": "is not a torch operator",
    "_operator.methodcaller": "is not a torch operator",
    "torch._C._set_grad_enabled": "is not a torch operator",
    "torch.ops.load_library": "is not a torch operator",
    "#myext.run": "is not a torch operator",
    "torch.ops.aten.no_such_op.default": "is not an operator registered with torch",
    "torch.ops.no_such_namespace.relu.default": "is not an operator registered with torch",
    "torch.ops.aten.relu.no_such_overload": "is not an operator registered with torch",
    "torch.ops.higher_order.no_such_op": "is not an operator registered with torch",
}


@pytest.fixture(scope="module")
def shared_honest_export(tmp_path_factory) -> Path:
    return export_member(tmp_path_factory.mktemp("honest") / "honest.pt2", seed=3)


@pytest.mark.parametrize("target", sorted(FOREIGN_TARGETS))
def test_graph_node_calling_anything_but_a_registered_operator_is_refused(tmp_path, shared_honest_export, target):
    """Underscore names are fine (`aten._to_copy` is a real operator: tests/service/test_exports.py); what is refused
    is any name outside torch's operator registry and the symbolic-shape functions torch.export writes."""

    def retarget(entries, prefix):
        model = prefix + "models/model.json"
        assert b'"torch.ops.aten.relu.default"' in entries[model], "the honest export has no relu; update this test"
        entries[model] = entries[model].replace(b'"torch.ops.aten.relu.default"', json.dumps(target).encode())

    crafted = rewrite(shared_honest_export, tmp_path / "foreign.pt2", retarget)
    with pytest.raises(UnsafeFile, match=f"graph node target {re.escape(repr(target))} {FOREIGN_TARGETS[target]}"):
        load_export(crafted)


def test_operator_passed_as_an_argument_is_checked_like_a_target(tmp_path, shared_honest_export):
    def relu_takes_exec(document):
        relu = next(n for n in document["graph_module"]["graph"]["nodes"] if n["target"].endswith(".relu.default"))
        relu["inputs"][0]["arg"] = {"as_operator": "builtins.exec"}

    def as_argument(entries, prefix):
        edit_json(entries, prefix + "models/model.json", relu_takes_exec)

    crafted = rewrite(shared_honest_export, tmp_path / "argument.pt2", as_argument)
    with pytest.raises(UnsafeFile, match="'builtins.exec' is not a torch operator"):
        load_export(crafted)


def test_crafted_export_is_refused_even_when_the_environment_asks_torch_for_full_unpickling(
    tmp_path, honest_export, monkeypatch
):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "ran"
    crafted = rewrite(honest_export, tmp_path / "w.pt2", pickled_weight(marker))
    with pytest.raises(UnsafeFile):
        load_export(crafted)
    assert not marker.exists()
    import os

    # restored
    assert os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] == "1" and "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ


def test_stored_guard_code_is_never_compiled(tmp_path, honest_export):
    """Guards are code `.module()` would `exec`; the loader builds the module without them, and it still answers
    right."""
    marker = tmp_path / "ran"

    def guard(entries, prefix):
        edit_json(
            entries, prefix + "models/model.json", lambda d: d.update(guards_code=[f"{payload_code(marker)} > 0"])
        )

    crafted = rewrite(honest_export, tmp_path / "guard.pt2", guard)
    model = load_export(crafted)
    x = random_inputs(3)
    torch.testing.assert_close(model(x), seeded_model(3)(x))
    assert not marker.exists()


def test_legacy_archive_with_a_pickled_state_dict_is_refused(tmp_path):
    """The pre-2.8 layout torch.export.load still reads: its state dict is a torch.save file."""
    from torch._export.serde.schema import SCHEMA_VERSION
    from torch._export.serde.serialize import serialize

    model = seeded_model(3)
    program = torch.export.export(model, (random_inputs(4),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    artifact = serialize(program)
    marker = tmp_path / "ran"
    crafted = tmp_path / "legacy.pt2"
    with zipfile.ZipFile(crafted, "w") as archive:
        archive.writestr("version", ".".join(map(str, SCHEMA_VERSION)))
        archive.writestr("serialized_exported_program.json", artifact.exported_program)
        archive.writestr("serialized_state_dict.pt", torch_saved(Plant(marker)))
        archive.writestr("serialized_constants.pt", artifact.constants)
        archive.writestr("serialized_example_inputs.pt", artifact.example_inputs)
    with pytest.raises(ValueError):
        load_export(crafted)
    assert not marker.exists()


@pytest.mark.parametrize(
    "text",
    [
        "__import__('os').system('true')",
        "open('x', 'w')",
        "Symbol('s0').__class__",
        "lambda: 0",
        "Symbol('s0', **{'a': 1})",
        "[s0 for s0 in (1,)]",
        "Symbol('../../x')",
    ],
)
def test_shape_expressions_allow_arithmetic_over_symbols_only(text):
    with pytest.raises(UnsafeFile):
        check_shape_expression(text)


@pytest.mark.parametrize(
    "text",
    [
        "Symbol('s31', positive=True, integer=True)",
        "s0 + 2*s1",
        "Max(1, s0)",
        "FloorDiv(s0, 2) <= 64",
        "Mod(s0, 8)",
        "-s3 + 1.5",
    ],
)
def test_shape_expressions_torch_writes_pass(text):
    check_shape_expression(text)


def test_checkpoint_with_pickled_code_is_refused(tmp_path):
    marker = tmp_path / "ran"
    crafted = tmp_path / "evil.pt"
    crafted.write_bytes(torch_saved({"format": "akd-checkpoint/1", "arch": Plant(marker)}))
    config = load_config(write_config(tmp_path / "t.toml", {"m": mnist_teacher([(crafted, 1.0)])}), environ={})
    with pytest.raises(ConfigError, match="pickled Python objects, not only tensors"):
        load_teachers(config, torch.device("cpu"))
    assert not marker.exists()


def test_robustbench_weights_with_pickled_code_are_refused(tmp_path, fake_robustbench, monkeypatch):
    """robustbench calls plain `torch.load(path)`: the environment can make that a full unpickle, our loader cannot
    be."""
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "ran"
    weights = tmp_path / "models" / "mnist" / "Linf" / "Fake2024.pt"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(torch_saved({"state_dict": Plant(marker)}))
    config = load_config(robustbench_config(tmp_path), environ={})
    with pytest.raises(ConfigError, match="pickled Python objects, not only tensors"):
        load_teachers(config, torch.device("cpu"))
    assert not marker.exists()


def test_honest_export_made_as_the_readme_says_still_loads(honest_export):
    x = random_inputs(5)
    torch.testing.assert_close(load_export(honest_export)(x), seeded_model(3)(x))


@pytest.mark.parametrize("command", ["serve", "eval"])
def test_akd_refuses_a_crafted_export_in_one_line(tmp_path, honest_export, command):
    marker = tmp_path / "ran"
    crafted = rewrite(honest_export, tmp_path / "evil.pt2", opaque_object(marker))
    if command == "serve":
        argv = ["serve", "--config", str(write_config(tmp_path / "t.toml", {"m": mnist_teacher([(crafted, 1.0)])}))]
    else:
        argv = [
            "eval",
            "--checkpoint",
            str(crafted),
            "--set",
            "dataset=mnist5k",
            "--limit",
            "8",
            "--out",
            str(tmp_path / "e.json"),
        ]
    done = subprocess.run(
        [sys.executable, "-m", "akd", *argv], capture_output=True, text=True, cwd=REPO, timeout=HANG_S
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and "pickled Python object" in done.stderr
    assert not marker.exists()
