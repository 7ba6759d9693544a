"""Resync: after the scheduler starts, or finds that Redis lost its state, wait for the workers to come back
before changing any placement.

Redis is soft state. When it restarts empty (or is flushed) the placements and memberships are gone, but
the workers still hold their stages and serve the streams in flight; each one's next heartbeat gets
NOT_FOUND and it registers again, reporting what it holds. Placing in the meantime would place on the
first workers back: stages loaded on the others would be loaded twice, then unloaded under their sessions.
The same holds when the scheduler restarts after being down longer than a heartbeat TTL.

So while resyncing the controller leaves alone every version that some worker not back yet may hold: one
whose placement names such a worker, or, with its placement lost, one that a worker holds part of or while
any awaited worker is away. Versions nobody knows of are placed as usual. Resync ends when every worker
known from before is back, or after `window_s` (a worker not back by then is gone).
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Collection, Mapping

from services.common.clock import now_ms

log = logging.getLogger(__name__)

Live = Mapping[str, int]  # registered workers: id -> unix ms of their last registration or heartbeat


class Resync:
    """When the controller must leave placements alone. Pure state; the controller feeds it.

    A worker is back once it registered or heartbeated after the resync began: a key that survived in
    Redis proves nothing (after a scheduler restart it may expire a moment later, the worker's channel
    still waiting to reconnect).
    """

    def __init__(
        self, window_s: float, clock: Callable[[], float] = time.monotonic, wall_ms: Callable[[], int] = now_ms
    ) -> None:
        self.window_s = window_s
        self._clock = clock
        self._wall_ms = wall_ms
        self._until = 0.0
        self._since_ms = 0
        self._awaited: set[str] = set()
        self.begin(set(), "the scheduler started")

    def begin(self, awaited: Collection[str], why: str) -> None:
        """Start (or restart) a resync, waiting at most window_s for the workers in `awaited`."""
        self._until = self._clock() + self.window_s
        self._since_ms = self._wall_ms()
        self._awaited = set(awaited)
        log.info(
            "resync (%s): no placement changes until %s re-register, for at most %.1f s",
            why, ", ".join(sorted(self._awaited)) or "the workers", self.window_s,
        )

    def await_also(self, worker_ids: Collection[str]) -> None:
        """More workers to wait for (e.g. the members Redis still lists at start-up)."""
        if self.active_window():
            self._awaited |= set(worker_ids)

    def active_window(self) -> bool:
        return self._clock() < self._until

    def missing(self, live: Live) -> set[str]:
        """Awaited workers not back yet (none once the resync is over)."""
        if not self.active_window():
            return set()
        return {w for w in self._awaited if live.get(w, -1) < self._since_ms}

    def awaits(self, worker_id: str, live: Live) -> bool:
        """Whether worker_id is awaited and not back yet."""
        return worker_id in self.missing(live)

    def awaits_any(self, live: Live) -> bool:
        return bool(self.missing(live))

    def active(self, live: Live) -> bool:
        """Still resyncing, given the workers registered now. Ends early once every awaited one is back."""
        if not self.active_window():
            return False
        if self._awaited and not self.missing(live):
            log.info("resync over: %s came back", ", ".join(sorted(self._awaited)))
            self._until = 0.0
            return False
        return True
