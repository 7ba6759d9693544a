"""KV-cache admission: a new session reserves its KV bytes up front, within the worker's budget.

A session asks for the bytes its cache will ever need (prompt + max_session_tokens) when it starts
on a stage. It gets them at once when they fit; otherwise it queues, in arrival order, until
sessions closing or being evicted free enough, or until timeout_s passes, when it is refused with
RESOURCE_EXHAUSTED saying what it needed, what was free and the budget. A session that already
holds state on this worker (it is at its next stage here) queues ahead of new ones, since it is
further along and will free its bytes sooner.

Everything here runs on the event loop; only `wake` may be called from other threads.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

from modelgrid.errors import ResourceExhausted
from services.worker.sessions import SessionStore, StageKey

log = logging.getLogger(__name__)


@dataclass
class _Waiter:
    session_id: str
    stage: StageKey
    nbytes: int
    known: bool  # the session holds state on another stage of this worker
    granted: asyncio.Future = field(repr=False)


@dataclass
class AdmissionStats:
    admitted: int = 0
    waited: int = 0  # admissions that had to queue (granted later or refused)
    refused: int = 0


class KVAdmission:
    def __init__(
        self,
        sessions: SessionStore,
        limit: Callable[[], int],
        timeout_s: float,
        worker_id: Callable[[], str] = lambda: "worker",
    ) -> None:
        self._sessions = sessions
        self._limit = limit  # the KV budget in bytes right now
        self.timeout_s = timeout_s
        self._worker_id = worker_id
        self._queue: collections.deque[_Waiter] = collections.deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.stats = AdmissionStats()

    @property
    def queued(self) -> int:
        """Sessions waiting for KV memory right now."""
        return len(self._queue)

    def try_admit(self, session_id: str, stage: StageKey, nbytes: int, tokens: int) -> bool:
        """Reserve nbytes at once if they fit and nobody waits ahead; False when admit() would have to wait.
        ResourceExhausted when nbytes exceed the whole budget."""
        limit = self._limit()
        if nbytes > limit:
            self.stats.refused += 1
            raise ResourceExhausted(
                f"worker {self._worker_id()} cannot hold session {session_id} on {stage}: its KV cache for "
                f"{tokens} tokens needs {nbytes} bytes, more than the whole KV budget of {limit} bytes; "
                "ask for fewer tokens"
            )
        if not self._queue and self._sessions.try_reserve(session_id, stage, nbytes, limit):
            self.stats.admitted += 1
            return True
        return False

    async def admit(self, session_id: str, stage: StageKey, nbytes: int, tokens: int) -> None:
        """Reserve nbytes for the session's cache on stage, waiting up to timeout_s; else ResourceExhausted."""
        self._loop = asyncio.get_running_loop()
        if self.try_admit(session_id, stage, nbytes, tokens):
            return
        waiter = _Waiter(session_id, stage, nbytes, self._sessions.known(session_id), self._loop.create_future())
        self._enqueue(waiter)
        self.stats.waited += 1
        started = time.monotonic()
        try:
            await asyncio.wait([waiter.granted], timeout=self.timeout_s)
        except asyncio.CancelledError:  # the caller went away: give back what it may have been granted
            if waiter.granted.done() and not waiter.granted.cancelled():
                self._release_unused(session_id, stage)
            raise
        finally:
            if not waiter.granted.done():
                waiter.granted.cancel()
            self._pump()  # a waiter leaving the head may let the next ones in
        if not waiter.granted.cancelled():
            return
        self.stats.refused += 1
        raise ResourceExhausted(no_room(
            self._worker_id(), session_id, stage, nbytes, tokens, self._limit(), self._sessions.kv_bytes(),
            time.monotonic() - started,
        ))

    def wake(self) -> None:
        """Memory was freed or the budget grew (any thread): let in the waiting sessions that now fit."""
        loop = self._loop
        if loop is None or not self._queue:
            return
        try:
            loop.call_soon_threadsafe(self._pump)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    def _enqueue(self, waiter: _Waiter) -> None:
        if waiter.known:  # ahead of every new session, behind the other known ones
            index = next((i for i, w in enumerate(self._queue) if not w.known), len(self._queue))
            self._queue.insert(index, waiter)
        else:
            self._queue.append(waiter)

    def _pump(self) -> None:
        """Grant waiters in queue order while the head fits (no overtaking: big requests are not starved)."""
        while self._queue:
            head = self._queue[0]
            if head.granted.done():  # timed out or cancelled
                self._queue.popleft()
                continue
            if not self._sessions.try_reserve(head.session_id, head.stage, head.nbytes, self._limit()):
                return
            self._queue.popleft()
            head.granted.set_result(None)
            self.stats.admitted += 1

    def _release_unused(self, session_id: str, stage: StageKey) -> None:
        session = self._sessions.peek(session_id, stage)
        if session is not None and session.cache is None:
            self._sessions.drop(session_id, stage)


def no_room(
    worker_id: str, session_id: str, stage: StageKey, nbytes: int, tokens: int, limit: int, used: int,
    waited_s: float = 0.0,
) -> str:
    """The message of a refused admission: bytes needed, free, and the budget."""
    return (
        f"worker {worker_id} has no KV-cache memory for session {session_id} on {stage}: it needs {nbytes} "
        f"bytes ({tokens} tokens), {max(0, limit - used)} bytes are free of the {limit}-byte KV budget "
        f"({used} in use); waited {waited_s:.1f} s. Retry later or ask for fewer tokens"
    )
