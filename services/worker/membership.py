"""Membership: register with the scheduler, then heartbeat every interval, whatever happens.

The scheduler may be down, restarting or have lost its Redis: registration is retried every
interval, a NOT_FOUND heartbeat means "register again" (with the stages already held, so the
scheduler can rebuild its view), and any other failure is logged and retried. The worker keeps
serving throughout. Every reply's epoch goes to on_epoch, which fences stale instructions.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable, Protocol

from modelgrid.errors import ModelGridError, NotFound
from services.worker.runtime import WorkerStatus

log = logging.getLogger(__name__)


class SchedulerLink(Protocol):
    async def register(self, status: WorkerStatus) -> tuple[float, int]: ...

    async def heartbeat(self, status: WorkerStatus) -> int: ...


class Membership:
    def __init__(
        self,
        scheduler: SchedulerLink,
        status: Callable[[], WorkerStatus],
        on_epoch: Callable[[int], None],
        interval_s: float = 1.0,
    ) -> None:
        self.scheduler = scheduler
        self.status = status
        self.on_epoch = on_epoch
        self.interval_s = interval_s  # replaced by the scheduler's value on registration
        self.registered = False
        self.heartbeats = 0  # successful ones, for tests and logs
        self._failures = 0
        self._task: asyncio.Task | None = None
        self._wake = asyncio.Event()
        self._stopping = False

    def start(self) -> None:
        self._task = asyncio.create_task(self.run(), name="membership")

    def poke(self) -> None:
        """Heartbeat now rather than at the next tick (e.g. right after a stage loads)."""
        self._wake.set()

    async def stop(self) -> None:
        """Stop heartbeating; returns once the loop has ended (a worker that leaves must not hang here)."""
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task})  # unlike `await task`, our own cancellation still propagates
            self._task = None

    async def run(self) -> None:
        while not self._stopping:
            self._wake.clear()
            await self.tick()
            await self._pause()

    async def _pause(self) -> None:
        """Until poked or interval_s passed. Not asyncio.wait_for: on Python 3.11 it swallows a cancel
        that lands just as the event is set, and stop() then waited forever (seen: a SIGTERM'd worker
        that never exited)."""
        waiter = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait({waiter}, timeout=self.interval_s)
        finally:
            waiter.cancel()

    async def tick(self) -> None:
        """One register-or-heartbeat attempt; never raises (except cancellation)."""
        try:
            if not self.registered:
                interval, epoch = await self.scheduler.register(self.status())
                if interval > 0:
                    self.interval_s = max(0.05, interval)
                self.registered = True
                log.info("registered with the scheduler; heartbeat every %.2f s, epoch %d", self.interval_s, epoch)
            else:
                epoch = await self.scheduler.heartbeat(self.status())
                self.heartbeats += 1
            self.on_epoch(epoch)
            if self._failures:
                log.info("scheduler reachable again after %d failed attempt(s)", self._failures)
            self._failures = 0
        except NotFound as err:
            if not self.registered:  # registration itself refused: treat like any failure
                self._failures += 1
                log.warning("scheduler refused registration: %s", err.message)
                return
            log.info("scheduler does not know this worker (it restarted or our heartbeat expired); registering again")
            self.registered = False
            self._wake.set()  # re-register right away
        except ModelGridError as err:
            self._failures += 1
            level = logging.WARNING if self._failures in (1, 10) or self._failures % 60 == 0 else logging.DEBUG
            log.log(level, "scheduler %s failed (%s, attempt %d): %s; retrying every %.2f s",
                    "registration" if not self.registered else "heartbeat", err.code, self._failures,
                    err.message, self.interval_s)
        except Exception:
            self._failures += 1
            log.exception("membership tick failed; retrying")
