"""StepCoalescer: steps submitted in one event-loop turn for one worker go as one call; each keeps its outcome."""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

import pytest

from modelgrid.errors import DeadlineExceeded, FailedPrecondition, Unavailable
from modelgrid.v1 import worker_pb2
from services.gateway.coalesce import StepCoalescer
from services.gateway.domain import Hop

A = Hop(0, 2, "wa", "10.0.0.1:1")
B = Hop(2, 4, "wb", "10.0.0.2:1")


def step(session: str, hidden_bytes: int = 0) -> worker_pb2.ForwardRequest:
    request = worker_pb2.ForwardRequest(session_id=session, position=3)
    if hidden_bytes:
        request.hidden.data = b"h" * hidden_bytes
    return request


class FakeWorkers:
    """Answers each step with its session id's length as cache_length, or what `fail` says."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[str]]] = []
        self.fail: dict[str, str] = {}  # session id -> status code name for that step
        self.down: Exception | None = None  # the whole call fails
        self.delay = 0.0
        self.unanswered = ""  # a session the batch stream ends without answering

    async def many(self, hop: Hop, requests, timeout: float) -> AsyncIterator[worker_pb2.ForwardBatchResponse]:  # noqa: ANN001
        """Failed steps first, then the others one message each, last step first."""
        self.calls.append((hop.address, [r.session_id for r in requests]))
        await asyncio.sleep(self.delay)
        if self.down is not None:
            raise self.down
        failed = worker_pb2.ForwardBatchResponse()
        for i, r in enumerate(requests):
            if r.session_id in self.fail:
                failed.results.add(index=i, code=self.fail[r.session_id], message=f"{r.session_id} failed")
        if failed.results:
            yield failed
        for i, r in reversed(list(enumerate(requests))):
            if r.session_id not in self.fail and r.session_id != self.unanswered:
                reply = worker_pb2.ForwardBatchResponse()
                reply.results.add(index=i).response.cache_length = len(r.session_id)
                yield reply


def coalescer(**kwargs: float) -> tuple[StepCoalescer, FakeWorkers]:
    fake = FakeWorkers()
    return StepCoalescer(fake.many, **kwargs), fake


async def test_steps_of_one_turn_go_together_per_worker_and_a_lone_step_goes_as_a_batch_of_one() -> None:
    c, fake = coalescer()
    replies = await asyncio.gather(
        c.submit(A, step("s1"), 5), c.submit(A, step("s22"), 5), c.submit(B, step("s333"), 5)
    )
    assert [r.cache_length for r in replies] == [2, 3, 4]
    assert sorted(fake.calls) == [("10.0.0.1:1", ["s1", "s22"]), ("10.0.0.2:1", ["s333"])]
    await c.submit(A, step("later"), 5)
    assert fake.calls[-1] == ("10.0.0.1:1", ["later"])


async def test_a_failed_step_fails_alone_with_its_code() -> None:
    c, fake = coalescer()
    fake.fail["bad"] = "FAILED_PRECONDITION"
    results = await asyncio.gather(c.submit(A, step("ok"), 5), c.submit(A, step("bad"), 5), return_exceptions=True)
    assert results[0].cache_length == 2
    assert isinstance(results[1], FailedPrecondition) and results[1].message == "bad failed"


async def test_a_failed_call_fails_every_step_with_its_own_error() -> None:
    c, fake = coalescer()
    fake.down = Unavailable("worker wa at 10.0.0.1:1 is unavailable: connection refused")
    results = await asyncio.gather(*(c.submit(A, step(f"s{i}"), 5) for i in range(3)), return_exceptions=True)
    assert all(isinstance(r, Unavailable) and "connection refused" in r.message for r in results)
    assert len({id(r) for r in results}) == 3


async def test_deadline_and_cancellation_end_one_step_not_the_others() -> None:
    c, fake = coalescer()
    fake.delay = 0.2
    short = asyncio.ensure_future(c.submit(A, step("short"), 0.05))
    cancelled = asyncio.ensure_future(c.submit(A, step("gone"), 5))
    patient = asyncio.ensure_future(c.submit(A, step("patient"), 5))
    await asyncio.sleep(0.01)
    cancelled.cancel()
    with pytest.raises(DeadlineExceeded, match="did not answer before the request's deadline"):
        await short
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    assert (await patient).cache_length == 7
    assert fake.calls == [("10.0.0.1:1", ["short", "gone", "patient"])]


async def test_results_stream_back_in_any_order_and_an_unanswered_step_is_unavailable() -> None:
    c, fake = coalescer()
    fake.unanswered = "lost"
    results = await asyncio.gather(*(c.submit(A, step(s), 5) for s in ("a", "bb", "lost", "dddd")),
                                   return_exceptions=True)
    assert [r.cache_length for r in (results[0], results[1], results[3])] == [1, 2, 4]
    assert isinstance(results[2], Unavailable) and "without answering session lost" in results[2].message


async def test_held_steps_are_split_into_groups_under_the_byte_budget() -> None:
    size = step("s0", 1000).ByteSize()
    c, fake = coalescer(budget_bytes=2 * size)  # two steps fit, three do not
    names = [f"s{i}" for i in range(5)]
    replies = await asyncio.gather(*(c.submit(A, step(s, 1000), 5) for s in names))
    assert [r.cache_length for r in replies] == [2] * 5
    # the last group holds one step: it goes as a plain Forward
    assert sorted(fake.calls) == [("10.0.0.1:1", ["s0", "s1"]), ("10.0.0.1:1", ["s2", "s3"]),
                                  ("10.0.0.1:1", ["s4"])]
    fake.calls.clear()
    # a step larger than the budget goes alone; the small ones around it still go together
    replies = await asyncio.gather(c.submit(A, step("a", 10), 5), c.submit(A, step("big", 3 * size), 5),
                                   c.submit(A, step("b", 10), 5), c.submit(A, step("c", 10), 5))
    assert [r.cache_length for r in replies] == [1, 3, 1, 1]
    assert sorted(fake.calls) == [("10.0.0.1:1", ["a"]), ("10.0.0.1:1", ["b", "c"]), ("10.0.0.1:1", ["big"])]


async def test_an_unimplemented_step_inside_a_batch_is_that_steps_error() -> None:
    c, fake = coalescer()
    fake.fail["odd"] = "UNIMPLEMENTED"  # a step's own result, not the call: no fallback
    results = await asyncio.gather(c.submit(A, step("ok"), 5), c.submit(A, step("odd"), 5), return_exceptions=True)
    assert results[0].cache_length == 2
    assert results[1].code == "UNIMPLEMENTED"
    assert fake.calls == [("10.0.0.1:1", ["ok", "odd"])]
