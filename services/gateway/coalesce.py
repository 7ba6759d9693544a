"""Decoder steps bound for the same worker leave together, as one batch (one ForwardBatch message).

Sessions that are decoding at once reach each hop at nearly the same moment: the previous stage's
reply to a batch wakes them all in the same turn of the event loop. Each step is held until the end
of that turn (loop.call_soon), and everything held for one worker address then goes together
(send_many: the gateway sends it as one message on the worker's step stream, see upstream.Workers),
instead of one gRPC call per session per hop. The worker queues a batch's steps together, so they
share its passes, and streams each pass's results back as the pass ends: the sessions of a pass move on
at once, not when the whole batch is done (which would keep all of them in one group that the stages
pass to each other in turn, one stage idle while the other runs). A lone step goes the same way.

A batch is split into groups of at most BATCH_BYTES of steps (hidden states of long prompts are large: a
few of them together could pass gRPC's 64 MiB message cap, and RESOURCE_EXHAUSTED is not retried).

Every step keeps its own outcome: the worker answers each one (a result or a status code), and a
call that fails as a whole (the worker unreachable, the batch's deadline) fails each of its steps
with the same error, so every session handles it as it would a failed Forward (replay, failover).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Sequence

from modelgrid.errors import DeadlineExceeded, ModelGridError, from_code
from services.gateway.domain import Hop

log = logging.getLogger(__name__)

# the steps of one ForwardBatch, in serialized bytes: well under gRPC's 64 MiB message cap (as EMBED_BATCH_BYTES)
BATCH_BYTES = 16 * 1024 * 1024

# (hop, requests, timeout) -> the worker's ForwardBatchResponse messages as its passes end (each result names
# its request by index); raises a domain error
SendMany = Callable[[Hop, Sequence[Any], float], AsyncIterator[Any]]


@dataclass(eq=False)
class _Held:
    hop: Hop
    request: Any  # worker_pb2.ForwardRequest
    timeout: float
    future: asyncio.Future = field(repr=False)


class StepCoalescer:
    """Holds the steps submitted during one event-loop turn, per worker address, and sends them together."""

    def __init__(self, send_many: SendMany, budget_bytes: int = BATCH_BYTES) -> None:
        self._send_many = send_many
        self._budget_bytes = budget_bytes
        self._held: dict[str, list[_Held]] = {}
        self._calls: set[asyncio.Task] = set()

    async def submit(self, hop: Hop, request: Any, timeout: float) -> Any:
        """The worker's ForwardResponse to this step; raises the step's error as a domain error."""
        loop = asyncio.get_running_loop()
        held = _Held(hop, request, timeout, loop.create_future())
        waiting = self._held.setdefault(hop.address, [])
        if not waiting:
            loop.call_soon(self._flush, hop.address)
        waiting.append(held)
        # a timer rather than asyncio.wait_for (which swallows a cancellation on Python 3.11) or asyncio.wait
        # (a set, a waiter and callbacks per step per hop)
        timer = loop.call_later(timeout, _expire, held)
        try:
            return await held.future
        finally:
            timer.cancel()

    def _flush(self, address: str) -> None:
        batch = [h for h in self._held.pop(address, ()) if not h.future.done()]
        for group in _groups(batch, self._budget_bytes) if batch else ():
            call = asyncio.ensure_future(self._send(group))
            self._calls.add(call)
            call.add_done_callback(self._calls.discard)

    async def _send(self, batch: list[_Held]) -> None:
        hop = batch[0].hop
        timeout = max(h.timeout for h in batch)
        try:
            async for reply in self._send_many(hop, [h.request for h in batch], timeout):
                for result in reply.results:
                    if 0 <= result.index < len(batch):
                        outcome = from_code(result.code, result.message) if result.code else result.response
                        _settle(batch[result.index], outcome)
        except ModelGridError as err:
            for held in batch:  # those not answered yet
                _settle(held, from_code(err.code, err.message))
            return
        except Exception as err:  # noqa: BLE001 - a bug: each caller gets it rather than hanging
            log.exception("ForwardBatch to %s failed", hop.address)
            for held in batch:
                _settle(held, err)
            return
        for held in batch:
            _settle(held, from_code("UNAVAILABLE", f"worker {hop.worker_id} at {hop.address} ended ForwardBatch "
                                                   f"without answering session {held.request.session_id}"))


def _groups(batch: list[_Held], budget_bytes: int) -> list[list[_Held]]:
    """Consecutive groups whose requests' serialized sizes add up to at most budget_bytes (one step always goes)."""
    if len(batch) == 1:
        return [batch]
    groups: list[list[_Held]] = []
    group: list[_Held] = []
    size = 0
    for held in batch:
        n = held.request.ByteSize()
        if group and size + n > budget_bytes:
            groups.append(group)
            group, size = [], 0
        group.append(held)
        size += n
    groups.append(group)
    return groups


def _expire(held: _Held) -> None:
    hop = held.hop
    _settle(held, DeadlineExceeded(f"worker {hop.worker_id} at {hop.address} did not answer before the request's "
                                   "deadline"))


def _settle(held: _Held, outcome: Any) -> None:
    if held.future.done():  # the caller went away (cancelled, or past its deadline)
        return
    if isinstance(outcome, BaseException):
        held.future.set_exception(outcome)
    else:
        held.future.set_result(outcome)
