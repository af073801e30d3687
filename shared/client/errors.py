"""What a teacher client raises: the service stayed away, it refused a request, or it answered something unusable.

The trainer raises the same three (student_trainer.teacher_client re-exports them), and its one-line messages are
these exceptions' own. BadAnswer never leaves a client: it becomes a TeacherAnswerError naming who answered.
"""

from __future__ import annotations


class TeacherUnavailable(RuntimeError):
    """The service stayed unreachable (or saturated) for longer than the client allows (`give_up_after_s`)."""


class TeacherRequestError(RuntimeError):
    """The service refused a request (a 4xx), or the inputs cannot be sent: retrying would not help. `status` is the
    HTTP status, or None where no answer said so; `code`, the service's error code where its answer had one."""

    def __init__(self, message: str, status: int | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.code = status, code


class TeacherAnswerError(TeacherRequestError):
    """The teacher answered something other than the soft targets asked for: a body that does not decode, the wrong
    tensors or shape, rows that are not probabilities, another teacher. No loss may see it; a TeacherRequestError
    because asking the same teacher again would not help (another replica is asked once)."""


class BadAnswer(ValueError):
    """What is wrong with an answer, as a phrase that follows "answered" ("rows that are not probabilities: ...")."""


def one_line(text: object, limit: int = 300) -> str:
    """`text` on one line, at most `limit` characters: what a message quotes of an answer or an error."""
    return " ".join(str(text).split())[:limit]
