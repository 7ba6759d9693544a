"""What one request does when a stage fails under it: drop the route, avoid the worker, get a replacement.

The scheduler's GetRoute with the failed worker excluded answers at once with another ready replica of
the span when one exists, so a failover never waits for the scheduler to notice the death (heartbeat
expiry): it costs one GetRoute and the replay. A worker that failed with UNAVAILABLE is also avoided by
every other request of this gateway for `avoid_s` (a soft exclusion: used again if it is all that is
left) and reported to the scheduler in the background, which probes it and re-places its stages.

Bounds: at most `max_failovers` failed hops per request (backoff from the second one), and
`max_route_waits` waits for a route (model loading, a replacement being loaded, the scheduler
restarting), all within the request's deadline. The client sees UNAVAILABLE only when no replacement
comes, with a message naming the span and the last error.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

from prometheus_client import Counter, Histogram

from modelgrid.errors import DeadlineExceeded, FailedPrecondition, ModelGridError, ResourceExhausted, Unavailable
from services.gateway.domain import Hop, Route, VersionInfo
from services.gateway.upstream import RouteCache, SchedulerClient, Workers

log = logging.getLogger(__name__)

FAILOVERS = Counter(
    "modelgrid_gateway_failovers_total", "Hops that failed under a request and were re-routed", ["code"]
)
FAILOVER_SECONDS = Histogram(
    "modelgrid_gateway_failover_seconds",
    "Time a generation step lost to failures: from the first failed hop to the step's token after the replay",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)


@dataclass(frozen=True)
class RetryPolicy:
    max_failovers: int = 3  # failed hops one request survives (each followed by a re-route and a replay)
    backoff_s: float = 0.2  # wait before the second re-route and between route waits; doubles each time
    max_backoff_s: float = 1.0
    max_route_waits: int = 12  # waits for a route (loading, resyncing, restarting): about 10 s with the above
    avoid_s: float = 10.0  # how long every request avoids a worker that failed with UNAVAILABLE


class AvoidList:
    """Workers that failed recently; every request avoids them for ttl_s (unless nothing else is left)."""

    def __init__(self, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s = ttl_s
        self._clock = clock
        self._until: dict[str, float] = {}

    def add(self, worker_id: str) -> bool:
        """Avoid worker_id from now on; True when it was not avoided already (report it then)."""
        now = self._clock()
        fresh = self._until.get(worker_id, 0.0) <= now
        self._until[worker_id] = now + self.ttl_s
        return fresh

    def current(self) -> frozenset[str]:
        now = self._clock()
        self._until = {w: t for w, t in self._until.items() if t > now}
        return frozenset(self._until)


@dataclass
class Router:
    """Everything a request needs to reach the workers, shared by all requests of a gateway."""

    routes: RouteCache
    scheduler: SchedulerClient
    workers: Workers
    policy: RetryPolicy
    avoid: AvoidList | None = None  # default: AvoidList(policy.avoid_s)
    _reports: set[asyncio.Task] = field(default_factory=set)

    def __post_init__(self) -> None:
        if self.avoid is None:
            self.avoid = AvoidList(self.policy.avoid_s)

    def report_soon(self, worker_id: str, reason: str) -> None:
        """Tell the scheduler in the background: its health probe must not delay the failover."""

        async def report() -> None:
            try:
                await self.scheduler.report_failure(worker_id, reason)
            except Exception as err:  # noqa: BLE001 - best effort, e.g. the gateway is shutting down
                log.debug("failure report for %s not sent: %s", worker_id, err)

        task = asyncio.ensure_future(report())
        self._reports.add(task)
        task.add_done_callback(self._reports.discard)


class HopFailed(Exception):
    def __init__(self, hop: Hop, error: ModelGridError, reset: bool = False) -> None:
        super().__init__(error.message)
        self.hop = hop
        self.error = error
        self.reset = reset  # the failed step was a replay from position 0


def remaining(deadline: float, what: str) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise DeadlineExceeded(f"the request ran out of time {what}")
    return left


class Failover:
    """The current route of one request, and what to do when a hop fails (bounded, with backoff)."""

    def __init__(self, router: Router, version: VersionInfo, deadline: float) -> None:
        self._router = router
        self._version = version
        self._deadline = deadline
        self._exclude: list[str] = []  # workers this request will not use again
        self._route: Route | None = None
        self._last_error = ""
        self.failures = 0  # failed hops
        self.route_waits = 0

    async def route(self) -> Route:
        while self._route is None:
            timeout = remaining(self._deadline, f"waiting for a route for {self._version.label}")
            try:
                self._route = await self._get_route(timeout)
            except Unavailable as err:  # not (re)placed yet, a replacement loading, the scheduler restarting
                await self._wait_for_route(err.message)
            except ResourceExhausted as err:
                if not self.failures:
                    raise  # the model does not fit: nothing to wait for
                raise Unavailable(
                    f"{self._version.label} lost a stage and has no replacement: {err.message} "
                    f"(last error: {self._last_error})"
                ) from None
        return self._route

    async def _get_route(self, timeout: float) -> Route:
        """A route avoiding this request's failed workers, and the gateway's avoided ones if possible.

        After two waits for a route, one through a worker this request saw fail is taken too: by then the
        scheduler has probed the reported worker, so if it still offers it, it is up (restarted, or it
        was our channel that failed) and the only copy of its span.
        """
        model, version = self._version.model, self._version.version
        assert self._router.avoid is not None
        avoided = self._router.avoid.current() - set(self._exclude)
        tries = [[*self._exclude, *sorted(avoided)]]
        if avoided:
            tries.append(list(self._exclude))
        if self._exclude and self.route_waits >= 2:
            tries.append([])
        for exclude in tries[:-1]:
            try:
                return await self._router.routes.get(model, version, exclude, timeout, stand_in=False)
            except Unavailable:
                continue
        return await self._router.routes.get(model, version, tries[-1], timeout)

    async def hop_failed(self, failure: HopFailed) -> None:
        """Drop the route (avoiding a dead worker) and wait before the next try; raise when out of tries."""
        hop, err = failure.hop, failure.error
        self.failures += 1
        self._last_error = f"worker {hop.worker_id} at {hop.address}: {err.message}"
        FAILOVERS.labels(err.code).inc()
        log.warning(
            "%s: hop %s [%d,%d) at %s failed (%s: %s); re-routing (failure %d)",
            self._version.label, hop.worker_id, hop.start_layer, hop.end_layer, hop.address, err.code, err.message,
            self.failures,
        )
        if self._route is not None:
            self._router.routes.invalidate(self._route)
        self._route = None
        # UNAVAILABLE: the worker is dead, leaving or unreachable. FAILED_PRECONDITION on a replay from
        # position 0: it lost the stage (restarted, or it moved). ABORTED (stale epoch): a fresh route will do.
        if isinstance(err, Unavailable) or (isinstance(err, FailedPrecondition) and failure.reset):
            if hop.worker_id not in self._exclude:
                self._exclude.append(hop.worker_id)
        if isinstance(err, Unavailable) and self._router.avoid is not None and self._router.avoid.add(hop.worker_id):
            self._router.report_soon(hop.worker_id, f"{err.code}: {err.message}")
        policy = self._router.policy
        if self.failures > policy.max_failovers:
            raise Unavailable(
                f"{self._version.label} could not be served after {self.failures} attempts "
                f"(no working route through its stages); last error: {self._last_error}"
            )
        if self.failures > 1:  # the first re-route goes at once: a ready replica is usually there
            await self._sleep(policy.backoff_s * 2 ** (self.failures - 2), self._last_error)

    async def _wait_for_route(self, why: str) -> None:
        self.route_waits += 1
        policy = self._router.policy
        if self.route_waits > policy.max_route_waits:
            last = f"; before that, {self._last_error}" if self._last_error else ""
            raise Unavailable(
                f"{self._version.label} could not be served: no route through its stages after "
                f"{self.route_waits} tries; last answer: {why}{last}"
            )
        await self._sleep(policy.backoff_s * 2 ** (self.route_waits - 1), why)

    async def _sleep(self, delay: float, why: str) -> None:
        left = remaining(self._deadline, f"re-routing {self._version.label} (last error: {why})")
        await asyncio.sleep(min(delay, self._router.policy.max_backoff_s, left))
