"""The Open Inference Protocol (KServe v2) beside the native API, driven by the field's own client, tritonclient.http,
unchanged: health, metadata, JSON and binary infer, and the native route's answers for the same rows. A real service
under uvicorn on loopback, the real tritonclient (geventhttpclient) and httpx; one small-CNN ensemble, a few rows.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import tritonclient.http as triton
import tritonclient.utils.shared_memory as shm
from conftest import HANG_S, live_server, mnist_teacher, random_inputs, save_member, write_config
from tritonclient.utils import InferenceServerException

from shared import codec, oip

REPO = Path(__file__).resolve().parents[2]
# the address the docs' examples name
EXAMPLE = "127.0.0.1:8000"
TOKEN = "s3cret"
MAX_REGIONS = 3


def auth() -> dict[str, str]:
    """A new dict each call: tritonclient adds its own headers to the dict it is given."""
    return {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The service's address, and its app (in this process)."""
    folder = tmp_path_factory.mktemp("oip")
    members = [(save_member(folder / "a.pt", seed=1), 1.0), (save_member(folder / "b.pt", seed=2), 3.0)]
    server = {"token": TOKEN, "cache": {"dir": "c"}, "shared_memory": {"max_regions": MAX_REGIONS, "sweep_s": 0.2}}
    config = write_config(folder / "t.toml", {"ens": mnist_teacher(members, temperature=2.0)}, server)
    with live_server(config) as (base, app):
        yield base, app


@pytest.fixture(scope="module")
def service(served):
    return served[0]


@pytest.fixture
def client(service):
    c = triton.InferenceServerClient(service.removeprefix("http://"), network_timeout=HANG_S)
    yield c
    c.close()


def native(base: str, x: torch.Tensor, outputs: str = "probs,logits,member_logits", **params) -> dict:
    r = httpx.post(
        f"{base}/soft-targets",
        content=codec.encode_inputs(x) if x.dtype == torch.float32 else codec.encode({"inputs": x}),
        params={"outputs": outputs, **params},
        headers=auth(),
        timeout=HANG_S,
    )
    assert r.status_code == 200, r.text
    return {k: v.numpy() for k, v in codec.decode(r.content).items()}


def infer_input(x: torch.Tensor, binary: bool = True) -> triton.InferInput:
    datatype = {torch.uint8: "UINT8", torch.float16: "FP16", torch.float32: "FP32"}[x.dtype]
    given = triton.InferInput("inputs", list(x.shape), datatype)
    given.set_data_from_numpy(x.numpy(), binary_data=binary)
    return given


def test_health_and_metadata_as_tritonclient_reads_them(client):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("ens", headers=auth())
    server = client.get_server_metadata(headers=auth())
    assert server["name"] == "akd" and "binary_tensor_data" in server["extensions"]
    meta = client.get_model_metadata("ens", headers=auth())
    assert meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "inputs", "datatype": "FP32", "shape": [-1, 1, 28, 28]}]
    assert [(o["name"], o["shape"]) for o in meta["outputs"]] == [
        ("probs", [-1, 10]),
        ("logits", [-1, 10]),
        ("member_logits", [2, -1, 10]),
    ]
    assert client.get_model_metadata("ens", model_version="1", headers=auth())["name"] == "ens"


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float16, torch.float32])
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_infer_answers_what_the_native_route_answers(service, client, dtype, binary):
    x = random_inputs(5, dtype=dtype, seed=3)
    outputs = [triton.InferRequestedOutput(n, binary_data=binary) for n in ("probs", "logits", "member_logits")]
    result = client.infer("ens", [infer_input(x, binary)], outputs=outputs, headers=auth())
    expected = native(service, x)
    for name, want in expected.items():
        got = result.as_numpy(name)
        assert got.shape == want.shape and got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert result.get_response()["model_name"] == "ens"


def test_parameters_carry_temperature_and_cache_and_no_outputs_means_all_binary(service, client):
    x = random_inputs(3, seed=4)
    result = client.infer(
        "ens", [infer_input(x)], headers=auth(), parameters={"temperature": 4.0, "cache": "bypass"}, request_id="r7"
    )
    response = result.get_response()
    assert response["id"] == "r7"
    assert [o["name"] for o in response["outputs"]] == ["probs", "logits", "member_logits"]
    assert all("binary_data_size" in o["parameters"] for o in response["outputs"])
    np.testing.assert_allclose(
        result.as_numpy("probs"), native(service, x, "probs", temperature=4.0)["probs"], rtol=0, atol=1e-6
    )


def test_refusals_are_the_protocols_errors_and_the_service_keeps_serving(service, client):
    x = random_inputs(2, seed=5)
    with pytest.raises(InferenceServerException, match="unauthorized|bearer token"):
        client.infer("ens", [infer_input(x)])
    with pytest.raises(InferenceServerException, match="no teacher named 'nope'") as unknown:
        client.infer("nope", [infer_input(x)], headers=auth())
    assert unknown.value.status() == "404"
    with pytest.raises(InferenceServerException, match="one version") as version:
        client.infer("ens", [infer_input(x)], model_version="2", headers=auth())
    assert version.value.status() == "404"
    wrong = triton.InferInput("inputs", [2, 1, 28, 27], "FP32")
    wrong.set_data_from_numpy(np.zeros((2, 1, 28, 27), np.float32))
    with pytest.raises(InferenceServerException, match="shape") as shape:
        client.infer("ens", [wrong], headers=auth())
    assert shape.value.status() == "422"
    with pytest.raises(InferenceServerException, match="temperature") as tau:
        client.infer("ens", [infer_input(x)], headers=auth(), parameters={"temperature": -1.0})
    assert tau.value.status() == "400"
    with pytest.raises(InferenceServerException, match="unknown outputs"):
        client.infer("ens", [infer_input(x)], outputs=[triton.InferRequestedOutput("scores")], headers=auth())
    # still serving
    assert client.infer("ens", [infer_input(x)], headers=auth()).as_numpy("probs").shape == (2, 10)


@pytest.mark.parametrize(
    ("body", "headers", "says"),
    [
        (b"{not json", {}, "does not parse"),
        (b'{"inputs": 3}', {}, "inputs"),
        (b'{"inputs": [{"name": "inputs", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [1, 2]}]}', {}, "784"),
        (
            b'{"inputs": [{"name": "inputs", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": ["a"]}]}',
            {},
            "non-numeric",
        ),
        (b'{"inputs": [{"name": "inputs", "shape": [1, 1, 28, 28], "datatype": "FP32"}]}', {}, "one place"),
        (b"{}" + bytes(8), {oip.HEADER_INFER_LENGTH: "99999"}, "Inference-Header-Content-Length"),
        (
            b'{"inputs": [{"name": "inputs", "shape": [1, 1, 28, 28], "datatype": "FP32", '
            b'"parameters": {"binary_data_size": 3136}}]}',
            {},
            "binary data",
        ),
    ],
    ids=["not-json", "not-a-request", "too-few-values", "strings", "no-values", "header-past-body", "binary-missing"],
)
def test_hostile_bodies_get_a_clear_400(service, body, headers, says):
    r = httpx.post(f"{service}/v2/models/ens/infer", content=body, headers={**auth(), **headers}, timeout=HANG_S)
    assert r.status_code == 400, r.text
    error = r.json()
    assert isinstance(error["error"], str) and says in error["error"], error


def test_v2_probes_are_open_and_the_rest_needs_the_token(service):
    assert httpx.get(f"{service}{oip.LIVE_PATH}", timeout=HANG_S).status_code == 200
    assert httpx.get(f"{service}{oip.READY_PATH}", timeout=HANG_S).status_code == 200
    refused = httpx.get(f"{service}/v2/models/ens", timeout=HANG_S)
    assert refused.status_code == 401 and "token" in refused.json()["error"]


@pytest.fixture
def regions(client):
    """Two segments as tritonclient makes them (inputs, answers), registered; unregistered and unlinked after."""
    made = {}

    def make(name: str, nbytes: int, register: bool = True):
        made[name] = shm.create_shared_memory_region(name, f"/akd-test-{name}", nbytes)
        if register:
            client.register_system_shared_memory(name, f"/akd-test-{name}", nbytes, headers=auth())
        return made[name]

    yield make
    client.unregister_system_shared_memory(headers=auth())
    for handle in made.values():
        shm.destroy_shared_memory_region(handle)


def test_shared_memory_infer_answers_what_the_native_route_answers(service, client, regions, caplog):
    x = random_inputs(6, seed=6)
    inputs = regions("in", x.numel() * 4)
    answers = regions("out", 6 * 10 * 4 * 4)
    shm.set_shared_memory_region(inputs, [x.numpy()])
    given = triton.InferInput("inputs", list(x.shape), "FP32")
    given.set_shared_memory("in", x.numel() * 4)
    probs, logits = triton.InferRequestedOutput("probs"), triton.InferRequestedOutput("logits")
    probs.set_shared_memory("out", 240)
    logits.set_shared_memory("out", 240, offset=240)
    result = client.infer("ens", [given], outputs=[probs, logits], headers=auth())
    # the answer carries no bytes: they are in the region
    assert result.get_output("probs")["parameters"] == {"shared_memory_region": "out", "shared_memory_byte_size": 240}
    expected = native(service, x)
    np.testing.assert_allclose(shm.get_contents_as_numpy(answers, np.float32, [6, 10]), expected["probs"], atol=1e-6)
    np.testing.assert_allclose(
        shm.get_contents_as_numpy(answers, np.float32, [6, 10], offset=240), expected["logits"], atol=1e-6
    )
    # cache=bypass: the rows are read where they lie, the region held until they are answered, and let go after
    client.infer("ens", [given], outputs=[probs], headers=auth(), parameters={"cache": "bypass"})
    np.testing.assert_allclose(shm.get_contents_as_numpy(answers, np.float32, [6, 10]), expected["probs"], atol=1e-6)
    assert "kept past its use" not in caplog.text
    status = client.get_system_shared_memory_status(headers=auth())
    assert sorted(r["name"] for r in status) == ["in", "out"]
    client.unregister_system_shared_memory("in", headers=auth())
    with pytest.raises(InferenceServerException, match="in") as gone:
        client.infer("ens", [given], outputs=[probs], headers=auth())
    assert gone.value.status() == "400"


def test_shared_memory_refusals(service, client, regions):
    x = random_inputs(2, seed=7)
    regions("small", 64)
    regions("spare", 64, register=False)
    refusals = {
        "a missing key": lambda: client.register_system_shared_memory("k", "/akd-test-none", 64, headers=auth()),
        "a path for a key": lambda: client.register_system_shared_memory("k", "/../etc/passwd", 64, headers=auth()),
        "past the segment's end": lambda: client.register_system_shared_memory(
            "k", "/akd-test-spare", 64, offset=8, headers=auth()
        ),
        "a name taken": lambda: client.register_system_shared_memory("small", "/akd-test-spare", 64, headers=auth()),
        "a range another region holds": lambda: client.register_system_shared_memory(
            "alias", "/akd-test-small", 32, headers=auth()
        ),
    }
    for what, call in refusals.items():
        with pytest.raises(InferenceServerException) as refused:
            call()
        assert refused.value.status() in ("400", "403"), what
    given = triton.InferInput("inputs", list(x.shape), "FP32")
    # 64 bytes are not two 784-pixel rows
    given.set_shared_memory("small", 64)
    with pytest.raises(InferenceServerException, match="shared_memory_byte_size") as mismatch:
        client.infer("ens", [given], headers=auth())
    assert mismatch.value.status() == "400"
    too_small = triton.InferRequestedOutput("probs")
    too_small.set_shared_memory("small", 64)
    with pytest.raises(InferenceServerException, match="smaller than the output"):
        client.infer("ens", [infer_input(x)], outputs=[too_small], headers=auth())
    # the bound on regions: MAX_REGIONS at once
    for i in range(MAX_REGIONS - 1):
        regions(f"fill{i}", 64)
    with pytest.raises(InferenceServerException) as full:
        regions("over", 64)
    assert full.value.status() == "429"
    # everyone else is still served
    assert client.infer("ens", [infer_input(x)], headers=auth()).as_numpy("probs").shape == (2, 10)


KILLED_CLIENT = """
import sys, time, httpx
from multiprocessing import shared_memory
segment = shared_memory.SharedMemory("akd-test-killed", create=True, size=4096)
r = httpx.post(sys.argv[1] + "/v2/systemsharedmemory/region/killed/register",
               json={"key": "/akd-test-killed", "offset": 0, "byte_size": 4096},
               headers={"Authorization": "Bearer %s"})
print(r.status_code, flush=True)
time.sleep(600)
"""


def test_a_client_killed_leaves_no_region_behind(service, client):
    status = lambda: [r["name"] for r in client.get_system_shared_memory_status(headers=auth())]  # noqa: E731
    proc = subprocess.Popen([sys.executable, "-c", KILLED_CLIENT % TOKEN, service], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "200"
        assert "killed" in status()
    finally:
        proc.kill()
        proc.wait(timeout=HANG_S)
    try:
        deadline = time.monotonic() + HANG_S
        while "killed" in status() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "killed" not in status()
    finally:
        # kill -9 unlinks nothing: the segment is the test's to remove
        with contextlib.suppress(FileNotFoundError):
            os.unlink("/dev/shm/akd-test-killed")


def marked_block(path, mark: str) -> str:
    """The python block after `mark` in a doc."""
    return re.search(re.escape(mark) + r"\s*```python\n(.*?)```", path.read_text(), re.S).group(1)


def test_the_docs_tritonclient_examples_run_as_written(tmp_path):
    """The README's tritonclient block and docs/api.md's shared-memory block, run as written but for the address,
    against a service without a token serving the teacher they name: each answers the native route's soft targets."""
    members = [(save_member(tmp_path / "a.pt", seed=1), 1.0)]
    config = write_config(tmp_path / "t.toml", {"mnist": mnist_teacher(members)})
    with live_server(config) as (base, _):
        address = base.removeprefix("http://")
        x = random_inputs(4, seed=8).numpy()
        names = {"x": x}
        exec(marked_block(REPO / "README.md", "<!-- tritonclient-example -->").replace(EXAMPLE, address), names)
        np.testing.assert_allclose(
            names["soft"], native(base, torch.from_numpy(x), "probs", temperature=4.0)["probs"], atol=1e-6
        )
        names = {}
        block = marked_block(REPO / "docs" / "api.md", "<!-- shm-example -->").replace(EXAMPLE, address)
        try:
            exec(block, names)
            np.testing.assert_allclose(
                names["soft"], native(base, torch.from_numpy(names["x"]), "probs")["probs"], atol=1e-6
            )
        finally:
            if "region" in names:
                names["client"].unregister_system_shared_memory()
                shm.destroy_shared_memory_region(names["region"])


def test_a_client_whose_memory_the_service_cannot_see_sends_bodies(served, tmp_path, monkeypatch, caplog):
    """Another host (or a container with its own /dev/shm): registering the client's region is refused (its key is not
    there), and the client sends the rows in bodies from then on, with the same answers. The service's shm folder
    is pointed elsewhere here: the one way to be another host on one machine."""
    from shared.client import TeacherClient

    service, app = served
    caplog.set_level(logging.INFO, logger="akd.client")
    monkeypatch.setattr(app.state.service.regions, "shm_dir", tmp_path)
    x = random_inputs(4, seed=9)
    with TeacherClient(service, "ens", token=TOKEN, timeout_s=HANG_S) as teacher:
        teacher.info()
        assert teacher.shared_memory
        probs = teacher.soft_targets(x.numpy())
        assert not teacher.shared_memory and teacher.region is None
    assert "does not take this process's shared memory" in caplog.text
    np.testing.assert_allclose(probs, native(service, x, "probs")["probs"], atol=1e-6)
