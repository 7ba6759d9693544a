"""Decoder steps over one long-lived ForwardStream call per worker.

A unary call per step per hop costs a new HTTP/2 stream, its headers and the server's per-call work
(interceptors, a task) on both sides; a message on a call that is already open costs a fraction of it.
So the gateway keeps one ForwardStream call open to each worker and sends each batch of steps (the
coalescer's, or a lone step) as one message on it. The steps of a call are numbered in the order they
are sent (the proto says how), and the reader hands each result to the batch that sent it, renumbered
as its index in that batch: what a ForwardBatch call would have answered.

A call that breaks (the worker died, restarted, or drained and ended it) fails every step still waiting
on it with the call's error, as a broken ForwardBatch would; the next batch opens a new call. The call
has no deadline: each batch stops waiting at its own.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Sequence

import grpc

from modelgrid.errors import DeadlineExceeded, ModelGridError, Unavailable
from modelgrid.v1 import worker_pb2

log = logging.getLogger(__name__)


@dataclass
class Replies:
    """Results of one batch that ended together (what a ForwardBatchResponse holds), indices in the batch."""

    results: list[Any] = field(default_factory=list)  # worker_pb2.ForwardResult


_TIMED_OUT = object()


class StepStream:
    """One open ForwardStream call: batches of steps out, each batch's results back as they come."""

    def __init__(self, call: Any, error: Callable[[grpc.aio.AioRpcError], ModelGridError], label: str) -> None:
        self._call = call  # grpc.aio.StreamStreamCall
        self._error = error  # the domain error for a failed call (keeps the worker's status code)
        self._label = label  # "worker w1 at host:port", for messages
        self._next = 0  # the number of the next step sent
        self._waiting: dict[int, tuple[asyncio.Queue, int]] = {}  # step number -> (its batch's inbox, batch's base)
        self._write_lock = asyncio.Lock()  # one write at a time, in numbering order
        self.ended: ModelGridError | None = None  # why the call ended; no batch can use it then
        self._reader = asyncio.ensure_future(self._read())

    async def batch(self, requests: Sequence[worker_pb2.ForwardRequest], timeout: float) -> AsyncIterator[Replies]:
        """The results of these steps as the worker's passes end them; each result's index is its position in
        `requests`. Raises the call's error for the steps not answered when the call breaks, DeadlineExceeded
        after `timeout` seconds."""
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue = asyncio.Queue()
        timer = loop.call_later(timeout, inbox.put_nowait, _TIMED_OUT)
        base = -1
        try:
            async with self._write_lock:
                if self.ended is not None:
                    raise self.ended
                base = self._next
                self._next += len(requests)
                for number in range(base, base + len(requests)):
                    self._waiting[number] = (inbox, base)
                await self._write(worker_pb2.ForwardBatchRequest(steps=requests))
            left = len(requests)
            while left:
                item = await inbox.get()
                if item is _TIMED_OUT:
                    raise DeadlineExceeded(f"{self._label} did not answer before the request's deadline")
                if isinstance(item, ModelGridError):
                    raise item
                left -= len(item.results)
                yield item
        finally:
            timer.cancel()
            if base >= 0:
                for number in range(base, base + len(requests)):
                    self._waiting.pop(number, None)

    async def _write(self, message: worker_pb2.ForwardBatchRequest) -> None:
        try:
            await self._call.write(message)
        except grpc.aio.AioRpcError as err:
            self._end(self._error(err))
            raise self.ended from None  # type: ignore[misc]
        except (asyncio.InvalidStateError, grpc.aio.UsageError) as err:  # the call is over already
            self._end(Unavailable(f"{self._label} closed the step stream: {err}"))
            raise self.ended from None  # type: ignore[misc]

    async def _read(self) -> None:
        try:
            async for reply in self._call:
                by_batch: dict[int, tuple[asyncio.Queue, Replies]] = {}
                for result in reply.results:
                    found = self._waiting.get(result.index)
                    if found is None:  # its batch gave up (deadline, cancelled caller)
                        continue
                    inbox, base = found
                    result.index -= base
                    by_batch.setdefault(base, (inbox, Replies()))[1].results.append(result)
                for inbox, replies in by_batch.values():
                    inbox.put_nowait(replies)
            self._end(Unavailable(f"{self._label} ended the step stream"))
        except grpc.aio.AioRpcError as err:
            self._end(self._error(err))
        except asyncio.CancelledError:
            self._end(Unavailable(f"the step stream to {self._label} was closed"))
            raise

    def _end(self, error: ModelGridError) -> None:
        """The call is over: every batch still waiting gets `error` (once)."""
        if self.ended is None:
            self.ended = error
        for inbox in {id(inbox): inbox for inbox, _ in self._waiting.values()}.values():
            inbox.put_nowait(self.ended)

    async def close(self) -> None:
        self._call.cancel()
        self._reader.cancel()
        try:
            await self._reader
        except asyncio.CancelledError:
            pass
