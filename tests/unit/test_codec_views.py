"""codec.decode reads a writable body without copying, and never accepts, or reads differently, a body that
safetensors' own reader would refuse or read otherwise."""

from __future__ import annotations

import json
import random
import struct

import pytest
import torch
from safetensors.torch import save

from shared import codec


def _file(header: dict, data: bytes, pad: bool = True) -> bytes:
    raw = json.dumps(header, separators=(",", ":")).encode()
    if pad:
        raw += b" " * (-(8 + len(raw)) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


def _same(left: dict[str, torch.Tensor], right: dict[str, torch.Tensor]) -> bool:
    return left.keys() == right.keys() and all(
        left[k].dtype == right[k].dtype and left[k].shape == right[k].shape and torch.equal(left[k], right[k])
        for k in left
    )


def _outcome(body: bytes) -> dict[str, torch.Tensor] | str:
    """What the decoder makes of a body: its tensors, or the code of its refusal."""
    try:
        return codec.decode(body)
    except codec.CodecError as exc:
        return exc.code


def _agree(body: bytes) -> None:
    """The viewing path (a bytearray) and safetensors' reader (bytes) give the same tensors or both refuse."""
    viewed, read = _outcome(bytearray(body)), _outcome(bytes(body))
    if isinstance(read, str):
        assert viewed == read
    else:
        assert not isinstance(viewed, str) and _same(viewed, read)


def test_a_writable_body_is_viewed_not_copied():
    x = torch.rand(4, 3, 8, 8)
    body = bytearray(save({"inputs": x}))
    decoded = codec.decode(body)["inputs"]
    assert torch.equal(decoded, x)
    # the tensor is the body's bytes: changing one changes the other
    body[-4:] = struct.pack("<f", 0.5)
    assert decoded.flatten()[-1].item() == 0.5


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float16, torch.float32])
def test_every_input_dtype_reads_the_same_both_ways(dtype):
    x = (torch.rand(5, 1, 4, 4) * (255 if dtype == torch.uint8 else 1)).to(dtype)
    body = save({"inputs": x, "other": torch.arange(7, dtype=torch.uint8)}, metadata={"by": "test"})
    _agree(body)
    assert torch.equal(codec.decode(bytearray(body))["inputs"], x)


def test_plain_and_unusual_headers_agree_with_safetensors():
    data = torch.arange(6, dtype=torch.float32).numpy().tobytes()
    entry = {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}
    for body in [
        _file({"t": entry}, data),
        # unaligned data, an entry with an extra key, a leading space: left to safetensors
        _file({"t": entry}, data, pad=False),
        _file({"t": {**entry, "extra": 1}}, data),
        struct.pack("<Q", 2 + len(json.dumps({"t": entry}))) + b"  " + json.dumps({"t": entry}).encode() + data,
        # offsets that leave a gap, overlap, run past the end, or leave bytes over
        _file({"t": {**entry, "data_offsets": [4, 28]}}, b"\0" * 4 + data),
        _file({"a": entry, "b": entry}, data),
        _file({"t": {**entry, "data_offsets": [0, 48]}}, data),
        _file({"t": entry}, data + b"\0\0\0\0"),
        _file({"t": {**entry, "shape": [3, 3]}}, data),
        _file({"t": {**entry, "shape": [0, 3], "data_offsets": [0, 0]}}, b""),
        _file({"t": {**entry, "dtype": "F64", "data_offsets": [0, 48]}}, data * 2),
        _file({"__metadata__": {"k": 1}, "t": entry}, data),
        _file({"t": entry}, data)[:-3],
    ]:
        _agree(body)


def test_damaged_headers_agree_with_safetensors():
    """Random byte changes in the header of a real body: the two readers never disagree."""
    base = save({"inputs": torch.rand(3, 1, 2, 2), "keys": torch.zeros(3, 16, dtype=torch.uint8)})
    (n,) = struct.unpack("<Q", base[:8])
    rng = random.Random(0)
    for _ in range(400):
        body = bytearray(base)
        for _ in range(rng.randint(1, 3)):
            body[rng.randrange(8, 8 + n)] = rng.choice(b'0123456789,:[]{}" FU8')
        _agree(bytes(body))


@pytest.mark.parametrize("chunk", [1, 5, 8, 100, 1 << 20])
def test_an_assembled_body_views_its_tensors_aligned_however_it_arrived(chunk):
    x, keys = torch.rand(6, 3, 5, 5), torch.randint(0, 255, (6, 16), dtype=torch.uint8)
    raw = save({"inputs": x, "keys": keys})
    body = codec.assemble([raw[i : i + chunk] for i in range(0, len(raw), chunk)])
    assert bytes(body) == raw
    decoded = codec.decode(body)
    assert torch.equal(decoded["inputs"], x) and torch.equal(decoded["keys"], keys)
    assert decoded["inputs"].data_ptr() % codec.ALIGNMENT == 0
    # views of the assembled bytes, not copies
    start = body.ctypes.data
    assert all(start <= t.data_ptr() < start + len(body) for t in decoded.values())


def test_an_assembled_body_that_is_not_safetensors_is_refused_as_before():
    for raw in [b"\x01", b"not a safetensors file at all", b"\xff" * 8 + b"{}"]:
        body = codec.assemble([raw])
        assert _outcome(body) == _outcome(raw) == "bad_body"
