"""Tensors to bytes and back (safetensors), and the checks an input batch must pass.

Both sides call these, so a trainer builds exactly the bytes the service expects.
"""

from __future__ import annotations

import json
import struct

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.numpy import save as _np_save
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save

from shared.hashing import KEY_BYTES, row_keys
from shared.protocol import INPUT_DTYPES, INPUTS_KEY, KEYS_KEY


class CodecError(ValueError):
    """A body or tensor that breaks the protocol; carries what was expected and what came."""

    def __init__(self, code: str, message: str, expected: str | None = None, received: str | None = None):
        super().__init__(message)
        self.code, self.message, self.expected, self.received = code, message, expected, received


def encode(tensors: dict[str, torch.Tensor]) -> bytes:
    """The safetensors file of `tensors`, written through numpy where every dtype has a numpy twin: the same bytes as
    safetensors' torch writer, in a fraction of its time for the few small tensors a request or an answer holds."""
    cpu = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    try:
        arrays = {name: t.numpy() for name, t in cpu.items()}
    except TypeError:
        # bfloat16 and the other dtypes numpy lacks
        return _st_save(cpu)
    return _np_save(arrays)


def decode(body: bytes) -> dict[str, torch.Tensor]:
    if not body:
        raise CodecError("bad_body", "the request body is empty", "a safetensors file", "0 bytes")
    try:
        return _st_load(body)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise CodecError(
            "bad_body",
            f"the body is not a readable safetensors file: {exc}",
            "a complete safetensors file",
            f"{len(body)} bytes that do not parse",
        ) from exc


def encode_inputs(inputs: torch.Tensor) -> bytes:
    return encode({INPUTS_KEY: inputs})


def to_transport(inputs: torch.Tensor) -> torch.Tensor:
    """The smallest exact wire dtype: uint8 when every value is k/255, else the tensor as is.

    In numpy, not torch: a trainer calls this for every teacher request, and torch would run it as an OpenMP parallel
    region whose threads then spin for milliseconds, on cores a co-located service's forward pass needs, slowing that
    forward pass down."""
    if inputs.dtype == torch.uint8:
        return inputs
    values = inputs.detach().cpu().float().numpy()
    # round half to even, as torch's round
    as_uint8 = np.rint(values * np.float32(255.0))
    if np.array_equal(as_uint8 / np.float32(255.0), values):
        return torch.from_numpy(as_uint8.astype(np.uint8))
    return inputs


# safetensors' dtype names (the header's "dtype") as torch names them, for the tensors torch can load
_HEADER_DTYPES = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "U16": "uint16",
    "I16": "int16",
    "U32": "uint32",
    "I32": "int32",
    "U64": "uint64",
    "I64": "int64",
    "F16": "float16",
    "BF16": "bfloat16",
    "F32": "float32",
    "F64": "float64",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "C64": "complex64",
}
# safetensors' own bound
_MAX_HEADER_BYTES = 100_000_000


class UnreadableHeader(ValueError):
    """The first bytes are not a safetensors header; `decode` of the whole body says how, with its size."""


def read_header(prefix: bytes) -> dict[str, tuple[str, tuple[int, ...]]] | None:
    """The tensors a safetensors file declares, as {name: (torch dtype name, shape)}, from its first bytes alone.

    None while `prefix` is too short to hold the whole header. This lets a server refuse a body by what its
    header declares (dtype, shape, row count) before the rest of it arrives, and before anything is decoded.
    Raises UnreadableHeader for anything `decode` would not accept as a header (including a duplicated name,
    which a JSON reader and safetensors could resolve differently).
    """
    if len(prefix) < 8:
        return None
    (n,) = struct.unpack("<Q", prefix[:8])
    if n > _MAX_HEADER_BYTES:
        raise UnreadableHeader(f"a header length of {n} bytes")
    if len(prefix) < 8 + n:
        return None

    def no_duplicates(pairs):
        names = [k for k, _ in pairs]
        if len(set(names)) != len(names):
            raise UnreadableHeader("a duplicated name")
        return dict(pairs)

    try:
        header = json.loads(prefix[8 : 8 + n], object_pairs_hook=no_duplicates)
    except (ValueError, RecursionError) as exc:
        # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise UnreadableHeader(str(exc)) from None
    if not isinstance(header, dict):
        raise UnreadableHeader("a header that is not a JSON object")
    return {name: _declared_tensor(name, info) for name, info in header.items() if name != "__metadata__"}


def _declared_tensor(name: str, info: object) -> tuple[str, tuple[int, ...]]:
    """One header entry as (torch dtype name, shape), or UnreadableHeader."""
    if not isinstance(info, dict) or info.get("dtype") not in _HEADER_DTYPES:
        raise UnreadableHeader(f"tensor {name!r} without a known dtype")
    shape = info.get("shape")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise UnreadableHeader(f"tensor {name!r} without a valid shape")
    return _HEADER_DTYPES[info["dtype"]], tuple(shape)


def check_inputs_declared(
    tensors: dict[str, tuple[str, tuple[int, ...]]], input_shape: tuple[int, int, int]
) -> tuple[int, ...]:
    """Check the `inputs` tensor's name, dtype and shape from {name: (dtype name, shape)}; return its shape.

    One check for a decoded body (`validate_inputs`) and for a header read before the body is in (`read_header`),
    so both refuse the same inputs with the same words.
    """
    if INPUTS_KEY not in tensors:
        found = ", ".join(map(repr, tensors)) or "no tensors"
        raise CodecError(
            "missing_inputs", f"the body has no {INPUTS_KEY!r} tensor", f"a tensor named {INPUTS_KEY!r}", found
        )
    dtype, shape = tensors[INPUTS_KEY]
    if dtype not in INPUT_DTYPES:
        raise CodecError("bad_dtype", f"inputs have dtype {dtype}", f"one of {', '.join(INPUT_DTYPES)}", dtype)
    expected_shape = f"(B, {', '.join(map(str, input_shape))}) with B >= 1"
    if len(shape) != 4 or tuple(shape[1:]) != tuple(input_shape) or shape[0] < 1:
        only_channels_differ = len(shape) == 4 and shape[0] >= 1 and tuple(shape[2:]) == tuple(input_shape[1:])
        code = "bad_channels" if only_channels_differ else "bad_shape"
        raise CodecError(
            code, f"inputs have the wrong shape {shape}", expected_shape, f"{dtype} tensor of shape {shape}"
        )
    return shape


def validate_inputs(tensors: dict[str, torch.Tensor], input_shape: tuple[int, int, int]) -> torch.Tensor:
    """Return the `inputs` tensor after checking name, dtype, shape, finiteness and range."""
    check_inputs_declared(
        {k: (str(t.dtype).removeprefix("torch."), tuple(t.shape)) for k, t in tensors.items()}, input_shape
    )
    x = tensors[INPUTS_KEY]
    if x.dtype != torch.uint8:
        # numpy, not torch: the service validates on its event loop or a worker thread, and keeps torch's
        # parallel (OpenMP) work on its inference thread, where the forward pass needs every core
        values = x.numpy()
        finite = np.isfinite(values)
        if not finite.all():
            bad = int((~finite).sum())
            raise CodecError(
                "not_finite",
                f"inputs hold {bad} NaN/Inf value(s)",
                "finite values in [0, 1]",
                f"{bad} non-finite values",
            )
        lo, hi = float(values.min()), float(values.max())
        if lo < 0.0 or hi > 1.0:
            raise CodecError(
                "out_of_range",
                "float inputs must already be scaled to [0, 1]",
                "values in [0, 1] (or uint8 in 0..255)",
                f"values in [{lo:g}, {hi:g}]",
            )
    return x


def check_keys_declared(tensors: dict[str, tuple[str, tuple[int, ...]]]) -> tuple[int, ...]:
    """The `keys` tensor of a keys-first body: uint8 (N, KEY_BYTES), N >= 1, alone. Its shape."""
    expected = f"one uint8 tensor {KEYS_KEY!r} of shape (N, {KEY_BYTES}), N >= 1"
    if set(tensors) != {KEYS_KEY}:
        found = ", ".join(map(repr, tensors)) or "no tensors"
        raise CodecError("missing_keys", f"the body must hold exactly a {KEYS_KEY!r} tensor", expected, found)
    dtype, shape = tensors[KEYS_KEY]
    if dtype != "uint8" or len(shape) != 2 or shape[1] != KEY_BYTES or shape[0] < 1:
        raise CodecError("bad_keys", f"keys are a {dtype} tensor of shape {shape}", expected, f"{dtype} {shape}")
    return shape


def encode_keys(rows: torch.Tensor) -> bytes:
    """A keys-first body: the content hash of each row as it would be uploaded (the cache's own keys)."""
    keys = np.frombuffer(b"".join(row_keys(rows)), dtype=np.uint8).reshape(len(rows), KEY_BYTES)
    return encode({KEYS_KEY: torch.from_numpy(keys.copy())})


def validate_keys(tensors: dict[str, torch.Tensor]) -> list[bytes]:
    """The row keys of a decoded keys-first body, as the cache indexes them."""
    check_keys_declared({k: (str(t.dtype).removeprefix("torch."), tuple(t.shape)) for k, t in tensors.items()})
    return [row.tobytes() for row in tensors[KEYS_KEY].numpy()]


def to_unit_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 0..255 -> float32 in [0,1]; float inputs are already in [0,1]."""
    if x.dtype == torch.uint8:
        return x.to(torch.float32).div_(255.0)
    return x.to(torch.float32)
