"""Decoder steps over one long-lived ForwardStream call per worker.

A unary call per step per hop costs a new HTTP/2 stream, its headers and the server's per-call work
(interceptors, a task) on both sides; a message on a call that is already open costs a fraction of it.
So the gateway keeps one ForwardStream call open to each worker and sends each batch of steps (the
coalescer's, or a lone step) as one message on it. The steps of a call are numbered in the order they
are sent (the proto says how), and the reader hands each result to the batch that sent it, renumbered
as its index in that batch: what a ForwardBatch call would have answered.

Only decode steps (one new token each) go on the stream. Their messages are small, so none can pass the
message cap (which would end the call, and fail every batch on it) or hold the stream for long; prompts
and replays, rare and large, go as ForwardBatch calls of their own.

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


def single_token(request: worker_pb2.ForwardRequest) -> bool:
    """A decode step: one new token (or one row of hidden states)."""
    if request.HasField("hidden"):
        return len(request.hidden.shape) > 0 and request.hidden.shape[0] == 1
    return len(request.tokens.ids) == 1


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
        # the worker's initial metadata: it accepted the call (see _accepted)
        self._accepting = asyncio.ensure_future(call.initial_metadata())
        self._accepting.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved: never logged
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
            await self._accepted(timeout)
            async with self._write_lock:
                if self.ended is not None:
                    raise self.ended
                base = self._next
                self._next += len(requests)
                for number in range(base, base + len(requests)):
                    self._waiting[number] = (inbox, base)
                await self._write(worker_pb2.ForwardBatchRequest(steps=requests))
            left = len(requests)
            while left > 0:
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

    async def _accepted(self, timeout: float) -> None:
        """Wait until the worker has accepted the call (its ForwardStream sends initial metadata at once), up to
        `timeout`. A worker without ForwardStream ends the call at once with UNIMPLEMENTED instead, and a
        write to a call ending that way can turn its status into INTERNAL "Internal error from Core"
        (grpc/grpc#36066): nothing is written before the answer is known."""
        if not self._accepting.done():
            done, _ = await asyncio.wait([self._accepting], timeout=timeout)
            if not done:
                raise DeadlineExceeded(f"{self._label} did not accept the step stream before the request's deadline")
        if self.ended is None and self._call.done():  # ended without accepting: the reader gets its status
            await asyncio.wait([self._reader])
        if self.ended is not None:
            raise self.ended

    async def _write(self, message: worker_pb2.ForwardBatchRequest) -> None:
        """Send a batch; a write that fails means the call broke (the step never reached the worker)."""
        try:
            await self._call.write(message)
        except grpc.aio.AioRpcError as err:
            self._end(self._error(err))
        except (asyncio.InvalidStateError, grpc.aio.UsageError) as err:  # the call is over already
            self._end(Unavailable(f"the step stream to {self._label} is closed: {err}"))
        except asyncio.CancelledError:
            if _cancelling():  # our caller is being cancelled
                raise
            self._end(Unavailable(f"the step stream to {self._label} was closed"))  # the call was cancelled
        if self.ended is not None:
            raise self.ended

    async def _read(self) -> None:
        try:
            async for reply in self._call:
                by_batch: dict[int, tuple[asyncio.Queue, Replies]] = {}
                for result in reply.results:
                    found = self._waiting.pop(result.index, None)
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
        except Exception as err:  # noqa: BLE001 - a bug: fail the waiting batches rather than leave them hanging
            log.exception("reading the step stream from %s failed", self._label)
            self._end(Unavailable(f"reading the step stream from {self._label} failed: {err}"))

    def _end(self, error: ModelGridError) -> None:
        """The call is over: every batch still waiting gets the first error it ended with. A whole call's
        failure only says that it broke (the worker's verdict on a step comes in that step's result), so it
        is UNAVAILABLE, retried on another route, whatever its code; except UNIMPLEMENTED (no ForwardStream)."""
        if error.code not in ("UNAVAILABLE", "UNIMPLEMENTED"):
            error = Unavailable(f"the step stream to {self._label} broke: {error.code}: {error.message}")
        if self.ended is None:
            self.ended = error
        for inbox in {id(inbox): inbox for inbox, _ in self._waiting.values()}.values():
            inbox.put_nowait(self.ended)

    async def close(self) -> None:
        self._call.cancel()
        self._accepting.cancel()
        self._reader.cancel()
        try:
            await self._reader
        except asyncio.CancelledError:
            if _cancelling():
                raise


def _cancelling() -> bool:
    """Whether the running task is being cancelled (rather than some call it awaited)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
