"""Open Inference Protocol bodies read and answers written (teacher_service/oip_codec.py), without a server: rows in a
region read in place or copied as the cache requires, and what an answer whose region goes away mid-request gets.
Real segments in /dev/shm and a real registry; each test takes milliseconds."""

from __future__ import annotations

import contextlib
import json
import uuid
from multiprocessing import shared_memory

import numpy as np
import pytest
import torch

from shared import oip, oip_models
from teacher_service import oip_codec
from teacher_service.errors import ServiceError
from teacher_service.shared_memory import SharedMemoryRegions

SHAPE = (1, 2, 2)
ROW_BYTES = 4 * 4


@pytest.fixture
def region():
    """A 64-byte segment registered as region `r` (the registry, and the segment as its client holds it)."""
    segment = shared_memory.SharedMemory(f"akd-test-{uuid.uuid4().hex[:12]}", create=True, size=64)
    regions = SharedMemoryRegions(max_regions=4, max_bytes=1 << 20)
    regions.register("r", "/" + segment.name, 0, 64)
    yield regions, segment
    regions.close()
    segment.close()
    segment.unlink()


def body(cache: str) -> np.ndarray:
    """An infer request for one row of SHAPE, FP32, in region `r`."""
    where = {oip.SHM_REGION: "r", oip.SHM_BYTE_SIZE: ROW_BYTES}
    given = {"name": "inputs", "shape": [1, *SHAPE], "datatype": "FP32", "parameters": where}
    return np.frombuffer(json.dumps({"inputs": [given], "parameters": {"cache": cache}}).encode(), dtype=np.uint8)


@pytest.mark.parametrize(("cache", "in_place"), [("bypass", True), ("use", False), ("refresh", False)])
def test_rows_a_cache_keys_are_copied_and_the_others_read_in_place(region, cache, in_place):
    """A client rewriting its region after the rows were read changes rows read in place, never rows a cache keys
    (their hash is taken before they are computed)."""
    regions, segment = region
    np.frombuffer(segment.buf, dtype=np.float32, count=4)[:] = 0.25
    with contextlib.ExitStack() as held:
        call = oip_codec.read_call(body(cache), None, SHAPE, regions, cached=True, held=held)
        np.frombuffer(segment.buf, dtype=np.float32, count=4)[:] = 0.75
        assert float(call.inputs.reshape(-1)[0]) == (0.75 if in_place else 0.25)
        # held while the rows are: the region stays mapped even once unregistered
        regions.unregister("r")
        assert float(call.inputs.sum()) == (3.0 if in_place else 1.0)
        call.inputs = None


def test_an_answer_whose_region_is_unregistered_mid_request_is_a_clear_400(region, monkeypatch):
    """The client unregisters its region while the answer is being written (injected: the unregister runs inside
    the answer's use of the region, the one moment a real race can hit): the memory stays valid, the request is
    refused, and nothing is left registered."""
    regions, _ = region
    use = SharedMemoryRegions.use

    @contextlib.contextmanager
    def taken_away(self, name, offset, byte_size):
        with use(self, name, offset, byte_size) as given:
            self.unregister(name)
            yield given

    monkeypatch.setattr(SharedMemoryRegions, "use", taken_away)
    request = oip_models.InferRequest(inputs=[])
    call = oip_codec.InferCall(request, None, None)
    asked = [oip_models.RequestOutput(name="probs", parameters={oip.SHM_REGION: "r", oip.SHM_BYTE_SIZE: 40})]
    with pytest.raises(ServiceError) as refused:
        oip_codec.write_answer({"probs": torch.rand(1, 10)}, asked, call, "t", regions)
    assert (refused.value.status, refused.value.detail.code) == (400, "region_unregistered")
    assert regions.status() == []
