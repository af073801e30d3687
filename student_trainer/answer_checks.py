"""Every answer a trainer gets is checked here before a loss sees it: tensors, shapes, probabilities, the teacher.

One NaN in one answer poisons every weight it reaches, and a run saved from poisoned weights has lost its last good
ones; an answer from another teacher mid-run makes the run neither teacher's. Each check returns the value it checked
or raises BadAnswer, a phrase saying what was wrong and what was expected.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from shared import codec, protocol
from shared.protocol import TeacherInfo


class BadAnswer(ValueError):
    """What is wrong with an answer, as a phrase that follows "answered" ("rows that are not probabilities: ...")."""


# The dtypes a row of probabilities may travel in. The service answers float32; float16 and bfloat16 halve the bytes,
# and a local teacher under bf16 autocast answers bfloat16. Integers (uint8 "probabilities") or float8 are refused.
PROBS_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
EXPECTED_ROWS = "finite, non-negative rows summing to 1"


def row_sum_tolerance(dtype: torch.dtype, classes: int, members: int) -> float:
    """How far from 1 a row of K probabilities of an M-member teacher, answered in `dtype`, may sum:
    2 eps(dtype) + (K + M + 1) eps(float32).

    Why: the service (and a local teacher) compute in float32, a softmax over K logits (its normalising sum and the K
    divisions round the row's sum by at most about (K + 1) u, u = eps / 2 the unit roundoff), then a weighted sum of the
    M members' rows (about (M + 1) u more): a float32 row sums to 1 within (K + M + 2) u <= (K + M + 1) eps(float32).
    Rounding each probability to a narrower dtype moves it by at most u(dtype) relatively, so the sum by at most
    u(dtype); 2 eps(dtype) = 4 u(dtype) leaves room for a computation that rounded its inputs to that dtype as well
    (bf16 autocast's weighted sum: 3 u at most) and for float16's subnormals (under K 2^-25 in all). The sum is taken
    in float64, which adds nothing. Honest rows sit far inside the bound (docs/design/trainer.md): the check
    refuses wrong rows, not rounding.
    """
    return 2 * torch.finfo(dtype).eps + (classes + members + 1) * torch.finfo(torch.float32).eps


def checked_probs(probs: torch.Tensor | None, rows: int, classes: int, members: int) -> torch.Tensor:
    """`probs` itself, if it is `rows` rows of `classes` probabilities (dtype, shape, finite, non-negative, each row
    summing to 1 within `row_sum_tolerance`); else BadAnswer naming the first thing wrong."""
    if probs is None:
        raise BadAnswer("no 'probs' tensor (expected the probabilities (B, K) that were asked for)")
    if probs.dtype not in PROBS_DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in PROBS_DTYPES)
        raise BadAnswer(f"probabilities of dtype {str(probs.dtype).removeprefix('torch.')} (expected one of {names})")
    if tuple(probs.shape) != (rows, classes):
        raise BadAnswer(
            f"probabilities of shape {tuple(probs.shape)} (expected ({rows}, {classes}): one row for each of the "
            f"{rows} inputs asked about, over the teacher's {classes} classes)"
        )
    wrong = _first_wrong_row(probs, row_sum_tolerance(probs.dtype, classes, members))
    if wrong is not None:
        raise BadAnswer(f"rows that are not probabilities: {wrong} (expected {EXPECTED_ROWS})")
    return probs


def _first_wrong_row(probs: torch.Tensor, tolerance: float) -> str | None:
    """What is wrong with the first row that is not a probability distribution ("row 3 holds NaN"), or None.

    In numpy, as codec.to_transport is: torch would run a large answer's checks as OpenMP parallel regions whose
    threads spin on the cores the training step (or a co-located service) needs."""
    values = _float64_rows(probs)
    # inf - inf and the like: such rows are wrong anyway
    with np.errstate(all="ignore"):
        sums = values.sum(axis=1)
        wrong = ~np.isfinite(values).all(axis=1) | (values < 0).any(axis=1) | (np.abs(sums - 1) > tolerance)
    count = int(wrong.sum())
    if count == 0:
        return None
    i = int(np.flatnonzero(wrong)[0])
    row = values[i]
    if np.isnan(row).any():
        how = "holds NaN"
    elif np.isinf(row).any():
        how = f"holds {float(row[np.isinf(row)][0])}"
    elif (row < 0).any():
        how = f"holds {float(row.min()):.6g}"
    else:
        dtype = str(probs.dtype).removeprefix("torch.")
        total = float(sums[i])
        how = f"sums to {total:.6g} (off 1 by {abs(total - 1):.2g}, more than {dtype} rows may be: {tolerance:.2g})"
    also = f" (and {count - 1} more of the {len(values)} rows)" if count > 1 else ""
    return f"row {i} {how}{also}"


def _float64_rows(probs: torch.Tensor) -> np.ndarray:
    """The rows as float64 numpy, exactly (numpy has no bfloat16: its bits are float32's upper half)."""
    rows = probs.detach().cpu()
    if rows.dtype == torch.bfloat16:
        bits = rows.view(torch.int16).numpy().view(np.uint16).astype(np.uint32) << 16
        return bits.view(np.float32).astype(np.float64)
    return rows.numpy().astype(np.float64)


def checked_found(found: torch.Tensor | None, rows: int) -> torch.Tensor:
    """A keys-first answer's `found`: which of the `rows` keys the cache answered, as a bool tensor; else BadAnswer."""
    expected = f"(expected a uint8 tensor {protocol.FOUND_KEY!r} of shape ({rows},) holding 0s and 1s)"
    if found is None:
        raise BadAnswer(f"no {protocol.FOUND_KEY!r} tensor {expected}")
    if found.dtype not in (torch.uint8, torch.bool) or tuple(found.shape) != (rows,) or (found.numpy() > 1).any():
        dtype = str(found.dtype).removeprefix("torch.")
        raise BadAnswer(f"{protocol.FOUND_KEY!r} of dtype {dtype} and shape {tuple(found.shape)} {expected}")
    return found.bool()


def checked_teacher(headers: Mapping[str, str], started: TeacherInfo) -> None:
    """The answer comes from the teacher the run started with (X-Teacher and X-Teacher-Versions), else BadAnswer: a
    run whose targets change teacher mid-way is neither run's."""
    versions = [m.version for m in started.members]
    name, answered = headers.get(protocol.HEADER_TEACHER), headers.get(protocol.HEADER_TEACHER_VERSIONS)
    if name is None or answered is None:
        raise BadAnswer(
            f"without the {protocol.HEADER_TEACHER} and {protocol.HEADER_TEACHER_VERSIONS} headers (expected "
            f"{started.name!r} with member versions {versions}, the teacher the run started with)"
        )
    if name != started.name or answered.split(",") != versions:
        raise BadAnswer(
            f"as another teacher: {name[:200]!r} with member versions {answered[:400].split(',')}; the run started "
            f"with {started.name!r} with member versions {versions} (expected one teacher for the whole run: resume "
            "once the service serves that teacher again, or start a new run)"
        )


def cache_hits(headers: Mapping[str, str], rows: int) -> int:
    """X-Cache-Hits of an answer for `rows` rows (0 when absent), else BadAnswer."""
    text = headers.get(protocol.HEADER_CACHE_HITS, "0")
    try:
        hits = int(text)
    except ValueError:
        hits = -1
    if not 0 <= hits <= rows:
        raise BadAnswer(f"{protocol.HEADER_CACHE_HITS}: {text[:50]!r} (expected a whole number from 0 to {rows})")
    return hits


def decoded(body: bytes) -> dict[str, torch.Tensor]:
    """An answer's tensors, or BadAnswer saying what the body is instead."""
    try:
        return codec.decode(body)
    except codec.CodecError:
        start = f", starting {body[:40]!r}" if body else ""
        raise BadAnswer(f"a body that is not a safetensors file ({len(body)} bytes{start})") from None


def one_line(text: str, limit: int = 300) -> str:
    return " ".join(str(text).split())[:limit]
