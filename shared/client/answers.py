"""Every answer a client gets is checked here before it is handed on: tensors, shapes, probabilities, the teacher.

One NaN in one answer poisons every weight it reaches, and a run saved from poisoned weights has lost its last good
ones; an answer from another teacher mid-run makes the run neither teacher's. Each check returns the value it checked
or raises BadAnswer, a phrase saying what was wrong and what was expected. In numpy: the trainer checks a local
teacher's torch rows with the same functions (student_trainer.answer_checks).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from shared.client.arrays import Tensor, UnreadableBody, read_tensors
from shared.client.errors import BadAnswer
from shared.client.listing import TeacherInfo
from shared.wire import FOUND_KEY, HEADER_CACHE_HITS, HEADER_TEACHER, HEADER_TEACHER_VERSIONS

# The dtypes a row of probabilities may travel in. The service answers float32; float16 and bfloat16 halve the bytes,
# and a local teacher under bf16 autocast answers bfloat16. Integers (uint8 "probabilities") or float8 are refused.
PROBS_DTYPES = ("float16", "bfloat16", "float32", "float64")
EXPECTED_ROWS = "finite, non-negative rows summing to 1"
# each dtype's machine epsilon (torch.finfo(dtype).eps), exactly
_EPS = {"float16": 2.0**-10, "bfloat16": 2.0**-7, "float32": 2.0**-23, "float64": 2.0**-52}


def row_sum_tolerance(dtype: str, classes: int, members: int) -> float:
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
    return 2 * _EPS[dtype] + (classes + members + 1) * _EPS["float32"]


def check_rows(
    dtype: str, shape: tuple[int, ...], values: Callable[[], np.ndarray], rows: int, classes: int, members: int
) -> None:
    """`rows` rows of `classes` probabilities (dtype, shape, then `values()` as float64: finite, non-negative, each row
    summing to 1 within `row_sum_tolerance`); else BadAnswer naming the first thing wrong."""
    if dtype not in PROBS_DTYPES:
        raise BadAnswer(f"probabilities of dtype {dtype} (expected one of {', '.join(PROBS_DTYPES)})")
    if tuple(shape) != (rows, classes):
        raise BadAnswer(
            f"probabilities of shape {tuple(shape)} (expected ({rows}, {classes}): one row for each of the "
            f"{rows} inputs asked about, over the teacher's {classes} classes)"
        )
    wrong = _first_wrong_row(values(), dtype, row_sum_tolerance(dtype, classes, members))
    if wrong is not None:
        raise BadAnswer(f"rows that are not probabilities: {wrong} (expected {EXPECTED_ROWS})")


NO_PROBS = "no 'probs' tensor (expected the probabilities (B, K) that were asked for)"


def checked_probs(probs: Tensor | None, rows: int, classes: int, members: int) -> np.ndarray:
    """An answer's `probs`, checked (`check_rows`), as float32."""
    if probs is None:
        raise BadAnswer(NO_PROBS)
    check_rows(probs.dtype, probs.shape, lambda: probs.values.astype(np.float64), rows, classes, members)
    return probs.values.astype(np.float32, copy=False)


def _first_wrong_row(values: np.ndarray, dtype: str, tolerance: float) -> str | None:
    """What is wrong with the first row of float64 `values` that is not a probability distribution ("row 3 holds
    NaN"), or None."""
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
        total = float(sums[i])
        how = f"sums to {total:.6g} (off 1 by {abs(total - 1):.2g}, more than {dtype} rows may be: {tolerance:.2g})"
    also = f" (and {count - 1} more of the {len(values)} rows)" if count > 1 else ""
    return f"row {i} {how}{also}"


def checked_found(found: Tensor | None, rows: int) -> np.ndarray:
    """A keys-first answer's `found`: which of the `rows` keys the cache answered, as bools; else BadAnswer."""
    expected = f"(expected a uint8 tensor {FOUND_KEY!r} of shape ({rows},) holding 0s and 1s)"
    if found is None:
        raise BadAnswer(f"no {FOUND_KEY!r} tensor {expected}")
    if found.dtype not in ("uint8", "bool") or found.shape != (rows,) or (found.values > 1).any():
        raise BadAnswer(f"{FOUND_KEY!r} of dtype {found.dtype} and shape {found.shape} {expected}")
    return found.values.astype(bool)


def checked_teacher(headers: Mapping[str, str], started: TeacherInfo) -> None:
    """The answer comes from the teacher the client started with (X-Teacher and X-Teacher-Versions), else BadAnswer:
    a run whose targets change teacher mid-way is neither run's."""
    versions = [m.version for m in started.members]
    name, answered = headers.get(HEADER_TEACHER), headers.get(HEADER_TEACHER_VERSIONS)
    if name is None or answered is None:
        raise BadAnswer(
            f"without the {HEADER_TEACHER} and {HEADER_TEACHER_VERSIONS} headers (expected "
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
    text = headers.get(HEADER_CACHE_HITS, "0")
    try:
        hits = int(text)
    except ValueError:
        hits = -1
    if not 0 <= hits <= rows:
        raise BadAnswer(f"{HEADER_CACHE_HITS}: {text[:50]!r} (expected a whole number from 0 to {rows})")
    return hits


def decoded(body: bytes) -> dict[str, Tensor]:
    """An answer's tensors, or BadAnswer saying what the body is instead."""
    try:
        return read_tensors(body)
    except UnreadableBody:
        start = f", starting {body[:40]!r}" if body else ""
        raise BadAnswer(f"a body that is not a safetensors file ({len(body)} bytes{start})") from None
