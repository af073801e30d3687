"""Tensors to bytes and back (safetensors), and the checks an input batch must pass.

Both sides call these, so a trainer builds exactly the bytes the service expects.
"""

from __future__ import annotations

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save

from shared.protocol import INPUT_DTYPES, INPUTS_KEY


class CodecError(ValueError):
    """A body or tensor that breaks the protocol; carries what was expected and what came."""

    def __init__(self, code: str, message: str, expected: str | None = None, received: str | None = None):
        super().__init__(message)
        self.code, self.message, self.expected, self.received = code, message, expected, received


def encode(tensors: dict[str, torch.Tensor]) -> bytes:
    return _st_save({name: t.detach().contiguous().cpu() for name, t in tensors.items()})


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
    """The smallest exact wire dtype: uint8 when every value is k/255, else the tensor as is."""
    if inputs.dtype == torch.uint8:
        return inputs
    scaled = inputs.float() * 255.0
    as_uint8 = scaled.round()
    if torch.equal(as_uint8 / 255.0, inputs.float()):
        return as_uint8.to(torch.uint8)
    return inputs


def _describe(t: torch.Tensor) -> str:
    return f"{str(t.dtype).removeprefix('torch.')} tensor of shape {tuple(t.shape)}"


def validate_inputs(tensors: dict[str, torch.Tensor], input_shape: tuple[int, int, int]) -> torch.Tensor:
    """Return the `inputs` tensor after checking name, dtype, shape, finiteness and range."""
    if INPUTS_KEY not in tensors:
        found = ", ".join(map(repr, tensors)) or "no tensors"
        raise CodecError("missing_inputs", f"the body has no {INPUTS_KEY!r} tensor", f"a tensor named {INPUTS_KEY!r}", found)
    x = tensors[INPUTS_KEY]
    dtype = str(x.dtype).removeprefix("torch.")
    if dtype not in INPUT_DTYPES:
        raise CodecError("bad_dtype", f"inputs have dtype {dtype}", f"one of {', '.join(INPUT_DTYPES)}", dtype)
    expected_shape = f"(B, {', '.join(map(str, input_shape))}) with B >= 1"
    if x.ndim != 4 or tuple(x.shape[1:]) != tuple(input_shape) or x.shape[0] < 1:
        only_channels_differ = x.ndim == 4 and x.shape[0] >= 1 and tuple(x.shape[2:]) == tuple(input_shape[1:])
        code = "bad_channels" if only_channels_differ else "bad_shape"
        raise CodecError(code, f"inputs have the wrong shape {tuple(x.shape)}", expected_shape, _describe(x))
    if x.dtype != torch.uint8:
        # numpy, not torch: the service validates on its event loop or a worker thread, and keeps torch's
        # parallel (OpenMP) work on its inference thread, where the forward pass needs every core
        values = x.numpy()
        finite = np.isfinite(values)
        if not finite.all():
            bad = int((~finite).sum())
            raise CodecError("not_finite", f"inputs hold {bad} NaN/Inf value(s)", "finite values in [0, 1]", f"{bad} non-finite values")
        lo, hi = float(values.min()), float(values.max())
        if lo < 0.0 or hi > 1.0:
            raise CodecError(
                "out_of_range",
                "float inputs must already be scaled to [0, 1]",
                "values in [0, 1] (or uint8 in 0..255)",
                f"values in [{lo:g}, {hi:g}]",
            )
    return x


def to_unit_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 0..255 -> float32 in [0,1]; float inputs are already in [0,1]."""
    if x.dtype == torch.uint8:
        return x.to(torch.float32).div_(255.0)
    return x.to(torch.float32)
