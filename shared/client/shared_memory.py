"""A client's one shared-memory region, for a service on its own host: the rows are written into it and the soft
targets read from it, and a request carries neither (the Open Inference Protocol's system shared-memory extension,
shared/oip.py).

The region is a POSIX segment of this process (Python's `multiprocessing.shared_memory`, as tritonclient makes them):
rows at its start, answers after `answers_at`. It grows, as a new segment under a new name, when a call needs more;
the old one is unlinked. Unlinking is all a close needs: the service drops a region whose segment is unlinked or whose
client is gone (teacher_service/shared_memory.py), and Python's resource tracker unlinks the segment of a process that
died without closing it.
"""

from __future__ import annotations

import contextlib
import math
import os
import uuid
from multiprocessing import shared_memory

import numpy as np

from shared.oip import (
    BINARY_DATA_SIZE,
    CACHE,
    INPUT_DATATYPES,
    OUTPUT_DATATYPE,
    SHM_BYTE_SIZE,
    SHM_OFFSET,
    SHM_REGION,
    TEMPERATURE,
)
from shared.wire import INPUTS_KEY

# numpy dtype name -> the protocol's datatype
_DATATYPES = {dtype: datatype for datatype, dtype in INPUT_DATATYPES.items()}
# segments start at a page; answers start at a multiple of this
_ALIGN = 64
# the service's error code for a region it does not hold (teacher_service/shared_memory.py)
REGION_NOT_FOUND = "region_not_found"
# the least a region is made for: calls of a few rows do not each grow it
_MIN_BYTES = 1 << 16


class ClientRegion:
    """One segment, registered under `name` (its key is `/<name>`), `size` bytes: rows first, answers from
    `answers_at`. Made for a call of `rows_bytes` and `answer_bytes`; `fits` says whether a call fits."""

    def __init__(self, rows_bytes: int, answer_bytes: int):
        self.answers_at = _aligned(max(rows_bytes, _MIN_BYTES // 2))
        self.size = self.answers_at + _aligned(max(answer_bytes, _MIN_BYTES // 2))
        self.name = f"akd-{uuid.uuid4().hex}"
        self.key = "/" + self.name
        self._segment = shared_memory.SharedMemory(self.name, create=True, size=self.size)
        # the process that made it: a forked child makes its own
        self.pid = os.getpid()

    def fits(self, rows_bytes: int, answer_bytes: int) -> bool:
        return rows_bytes <= self.answers_at and answer_bytes <= self.size - self.answers_at

    def registration(self) -> dict:
        """The body of POST /v2/systemsharedmemory/region/{name}/register."""
        return {"key": self.key, "offset": 0, "byte_size": self.size}

    def write_rows(self, rows: np.ndarray) -> None:
        np.frombuffer(self._segment.buf, dtype=np.uint8, count=rows.nbytes)[:] = rows.reshape(-1).view(np.uint8)

    def read_answer(self, rows: int, classes: int) -> np.ndarray:
        """The answer's probabilities (rows, classes) float32, copied out (the next call overwrites the region)."""
        n = rows * classes
        return (
            np.frombuffer(self._segment.buf, dtype=np.float32, count=n, offset=self.answers_at).reshape(rows, -1).copy()
        )

    def infer_request(self, rows: np.ndarray, classes: int, params: dict) -> dict:
        """The v2 infer request for `rows` (their wire form) asking for `probs`, both through this region;
        `params`: the native query's temperature and cache mode."""
        carried = {k: params[k] for k in (TEMPERATURE, CACHE) if params.get(k) is not None}
        given = {
            "name": INPUTS_KEY,
            "shape": list(rows.shape),
            "datatype": _DATATYPES[rows.dtype.name],
            "parameters": {SHM_REGION: self.name, SHM_BYTE_SIZE: rows.nbytes},
        }
        answer = {SHM_REGION: self.name, SHM_OFFSET: self.answers_at, SHM_BYTE_SIZE: len(rows) * classes * 4}
        return {"inputs": [given], "outputs": [{"name": "probs", "parameters": answer}], "parameters": carried}

    def close(self) -> None:
        """Unmaps and unlinks the segment (the service then drops its region); again is a no-op."""
        segment, self._segment = self._segment, None
        if segment is None:
            return
        segment.close()
        with contextlib.suppress(FileNotFoundError):
            segment.unlink()


def answer_shape(response: dict, region: ClientRegion, rows: int, classes: int) -> str | None:
    """What is wrong with a shared-memory infer answer's JSON (None: it says `probs` (rows, classes) FP32 is in
    the region)."""
    try:
        (out,) = response["outputs"]
        where = out.get("parameters") or {}
        said = (out["name"], out["datatype"], list(out["shape"]), where.get(SHM_REGION), where.get(BINARY_DATA_SIZE))
    except (KeyError, TypeError, ValueError, AttributeError):
        return "an infer answer that is not one output"
    expected = ("probs", OUTPUT_DATATYPE, [rows, classes], region.name, None)
    return None if said == expected else f"output {said}, not {expected}"


def call_bytes(rows: np.ndarray, classes: int) -> tuple[int, int]:
    """The bytes a call's rows and answer take in a region."""
    return rows.nbytes, len(rows) * classes * 4


def _aligned(n: int) -> int:
    return math.ceil(n / _ALIGN) * _ALIGN
