"""Tensors to bytes and back (safetensors), and the checks an input batch must pass.

Both sides call these, so a trainer builds exactly the bytes the service expects.
"""

from __future__ import annotations

import json
import math
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


# Where a viewed tensor's first byte lies: a multiple of this, as torch's own allocator places a tensor, so that an
# input viewed in a request body reaches a kernel exactly as a copied one would (a kernel may take another path, and
# sum in another order, at another alignment).
ALIGNMENT = 64


def assemble(chunks: list[bytes], data_start: int | None = None) -> np.ndarray:
    """The body `chunks` make, copied once into one writable uint8 array laid out so that its data begins at a
    multiple of ALIGNMENT: the data after its safetensors header (the body `decode` views rather than copies), or
    from byte `data_start` where the caller knows where the data begins (a v2 binary body's tensors)."""
    size = sum(len(chunk) for chunk in chunks)
    if data_start is None:
        length = _first_bytes(chunks, 8)
        data_start = 8 + struct.unpack("<Q", length)[0] if len(length) == 8 else 0
    start = data_start
    pad = -start % ALIGNMENT
    # torch's allocator aligns to ALIGNMENT; numpy's does not promise to
    body = torch.empty(pad + size, dtype=torch.uint8).numpy()[pad:]
    at = 0
    for chunk in chunks:
        body[at : at + len(chunk)] = np.frombuffer(chunk, dtype=np.uint8)
        at += len(chunk)
    return body


def _first_bytes(chunks: list[bytes], n: int) -> bytes:
    head = b""
    for chunk in chunks:
        head += chunk[: n - len(head)]
        if len(head) == n:
            break
    return head


def decode(body: bytes | bytearray | np.ndarray) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, or CodecError naming what is wrong.

    A writable body (a uint8 array from `assemble`, a bytearray) whose header is plain is decoded without a copy:
    each tensor a view of the body (`_views`). Every other body goes through safetensors' own reader, which copies;
    so does any header `_views` does not vouch for, and its error is safetensors' own.
    """
    if len(body) == 0:
        raise CodecError("bad_body", "the request body is empty", "a safetensors file", "0 bytes")
    if isinstance(body, bytearray | np.ndarray) and (views := _views(body)) is not None:
        return views
    try:
        return _st_load(bytes(body))
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise CodecError(
            "bad_body",
            f"the body is not a readable safetensors file: {exc}",
            "a complete safetensors file",
            f"{len(body)} bytes that do not parse",
        ) from exc


# the dtypes a view is made for (a request's inputs, a keys-first body's keys); others go through safetensors
_VIEW_DTYPES = {"U8": torch.uint8, "F16": torch.float16, "F32": torch.float32}
_ENTRY_KEYS = {"dtype", "shape", "data_offsets"}


def _views(body: bytearray | np.ndarray) -> dict[str, torch.Tensor] | None:
    """Each tensor as a view of `body`, when its header is one safetensors accepts and is plain; else None.

    Plain: a JSON object opening the header, each entry exactly dtype, shape and data_offsets, a dtype of
    `_VIEW_DTYPES`, at least one element, offsets that tile the data from its first byte to the body's last
    (safetensors' own rule), and each tensor aligned to its element size. Anything else is left to safetensors,
    so a body is never accepted here that safetensors would refuse, and what is accepted reads the same.
    """
    try:
        header, start = _raw_header(body)
    except UnreadableHeader:
        return None
    if header is None or bytes(body[8:9]) != b"{":
        return None
    entries = sorted(
        ((name, info) for name, info in header.items() if name != "__metadata__"),
        key=lambda item: _begin(item[1]),
    )
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        return None
    views, at = {}, 0
    for name, info in entries:
        view = _view(body, start, at, info)
        if view is None:
            return None
        views[name], at = view, info["data_offsets"][1]
    return views if start + at == len(body) else None


def _begin(info: object) -> int:
    offsets = info.get("data_offsets") if isinstance(info, dict) else None
    return offsets[0] if isinstance(offsets, list) and offsets and type(offsets[0]) is int else -1


def _view(body: bytearray | np.ndarray, start: int, at: int, info: object) -> torch.Tensor | None:
    """One header entry as a view of `body` (its data at `start` + its offsets), when it begins at `at` and is
    plain (`_views`); else None."""
    if not isinstance(info, dict) or set(info) != _ENTRY_KEYS or info["dtype"] not in _VIEW_DTYPES:
        return None
    shape, offsets, dtype = info["shape"], info["data_offsets"], _VIEW_DTYPES[info["dtype"]]
    if not isinstance(shape, list) or not all(type(d) is int and d > 0 for d in shape):
        return None
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets):
        return None
    count = math.prod(shape)
    size = dtype.itemsize
    if offsets[0] != at or offsets[1] - at != count * size or (start + at) % size or start + offsets[1] > len(body):
        return None
    return torch.frombuffer(body, dtype=dtype, count=count, offset=start + at).view(shape)


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
    # an adversarial batch fails on its first values: those are checked alone first, the whole batch only if they pass
    if not _all_k255(values.reshape(-1)[:_FIRST_VALUES])[0]:
        return inputs
    is_k255, as_uint8 = _all_k255(values)
    return torch.from_numpy(as_uint8.astype(np.uint8)) if is_k255 else inputs


_FIRST_VALUES = 256


def _all_k255(values: np.ndarray) -> tuple[bool, np.ndarray]:
    """Whether every value is k/255, and the k's (as float32)."""
    # round half to even, as torch's round
    as_uint8 = np.rint(values * np.float32(255.0))
    return bool(np.array_equal(as_uint8 / np.float32(255.0), values)), as_uint8


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
    header, _ = _raw_header(prefix)
    if header is None:
        return None
    return {name: _declared_tensor(name, info) for name, info in header.items() if name != "__metadata__"}


def _raw_header(prefix: bytes | bytearray | memoryview) -> tuple[dict | None, int]:
    """The header's JSON object and where the data begins (8 + its length); (None, 0) while `prefix` is too short.
    UnreadableHeader for a header safetensors would not read."""
    if len(prefix) < 8:
        return None, 0
    (n,) = struct.unpack("<Q", prefix[:8])
    if n > _MAX_HEADER_BYTES:
        raise UnreadableHeader(f"a header length of {n} bytes")
    if len(prefix) < 8 + n:
        return None, 0

    def no_duplicates(pairs):
        names = [k for k, _ in pairs]
        if len(set(names)) != len(names):
            raise UnreadableHeader("a duplicated name")
        return dict(pairs)

    try:
        header = json.loads(bytes(prefix[8 : 8 + n]), object_pairs_hook=no_duplicates)
    except (ValueError, RecursionError) as exc:
        # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise UnreadableHeader(str(exc)) from None
    if not isinstance(header, dict):
        raise UnreadableHeader("a header that is not a JSON object")
    return header, 8 + n


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


# float dtype -> (the unsigned integer of its width, the bits of 1.0)
_UNIT_BITS = {np.dtype(np.float32): (np.uint32, 0x3F800000), np.dtype(np.float16): (np.uint16, 0x3C00)}


def in_unit_interval(values: np.ndarray) -> bool:
    """True only when every value is finite and in [0, 1], from one pass over their bits read as unsigned integers:
    the floats in [+0, 1] are exactly the patterns from 0 up to 1.0's, and a negative value (its sign bit), NaN or an
    infinity lies above it. False is not a refusal: -0.0 (in range) answers False too, and the exact check decides.
    One integer max rather than a float min and max: numpy reduces float16 without SIMD (10 ms for 512 CIFAR rows,
    0.04 as integers)."""
    unsigned, one = _UNIT_BITS.get(values.dtype, (None, None))
    return unsigned is not None and values.size > 0 and int(values.view(unsigned).max()) <= one


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
        if in_unit_interval(values):
            return x
        # what is wrong, and the -0.0 the one pass sends here: min and max are NaN when any value is, and
        # infinite when one is
        lo, hi = float(values.min()), float(values.max())
        if not (math.isfinite(lo) and math.isfinite(hi)):
            bad = int((~np.isfinite(values)).sum())
            raise CodecError(
                "not_finite",
                f"inputs hold {bad} NaN/Inf value(s)",
                "finite values in [0, 1]",
                f"{bad} non-finite values",
            )
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


def validate_keys(tensors: dict[str, torch.Tensor]) -> np.ndarray:
    """The row keys of a decoded keys-first body, (N, KEY_BYTES) uint8: one row per key, as the cache indexes them."""
    check_keys_declared({k: (str(t.dtype).removeprefix("torch."), tuple(t.shape)) for k, t in tensors.items()})
    return tensors[KEYS_KEY].numpy()


def to_unit_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 0..255 -> float32 in [0,1]; float inputs are already in [0,1]."""
    if x.dtype == torch.uint8:
        return x.to(torch.float32).div_(255.0)
    return x.to(torch.float32)
