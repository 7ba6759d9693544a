"""Failover policy of a generation (services/gateway/failover.py) over the in-memory workers and scheduler of
test_gateway_pipeline: the gateway-wide avoid list, what excludes a worker, immediate first re-route,
bounded waits for a route, and the UNAVAILABLE a client sees when no replacement exists."""

from __future__ import annotations

import asyncio
import time

import pytest

from modelgrid.errors import Aborted, FailedPrecondition, ResourceExhausted, Unavailable
from services.gateway.failover import AvoidList, RetryPolicy, Router
from services.gateway.upstream import RouteCache
from tests.unit.test_gateway_pipeline import FakeScheduler, FakeWorkers, collect, plan, tokenizer  # noqa: F401


def router_for(scheduler, workers, **policy) -> Router:
    settings = dict(max_failovers=3, backoff_s=0.0, max_backoff_s=0.0)
    settings.update(policy)
    return Router(RouteCache(scheduler, ttl_s=60), scheduler, workers, RetryPolicy(**settings))


async def test_a_failed_worker_is_avoided_by_later_requests_and_reported_once(tokenizer) -> None:
    scheduler = FakeScheduler({(0, 2): ["a"], (2, 4): ["b", "b2"]})
    workers = FakeWorkers([40, 41, 42])
    router = router_for(scheduler, workers)
    workers.fail[4] = Unavailable("worker b at addr-b is unavailable: Socket closed")  # b, second step
    assert [c.token_id for c in await collect(router, plan(max_tokens=3), tokenizer)] == [40, 41, 42]
    await asyncio.sleep(0)  # the report goes in the background
    assert scheduler.reported == ["b"]

    calls = len(workers.calls)
    assert [c.token_id for c in await collect(router, plan(max_tokens=3), tokenizer)] == [40, 41, 42]
    assert {c[0] for c in workers.calls[calls:]} == {"addr-a", "addr-b2"}  # b avoided from the start
    assert scheduler.reported == ["b"]


async def test_an_avoided_worker_is_used_when_nothing_else_is_left(tokenizer) -> None:
    scheduler = FakeScheduler({(0, 4): ["a"]})
    workers = FakeWorkers([40, 41])
    router = router_for(scheduler, workers)
    router.avoid.add("a")  # it failed a moment ago, e.g. restarted since
    assert [c.token_id for c in await collect(router, plan(max_tokens=2), tokenizer)] == [40, 41]


async def test_lost_stage_on_a_replay_excludes_the_worker_stale_epoch_does_not(tokenizer) -> None:
    scheduler = FakeScheduler({(0, 2): ["a", "a2"], (2, 4): ["b"]})
    workers = FakeWorkers([40, 41, 42])
    router = router_for(scheduler, workers)
    workers.fail[3] = Aborted("route epoch 1 is older than epoch 2")  # a, step 1: fresh route, same workers
    workers.fail[4] = FailedPrecondition("stage [0,2) is not loaded on worker a")  # a, the replay
    assert [c.token_id for c in await collect(router, plan(max_tokens=3), tokenizer)] == [40, 41, 42]
    assert [c[0] for c in workers.calls[2:5]] == ["addr-a", "addr-a", "addr-a2"]
    assert scheduler.reported == [] and router.avoid.current() == frozenset()


async def test_the_first_re_route_does_not_wait(tokenizer) -> None:
    scheduler = FakeScheduler({(0, 4): ["a", "a2"]})
    workers = FakeWorkers([40, 41])
    router = router_for(scheduler, workers, backoff_s=30.0, max_backoff_s=30.0)
    workers.fail[2] = Unavailable("connection refused")
    started = time.monotonic()
    assert [c.token_id for c in await collect(router, plan(max_tokens=2), tokenizer)] == [40, 41]
    assert time.monotonic() - started < 5


class LoadingScheduler(FakeScheduler):
    """[0,4) on a, and c once `answers` (what each GetRoute after the first raises) run out."""

    def __init__(self, answers: list[Exception]) -> None:
        super().__init__({(0, 4): ["a", "c"]})
        self.answers = answers

    async def get_route(self, model, version, exclude=(), timeout=None):
        if self.route_calls and self.answers:
            self.route_calls += 1
            raise self.answers.pop(0)
        return await super().get_route(model, version, exclude, timeout)


async def test_a_request_waits_for_a_replacement_while_it_loads(tokenizer) -> None:
    """The failed worker was the only ready copy; the scheduler is loading one on c."""
    scheduler = LoadingScheduler([Unavailable("model 'm' v1 is loading: 0/1 stages ready")] * 5)
    workers = FakeWorkers([40, 41, 42])
    router = router_for(scheduler, workers)
    workers.fail[2] = Unavailable("connection refused")
    assert [c.token_id for c in await collect(router, plan(max_tokens=3), tokenizer)] == [40, 41, 42]
    assert ("addr-c", 0, 4, True) in workers.calls  # replayed on the replacement


async def test_no_replacement_is_a_clear_unavailable(tokenizer) -> None:
    scheduler = LoadingScheduler([ResourceExhausted("model 'm' v1 does not fit: it needs 400 B")])
    workers = FakeWorkers([40, 41])
    workers.fail[2] = Unavailable("worker a at addr-a is unavailable: connection refused")
    with pytest.raises(Unavailable, match="lost a stage and has no replacement: model 'm' v1 does not fit.*addr-a"):
        await collect(router_for(scheduler, workers), plan(max_tokens=2), tokenizer)

    scheduler = LoadingScheduler([Unavailable("model 'm' v1 is loading: 0/1 stages ready")] * 100)
    workers = FakeWorkers([40, 41])
    workers.fail[2] = Unavailable("connection refused")
    with pytest.raises(Unavailable, match="no route through its stages after 5 tries; last answer: .*is loading"):
        await collect(router_for(scheduler, workers, max_route_waits=4), plan(max_tokens=2), tokenizer)
    # the first route; then 1 + 1 tries, and 2 (with and without the failed worker) from the third on
    assert scheduler.route_calls == 1 + 1 + 1 + 2 + 2 + 2


def test_avoid_list_expires() -> None:
    now = [0.0]
    avoid = AvoidList(10.0, clock=lambda: now[0])
    assert avoid.add("w") and not avoid.add("w")
    assert avoid.current() == {"w"}
    now[0] = 10.5
    assert avoid.current() == frozenset() and avoid.add("w")
