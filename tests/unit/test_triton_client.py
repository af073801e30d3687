"""The bench's own Triton client speaks Triton's binary-tensor protocol as tritonclient does, reads only well-formed
answers, and `akd bench` says how to get Triton where it is missing. No server, no Triton: milliseconds."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bench import servers, triton_client

# tritonclient 2.73's `InferenceServerClient.generate_request_body` for a float32 (16, 1, 28, 28) input `inputs`
# (binary) and the output `probs` (binary): its JSON header, 172 bytes, then the rows' bytes
TRITONCLIENT_HEADER = (
    b'{"inputs":[{"name":"inputs","shape":[16,1,28,28],"datatype":"FP32","parameters":{"binary_data_size":50176}}],'
    b'"outputs":[{"name":"probs","parameters":{"binary_data":true}}]}'
)


def answer(probs: np.ndarray, before: bytes = b"") -> tuple[bytes, dict[str, str]]:
    """A Triton infer answer holding `probs`, after another binary output of `before`'s bytes."""
    binary = lambda name, datatype, shape, size: {  # noqa: E731
        "name": name,
        "datatype": datatype,
        "shape": shape,
        "parameters": {"binary_data_size": size},
    }
    outputs = [binary("probs", "FP32", list(probs.shape), probs.nbytes)]
    if before:
        outputs.insert(0, binary("other", "UINT8", [len(before)], len(before)))
    header = json.dumps({"model_name": "m", "model_version": "1", "outputs": outputs}).encode()
    return header + before + probs.astype("<f4").tobytes(), {"inference-header-content-length": str(len(header))}


def test_an_infer_request_is_byte_for_byte_tritonclients():
    x = torch.rand(16, 1, 28, 28)
    path, body, headers = triton_client.infer_request("small_cnn", x)
    assert path == "/v2/models/small_cnn/infer"
    assert body == TRITONCLIENT_HEADER + x.numpy().tobytes()
    assert headers == {"Inference-Header-Content-Length": str(len(TRITONCLIENT_HEADER))}
    # a numpy batch, not contiguous: the same bytes as its contiguous copy
    flipped = x.numpy()[:, :, ::-1]
    _, flipped_body, _ = triton_client.infer_request("small_cnn", flipped)
    assert flipped_body == TRITONCLIENT_HEADER + np.ascontiguousarray(flipped).tobytes()
    with pytest.raises(ValueError, match="float32"):
        triton_client.infer_request("small_cnn", x.double())


def test_an_answers_probs_are_read_after_the_outputs_before_them():
    probs = np.random.default_rng(0).random((3, 10), dtype=np.float32)
    body, headers = answer(probs, before=b"\x01\x02\x03")
    read = triton_client.read_probs(body, headers)
    assert read.dtype == np.float32 and np.array_equal(read, probs)


@pytest.mark.parametrize(
    "broken, match",
    [
        (lambda body, headers: (body[:-4], headers), "of shape \\[3, 10\\] came with 116 bytes"),
        (lambda body, headers: (body, {"Inference-Header-Content-Length": "100000"}), "for a body of"),
        (lambda body, headers: (b'{"error":"model not ready"}', {}), "Triton answered an error: model not ready"),
        (lambda body, headers: (b"<html>busy</html>", {}), "not a Triton infer answer"),
        (lambda body, headers: (b'{"outputs":[]}', {}), "no 'probs' output"),
    ],
)
def test_an_answer_that_is_not_one_is_refused(broken, match):
    body, headers = answer(np.zeros((3, 10), dtype=np.float32))
    with pytest.raises(ValueError, match=match):
        triton_client.read_probs(*broken(body, headers))


def test_triton_missing_says_how_to_make_it(tmp_path, monkeypatch):
    """Where the Triton environment is absent (CI makes only .venv), the benchmarks leave Triton out with this note."""
    monkeypatch.setenv(servers.TRITON_VENV_ENV, str(tmp_path / "venv"))
    why = servers.triton_missing()
    assert f"no Triton environment at {tmp_path / 'venv'}" in why and "`make triton`" in why
    assert servers.triton_version() is None
    with pytest.raises(RuntimeError, match="make triton"):
        servers.triton_peer("triton", tmp_path / "t.toml", "small_cnn", tmp_path, "cpu")
    # a venv that `make triton` did not finish is not one either
    (tmp_path / "venv" / "bin").mkdir(parents=True)
    assert servers.triton_missing() == why
    (tmp_path / "venv" / servers.TRITON_STAMP).touch()
    assert servers.triton_missing() is None
