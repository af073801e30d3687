"""A local teacher's answers are checked as the service's are, before a loss sees them: rows that are probabilities.

The checks are the client's (shared.client.answers, in numpy: the service's answers are checked there, inside the
client); this module applies them to torch rows, which may be bfloat16 (a local teacher under bf16 autocast) and on a
GPU. Each check returns the value it checked or raises BadAnswer, a phrase saying what was wrong and what was expected.
"""

from __future__ import annotations

import numpy as np
import torch

from shared.client import answers
from shared.client.answers import NO_PROBS, check_rows
from shared.client.errors import BadAnswer


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def row_sum_tolerance(dtype: torch.dtype, classes: int, members: int) -> float:
    """`shared.client.answers.row_sum_tolerance` for a torch dtype: 2 eps(dtype) + (K + M + 1) eps(float32) (its
    docstring derives the bound)."""
    return answers.row_sum_tolerance(_name(dtype), classes, members)


def checked_probs(probs: torch.Tensor | None, rows: int, classes: int, members: int) -> torch.Tensor:
    """`probs` itself, if it is `rows` rows of `classes` probabilities (dtype, shape, finite, non-negative, each row
    summing to 1 within `row_sum_tolerance`); else BadAnswer naming the first thing wrong."""
    if probs is None:
        raise BadAnswer(NO_PROBS)
    check_rows(_name(probs.dtype), tuple(probs.shape), lambda: _float64_rows(probs), rows, classes, members)
    return probs


def _float64_rows(probs: torch.Tensor) -> np.ndarray:
    """The rows as float64 numpy, exactly (numpy has no bfloat16: its bits are float32's upper half).

    In numpy, as the client's checks are: torch would run a large answer's checks as OpenMP parallel regions whose
    threads spin on the cores the training step (or a co-located service) needs."""
    rows = probs.detach().cpu()
    if rows.dtype == torch.bfloat16:
        bits = rows.view(torch.int16).numpy().view(np.uint16).astype(np.uint32) << 16
        return bits.view(np.float32).astype(np.float64)
    return rows.numpy().astype(np.float64)
