"""AsyncTeacherClient: the teacher service's client for asyncio code, on httpx.AsyncClient.

The same calls as TeacherClient, awaited, with the same meaning: `ClientCore` decides every request, retry, check and
count; this module sends the requests on the event loop and waits out the pauses there. Calls may run concurrently
(asyncio.gather): each is its own generator of steps, and the core's state is touched only between awaits.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, TypeVar

import httpx

from shared.client.arrays import like_input, wire_rows
from shared.client.core import ClientCore, Failure, Outcome, Send, Steps, Wait
from shared.client.listing import TeacherInfo

T = TypeVar("T")


class AsyncTeacherClient(ClientCore):
    """`await client.soft_targets(x)`: TeacherClient's answers, bit for bit, for the same inputs; see `ClientCore` for
    the arguments. Each request whole is bounded by timeout_s (asyncio.wait_for: an answer trickling in is cut off
    there). One event loop a client. aclose() (or `async with`) ends it: calls in flight stop at their next round,
    and the connections close once the last of them is done."""

    def _connect(self) -> None:
        self._replicas = [
            httpx.AsyncClient(base_url=u, headers=self.headers, timeout=self.timeout_s) for u in self.urls
        ]
        # its calls may run at once, and a client has one shared-memory region: its rows go in request bodies
        self.wants_shared_memory = False
        # set by aclose(): ends a retry's wait at once
        self._wake = asyncio.Event()
        self._in_flight = 0

    async def info(self) -> TeacherInfo:
        """The served teacher, checked on every replica; see `ClientCore.info_steps`."""
        return await self._run(self.info_steps())

    async def soft_targets(self, x: Any, *, adversarial: bool = False) -> Any:
        """The soft targets (B, K) for inputs x (B, C, H, W), as TeacherClient.soft_targets. x is copied (in its wire
        form) before the first await, so the caller may change it while the call is under way."""
        rows, device = wire_rows(x, own=True)
        return like_input(await self._run(self.query_steps(rows, adversarial)), device)

    async def _run(self, steps: Steps[T]) -> T:
        self._in_flight += 1
        try:
            outcome: Outcome | None = None
            while True:
                try:
                    step = steps.send(outcome)
                except StopIteration as end:
                    return end.value
                if isinstance(step, Wait):
                    await self._pause(step.seconds)
                    outcome = None
                else:
                    outcome = await self._request(step)
        finally:
            self._in_flight -= 1
            if self.closed and self._in_flight == 0:
                await self._shut()

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)

    async def _request(self, send: Send) -> Outcome:
        """One request to one replica, complete within timeout_s, or the Failure it came to."""
        replica = self._replicas[send.replica]
        request = replica.request(
            send.method, send.path, params=send.params, headers=send.headers, content=send.content
        )
        try:
            return await asyncio.wait_for(request, self.timeout_s)
        except TimeoutError:
            return Failure.overdue(self.timeout_s)
        except (httpx.TransportError, httpx.DecodingError) as exc:
            return Failure.of(exc)

    async def aclose(self) -> None:
        """No request sends after this; a call waiting to retry ends at once (RuntimeError: closed)."""
        self.closed = True
        self._wake.set()
        if self._in_flight == 0:
            await self._shut()

    async def _shut(self) -> None:
        for replica in self._replicas:
            await replica.aclose()

    async def __aenter__(self) -> AsyncTeacherClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
