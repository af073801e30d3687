"""Soft targets for the trainer: from the teacher service over HTTP, or from a local teacher in-process.

Both are a `Teacher`: a callable `teacher(x) -> probs` (B, K), tempered and ensemble-aggregated,
so a training method never knows which one it has, and `teacher.submit(x)`, the same answer asked for
now and collected later (the service's client has the query in flight meanwhile). Neither is trusted:
every answer is checked (`shared.client.answers`, `answer_checks`) before a loss sees it. The service's is the
public client (`shared.client.TeacherClient`), seen as a Teacher.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Protocol

import torch

from shared.client import TeacherClient
from shared.client import TeacherInfo as ClientTeacherInfo

# the client's errors, raised here too: the trainer catches them by these names
from shared.client.errors import TeacherAnswerError, TeacherRequestError, TeacherUnavailable  # noqa: F401
from shared.client.query_thread import Pending, settled
from shared.protocol import CacheMode, TeacherInfo
from student_trainer.answer_checks import BadAnswer, checked_probs


class Teacher(Protocol):
    """Where a run's soft targets come from (RemoteTeacher or LocalTeacher)."""

    name: str | None
    temperature: float
    # Counters since the teacher was made: rows asked for, how many of them the service's cache answered, and how many
    # were uploaded whole (the rest were asked for by key, or never left the process).
    rows_requested: int
    cache_hits: int
    rows_uploaded: int
    # Whether submit() returns before the answer is computed (elsewhere: the service's client), so that asking early
    # hides the wait; False where it is computed by the caller's own thread (in-process), where asking early gains
    # nothing.
    overlaps: bool

    def info(self) -> TeacherInfo:
        """What the teacher is (classes, input shape, members); checked against the dataset before training."""

    def __call__(self, x: torch.Tensor, *, adversarial: bool = False) -> torch.Tensor:
        """Soft targets (B, K) for inputs x (B, C, H, W) in [0, 1], on x's device; `adversarial`: x was made by an
        attack (it picks the service's cache mode). Raises TeacherAnswerError rather than return rows that are not
        probabilities."""

    def submit(self, x: torch.Tensor, *, adversarial: bool = False) -> Pending:
        """`self(x, adversarial=...)`, asked for now: `.result()` gives what the call gives and raises what it raises.
        x is copied before submit returns, so the caller may change it at once. Answers are given in the order asked."""

    def close(self) -> None:
        """Never waits for a query in flight: its answer is dropped, and its threads end by themselves."""


class RemoteTeacher:
    """The teacher service as a `Teacher`: `shared.client.TeacherClient` on torch tensors, with the trainer's settings.

    What a call does (replicas and failover, retries with jittered backoff, the whole-request deadline, keys first, the
    cache modes, the answer checks, the query thread of `submit`) is the client's; see its docstring. This adds the
    Teacher protocol: calls on torch tensors, answered as float32 on x's device, and the served teacher as the
    protocol's TeacherInfo (pydantic), as a local teacher gives it.
    """

    overlaps = True

    def __init__(
        self,
        url: str | list[str],
        name: str | None,
        temperature: float,
        token: str | None = None,
        timeout_s: float = 60.0,
        give_up_after_s: float = 300.0,
        max_backoff_s: float = 5.0,
        clean_cache: CacheMode = CacheMode.use,
        adversarial_cache: CacheMode = CacheMode.bypass,
        affinity: bool = True,
        keys_first: bool = True,
        shared_memory: bool = True,
    ):
        self.client = TeacherClient(
            url,
            name,
            temperature,
            token=token,
            timeout_s=timeout_s,
            give_up_after_s=give_up_after_s,
            max_backoff_s=max_backoff_s,
            clean_cache=clean_cache,
            adversarial_cache=adversarial_cache,
            affinity=affinity,
            keys_first=keys_first,
            shared_memory=shared_memory,
        )
        self.url, self.temperature = self.client.url, temperature

    @property
    def name(self) -> str | None:
        """The teacher's name: the one asked for, or the only one served once the service has said."""
        return self.client.name

    @property
    def rows_requested(self) -> int:
        return self.client.rows_requested

    @property
    def cache_hits(self) -> int:
        return self.client.cache_hits

    @property
    def rows_uploaded(self) -> int:
        return self.client.rows_uploaded

    @property
    def shared_memory(self) -> bool:
        """Whether rows and answers go through shared memory: asked for, offered by one service on this host, and
        not refused since (known once info() has run)."""
        return self.client.shared_memory

    @property
    def keys_first(self) -> bool:
        """Whether cached rows are asked for by key: asked for, and offered (known once info() has run)."""
        return self.client.keys_first

    def info(self) -> TeacherInfo:
        """The client's `info()` (every replica checked), as the protocol's model."""
        return _protocol_info(self.client.info())

    def __call__(self, x: torch.Tensor, *, adversarial: bool = False) -> torch.Tensor:
        return self.client.soft_targets(x, adversarial=adversarial)

    def submit(self, x: torch.Tensor, *, adversarial: bool = False) -> Pending:
        return self.client.submit(x, adversarial=adversarial)

    def close(self) -> None:
        self.client.close()


def _protocol_info(info: ClientTeacherInfo) -> TeacherInfo:
    """The client's TeacherInfo (dataclasses, read without pydantic) as the protocol's: the same fields."""
    return TeacherInfo.model_validate(dataclasses.asdict(info))


class LocalTeacher:
    """The same teacher, in this process: for runs without a service, and the reference for tests.

    A thin shell over the service's in-process entry (teacher_service.local), which runs the members through the
    service's own forward path and ensemble formula, so both give the same numbers on one device. Its rows pass the
    same checks as the service's (`checked_probs`): a member with NaN weights must end the run, not poison it.
    """

    overlaps = False

    def __init__(self, config_path: str | Path, name: str | None, temperature: float | None, device: torch.device):
        """`temperature=None`: the teacher's own, as the service uses when a request names none."""
        from teacher_service.local import InProcessTeacher

        self._teacher = InProcessTeacher(config_path, name, device)
        self._info = self._teacher.info()
        self._config_path = config_path
        self.name = self._teacher.name
        self.temperature = self._teacher.default_temperature if temperature is None else temperature
        self.rows_requested = 0
        self.cache_hits = 0
        # nothing leaves the process
        self.rows_uploaded = 0

    def info(self) -> TeacherInfo:
        return self._info

    def __call__(self, x: torch.Tensor, *, adversarial: bool = False) -> torch.Tensor:
        """`adversarial` only matters to a cache, which this has none of."""
        self.rows_requested += len(x)
        probs = self._teacher.probs(x, self.temperature)
        try:
            checked_probs(probs, len(x), self._info.num_classes, len(self._info.members))
        except BadAnswer as exc:
            raise TeacherAnswerError(f"the local teacher {self.name!r} ({self._config_path}) answered {exc}") from None
        return probs.to(x.device)

    def submit(self, x: torch.Tensor, *, adversarial: bool = False) -> Pending:
        """The call's answer, computed now on the caller's thread (a thread of its own would only compete with the
        caller for the same cores), as a future that is already done."""
        return settled(lambda: self(x, adversarial=adversarial))

    def close(self) -> None:
        pass
