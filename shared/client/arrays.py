"""Inputs to request bodies and answers to arrays, in numpy; torch only where the caller's inputs are torch's.

A request's bytes are those `shared.codec` writes for the same rows (safetensors' own writer, through numpy; the
wire dtype chosen by the same rule), so a client's rows and a trainer's hit the same cache rows
(tests/unit/test_client_parts.py holds the two together). Answers are read by safetensors' own reader, into numpy:
every dtype keeps its name as torch spells it (what the answer checks report), and bfloat16, which numpy lacks, is
widened to float32 exactly.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
from safetensors import SafetensorError, deserialize
from safetensors.numpy import save

from shared.client.errors import TeacherRequestError
from shared.hashing import KEY_BYTES, row_keys
from shared.wire import INPUT_DTYPES, INPUTS_KEY, KEYS_KEY

# An adversarial batch fails the k/255 test on its first values: those are checked alone first, the whole batch only
# if they pass.
_FIRST_VALUES = 256


def to_transport(values: np.ndarray) -> np.ndarray:
    """The smallest exact wire dtype: uint8 when every value is k/255 (4x smaller, and the same bytes from every job,
    which is what lets the service's cache hit across jobs), else `values` itself.

    In numpy, as `codec.to_transport`: torch would open an OpenMP parallel region whose threads then spin on the cores a
    co-located service's forward pass needs."""
    if values.dtype == np.uint8:
        return values
    as_float = values.astype(np.float32, copy=False)
    if not _all_k255(as_float.reshape(-1)[:_FIRST_VALUES])[0]:
        return values
    is_k255, as_uint8 = _all_k255(as_float)
    return as_uint8.astype(np.uint8) if is_k255 else values


def _all_k255(values: np.ndarray) -> tuple[bool, np.ndarray]:
    """Whether every value is k/255, and the k's (as float32)."""
    # round half to even, as torch's round
    as_uint8 = np.rint(values * np.float32(255.0))
    return bool(np.array_equal(as_uint8 / np.float32(255.0), values)), as_uint8


def _torch_of(x: Any) -> Any | None:
    """The torch module when x is one of its tensors, else None; torch is never imported here (a torch tensor means
    torch is loaded already)."""
    torch = sys.modules.get("torch")
    return torch if torch is not None and isinstance(x, torch.Tensor) else None


def wire_rows(x: Any, own: bool = False) -> tuple[np.ndarray, Any | None]:
    """x's rows in their wire form (`to_transport`), C-contiguous on the host, and how to give the answer back
    (`like_input`): x's device for a torch tensor, None for anything else (taken as a numpy array). `own`: the rows
    never share memory with x, so the caller may change x at once."""
    device, fresh = None, False
    if _torch_of(x) is not None:
        device, fresh = x.device, x.device.type != "cpu"
        values = _numpy_of(x.detach().cpu())
    else:
        values = np.asarray(x)
    # the same object where no copy was made: then the rows may be x's memory
    rows = to_transport(np.ascontiguousarray(values))
    if own and not fresh and rows is values:
        rows = rows.copy()
    return rows, device


def _numpy_of(cpu: Any) -> np.ndarray:
    """A CPU tensor as numpy, or its k's as uint8 where numpy has no twin of its dtype (bfloat16) but every value is
    k/255; TeacherRequestError otherwise (no wire dtype holds it)."""
    try:
        return cpu.numpy()
    except TypeError:
        as_float = cpu.float().numpy()
    is_k255, as_uint8 = _all_k255(as_float)
    if not is_k255:
        dtype = str(cpu.dtype).removeprefix("torch.")
        raise TeacherRequestError(f"inputs have dtype {dtype} (expected one of {', '.join(INPUT_DTYPES)})") from None
    return as_uint8.astype(np.uint8)


def like_input(probs: np.ndarray, device: Any | None) -> Any:
    """Soft targets as the inputs were asked: a torch tensor on `device` (from `wire_rows`) where there is one, else
    the array."""
    if device is None:
        return probs
    return sys.modules["torch"].from_numpy(probs).to(device)


def encode_inputs(rows: np.ndarray) -> bytes:
    """An upload's body: the rows as the `inputs` tensor."""
    return save({INPUTS_KEY: rows})


def encode_keys(rows: np.ndarray) -> bytes:
    """A keys-first body: the content hash of each row as it would be uploaded (the cache's own keys)."""
    keys = np.frombuffer(b"".join(row_keys(rows)), dtype=np.uint8).reshape(len(rows), KEY_BYTES)
    return save({KEYS_KEY: keys})


# safetensors' dtype names as torch spells them, with their numpy twins (None: numpy has none)
_DTYPES: dict[str, tuple[str, type | None]] = {
    "BOOL": ("bool", np.bool_),
    "U8": ("uint8", np.uint8),
    "I8": ("int8", np.int8),
    "U16": ("uint16", np.uint16),
    "I16": ("int16", np.int16),
    "U32": ("uint32", np.uint32),
    "I32": ("int32", np.int32),
    "U64": ("uint64", np.uint64),
    "I64": ("int64", np.int64),
    "F16": ("float16", np.float16),
    "BF16": ("bfloat16", None),
    "F32": ("float32", np.float32),
    "F64": ("float64", np.float64),
    "F8_E4M3": ("float8_e4m3fn", None),
    "F8_E5M2": ("float8_e5m2", None),
    "C64": ("complex64", np.complex64),
}


class UnreadableBody(ValueError):
    """A body safetensors does not read, or a tensor of a dtype this reader does not know."""


@dataclass(frozen=True)
class Tensor:
    """One tensor of an answer: its dtype as torch names it, its shape, and its values (exact: bfloat16 widened to
    float32; None for a dtype numpy has no twin of)."""

    dtype: str
    shape: tuple[int, ...]
    values: np.ndarray | None


def read_tensors(body: bytes) -> dict[str, Tensor]:
    """The tensors of a safetensors body, or UnreadableBody."""
    try:
        flat = deserialize(body)
    except SafetensorError as exc:
        raise UnreadableBody(str(exc)) from None
    return {name: _tensor(name, view) for name, view in flat}


def _tensor(name: str, view: dict) -> Tensor:
    if view["dtype"] not in _DTYPES:
        raise UnreadableBody(f"tensor {name!r} of dtype {view['dtype']}")
    dtype, twin = _DTYPES[view["dtype"]]
    shape = tuple(view["shape"])
    values = None
    if twin is not None:
        values = np.frombuffer(view["data"], dtype=twin).reshape(shape)
    elif dtype == "bfloat16":
        # bfloat16's bits are float32's upper half
        bits = np.frombuffer(view["data"], dtype=np.uint16).astype(np.uint32) << 16
        values = bits.view(np.float32).reshape(shape)
    return Tensor(dtype, shape, values)
