"""Triton's HTTP/REST inference protocol (KServe v2 with Triton's binary-tensor extension), spoken by the benchmarks'
own clients, so that Triton, the service and the other servers compared get the same clients.

tritonclient cannot be installed in the project's .venv (scripts/check_env.py allows only the locked packages), and
a load generator of its own for Triton would measure two clients, not two servers. So the bench builds Triton's
requests itself, as tritonclient builds them with `binary_data=True`: a compact JSON header naming the tensors, then
the input's raw bytes, the header's length in `Inference-Header-Content-Length`; the answer is a JSON header, its
length in the same header field, then each binary output's bytes in the order the JSON lists them. `check_against`
holds this to tritonclient itself, run with the Triton environment's Python: the same request bytes, the same answer.

    path, body, headers = infer_request("small_cnn", x)        # x: float32 (rows, C, H, W)
    probs = read_probs(response_body, response_headers)      # float32 (rows, K)
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path

import httpx
import numpy as np
import torch

from shared import codec

INPUT, OUTPUT = codec.INPUTS_KEY, "probs"
# how the benchmarks label Triton's rows and columns
TRITON = "Triton"
HEADER_LENGTH = "Inference-Header-Content-Length"
# Triton's names for the dtypes a benchmark sends and reads
DATATYPES = {"FP32": np.float32}
# tritonclient's start and one request, on a busy machine
CHECK_TIMEOUT_S = 120.0


def infer_path(model: str) -> str:
    return f"/v2/models/{model}/infer"


def ready_path(model: str) -> str:
    """200 once the model is loaded and Triton accepts its requests: what a start waits for."""
    return f"/v2/models/{model}/ready"


def infer_request(model: str, x: np.ndarray | torch.Tensor) -> tuple[str, bytes, dict[str, str]]:
    """One infer request for a float32 batch `x` (rows, C, H, W): (path, body, headers) to POST.

    The body is byte for byte what tritonclient's `generate_request_body` makes for the input `inputs` (FP32, binary)
    and the output `probs` (binary): its JSON header compact and in tritonclient's key order, then the rows' bytes,
    C order, little-endian. Raises ValueError for another dtype: the peers serve FP32 inputs only."""
    array = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if array.dtype != np.float32:
        raise ValueError(f"Triton's peer takes float32 inputs, got {array.dtype}")
    data = np.ascontiguousarray(array).astype("<f4", copy=False).tobytes()
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": INPUT,
                    "shape": list(array.shape),
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": len(data)},
                }
            ],
            "outputs": [{"name": OUTPUT, "parameters": {"binary_data": True}}],
        },
        separators=(",", ":"),
    ).encode()
    return infer_path(model), header + data, {HEADER_LENGTH: str(len(header))}


def read_probs(body: bytes, headers: Mapping[str, str]) -> np.ndarray:
    """The `probs` output of an infer answer (its body and headers: any mapping; names are matched regardless of
    case), as float32 (rows, K). Raises ValueError for an answer that is not one: an error, a missing output, a
    shape or size that does not match its bytes."""
    length = next((v for k, v in headers.items() if k.lower() == HEADER_LENGTH.lower()), None)
    try:
        size = len(body) if length is None else int(length)
        if not 0 < size <= len(body):
            raise ValueError(f"{HEADER_LENGTH} {length} for a body of {len(body)} bytes")
        answer = json.loads(body[:size])
        if "error" in answer:
            raise ValueError(f"Triton answered an error: {answer['error']}")
        offset = size
        for output in answer["outputs"]:
            nbytes = int(output.get("parameters", {}).get("binary_data_size", 0))
            if output["name"] == OUTPUT:
                return _binary(output, body[offset : offset + nbytes])
            offset += nbytes
    except (KeyError, TypeError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not a Triton infer answer: {type(exc).__name__}: {exc}") from None
    raise ValueError(f"Triton's answer holds no {OUTPUT!r} output")


def _binary(output: dict, data: bytes) -> np.ndarray:
    dtype = DATATYPES.get(output["datatype"])
    shape = tuple(int(d) for d in output["shape"])
    if dtype is None or "binary_data_size" not in output.get("parameters", {}):
        raise ValueError(f"output {OUTPUT!r} is not a binary {'/'.join(DATATYPES)} tensor: {output}")
    if len(data) != int(np.prod(shape)) * np.dtype(dtype).itemsize:
        raise ValueError(f"output {OUTPUT!r} of shape {list(shape)} came with {len(data)} bytes")
    return np.frombuffer(data, dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape)


class TritonTeacher:
    """`teacher(x) -> probs` against a Triton model, over one persistent HTTP/1.1 connection (httpx, as
    RemoteTeacher's): the request built by `infer_request`, the answer read by `read_probs` and returned as a float32
    tensor on the CPU. It checks only that the answer has the rows asked for; retries nothing."""

    def __init__(self, url: str, model: str, timeout_s: float = 60.0):
        self.model = model
        self._client = httpx.Client(base_url=url.rstrip("/"), timeout=timeout_s)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        path, body, headers = infer_request(self.model, x)
        response = self._client.post(path, content=body, headers=headers)
        if response.status_code != 200:
            raise RuntimeError(f"Triton answered {response.status_code}: {response.text[:300]}")
        probs = read_probs(response.content, response.headers)
        if len(probs) != len(x):
            raise RuntimeError(f"Triton answered {len(probs)} rows for {len(x)}")
        return torch.from_numpy(probs.copy())

    def close(self) -> None:
        self._client.close()


def check_against(command: list[str], env: Mapping[str, str], url: str, model: str, x: torch.Tensor) -> None:
    """Hold this module to tritonclient. `command` runs `bench.triton_app` with the Triton environment's Python (with
    `env` added to this process's), whose `tritonclient` command builds tritonclient's request for `x` and asks `url`:
    its request bytes must be `infer_request`'s, and its answer `TritonTeacher`'s, bit for bit. Raises RuntimeError
    naming the difference."""
    _, ours_body, ours_headers = infer_request(model, x)
    ours = TritonTeacher(url, model)
    try:
        probs = ours(x).numpy()
    finally:
        ours.close()
    with tempfile.TemporaryDirectory(prefix="akd-tritonclient-") as folder:
        where = Path(folder)
        np.save(where / "x.npy", x.numpy(), allow_pickle=False)
        run = subprocess.run(
            [*command, "tritonclient", "--url", url, "--model", model, "--folder", folder],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=CHECK_TIMEOUT_S,
        )
        if run.returncode != 0:
            raise RuntimeError(f"tritonclient's check failed: {run.stderr[-2000:]}")
        theirs_body = (where / "request.bin").read_bytes()
        theirs_length = (where / "header_length.txt").read_text().strip()
        theirs_probs = np.load(where / "probs.npy", allow_pickle=False)
    if theirs_body != ours_body or theirs_length != ours_headers[HEADER_LENGTH]:
        raise RuntimeError("tritonclient's infer request differs from bench/triton_client.py's")
    if theirs_probs.dtype != probs.dtype or not np.array_equal(theirs_probs, probs):
        raise RuntimeError("tritonclient read another answer than bench/triton_client.py")
