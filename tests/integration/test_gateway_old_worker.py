"""Workers older than the gateway (during a rolling upgrade), over real gRPC: one without ForwardStream gets its
steps as ForwardBatch calls, one without ForwardBatch either as plain Forwards; concurrent sessions' steps are
all answered either way. And a worker that takes steps on its stream but never answers: each batch gives up at
its deadline."""

from __future__ import annotations

import asyncio
import contextlib
from typing import AsyncIterator

import grpc
import pytest

from modelgrid.errors import DeadlineExceeded, Unavailable
from modelgrid.v1 import worker_pb2, worker_pb2_grpc
from services.gateway.domain import Hop, Route, Sampling
from services.gateway import upstream
from services.gateway.upstream import Channels, Workers


class OldWorker(worker_pb2_grpc.WorkerServicer):
    """Forward only (grpc answers UNIMPLEMENTED for the rest): the last stage, sampling position + step."""

    def __init__(self) -> None:
        self.forwards: list[str] = []

    async def Forward(self, request: worker_pb2.ForwardRequest, context: grpc.aio.ServicerContext):  # noqa: N802
        self.forwards.append(request.session_id)
        reply = worker_pb2.ForwardResponse()
        reply.token.token_id = request.position + request.step
        return reply


class BatchWorker(OldWorker):
    """Forward and ForwardBatch, no ForwardStream."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[list[str]] = []

    async def ForwardBatch(self, request: worker_pb2.ForwardBatchRequest, context):  # noqa: N802, ANN001
        self.batches.append([s.session_id for s in request.steps])
        reply = worker_pb2.ForwardBatchResponse()
        for index, step in enumerate(request.steps):
            reply.results.add(index=index).response.token.token_id = step.position + step.step
        yield reply


class SilentWorker(worker_pb2_grpc.WorkerServicer):
    """Reads its step stream and never answers."""

    async def ForwardStream(self, requests, context: grpc.aio.ServicerContext):  # noqa: N802
        await context.send_initial_metadata(())  # accepts the call, as a worker does
        async for _ in requests:
            pass
        await asyncio.Event().wait()
        yield worker_pb2.ForwardBatchResponse()  # never reached: an async generator


class Attempts(grpc.aio.ServerInterceptor):
    """The Worker methods called, those the server lacks included (grpc answers them UNIMPLEMENTED)."""

    def __init__(self) -> None:
        self.methods: list[str] = []

    async def intercept_service(self, continuation, details):  # noqa: ANN001, ANN201
        self.methods.append(details.method.rsplit("/", 1)[-1])
        return await continuation(details)

    def count(self, method: str) -> int:
        return self.methods.count(method)


@contextlib.asynccontextmanager
async def gateway_to(
    servicer: worker_pb2_grpc.WorkerServicer, attempts: Attempts | None = None
) -> AsyncIterator[tuple[Workers, Hop]]:
    """The gateway's Workers, and a hop to `servicer` served over real gRPC."""
    server = grpc.aio.server(interceptors=[attempts] if attempts else None)
    worker_pb2_grpc.add_WorkerServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channels = Channels()
    workers = Workers(channels)
    try:
        yield workers, Hop(0, 2, "old", f"127.0.0.1:{port}")
    finally:
        await workers.close()
        await channels.close()
        await server.stop(None)


async def step(workers: Workers, hop: Hop, session: int, round_: int, timeout: float = 10.0) -> int:
    out = await workers.forward_decoder(
        Route("m", "v1", 1, (hop,)), hop, f"s{session}", tokens=[5], hidden=None, position=session, reset=False,
        sampling=Sampling(0.0, 0, 1.0, 7), step=round_, max_session_tokens=16, timeout=timeout,
    )
    return out.token[0]


async def test_concurrent_steps_to_a_worker_without_forward_batch_all_get_answers() -> None:
    old, attempts = OldWorker(), Attempts()
    async with gateway_to(old, attempts) as (workers, hop):
        for round_ in range(2):  # the second round goes straight to plain Forwards: the worker is remembered
            tokens = await asyncio.gather(*(step(workers, hop, s, round_) for s in range(4)))
            assert tokens == [s + round_ for s in range(4)]
    assert sorted(old.forwards) == sorted([f"s{s}" for s in range(4)] * 2)
    assert attempts.count("ForwardStream") == 1 and attempts.count("ForwardBatch") == 1


async def test_a_worker_once_older_is_asked_for_the_newer_transport_again_after_a_while(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(upstream, "OLDER_WORKER_RETRY_S", 0.0)  # an upgraded worker gets streams again
    old, attempts = BatchWorker(), Attempts()
    async with gateway_to(old, attempts) as (workers, hop):
        for round_ in range(2):
            assert await step(workers, hop, 0, round_) == round_
    assert attempts.count("ForwardStream") == 2 and attempts.count("ForwardBatch") == 2


async def test_steps_to_a_worker_without_forward_stream_go_as_forward_batch_calls() -> None:
    old, attempts = BatchWorker(), Attempts()
    async with gateway_to(old, attempts) as (workers, hop):
        for round_ in range(2):
            tokens = await asyncio.gather(*(step(workers, hop, s, round_) for s in range(4)))
            assert tokens == [s + round_ for s in range(4)]
        assert await step(workers, hop, 9, 2) == 11  # a lone step too
    assert sorted(s for batch in old.batches for s in batch) == sorted([f"s{s}" for s in range(4)] * 2 + ["s9"])
    assert sorted(map(len, old.batches)) == [1, 4, 4] and not old.forwards  # coalesced, never a plain Forward
    assert attempts.count("ForwardStream") == 1  # asked once, then remembered


async def test_a_batch_the_worker_never_answers_gives_up_at_its_deadline() -> None:
    async with gateway_to(SilentWorker()) as (workers, hop):
        started = asyncio.get_running_loop().time()
        with pytest.raises(DeadlineExceeded):
            await step(workers, hop, 0, 0, timeout=0.5)
        assert asyncio.get_running_loop().time() - started < 10
        # the batch stopped waiting too: nothing is left behind on the stream or in the coalescer
        stream = workers._streams[hop.address][1]
        while workers._coalescer._calls:
            assert asyncio.get_running_loop().time() - started < 10
            await asyncio.sleep(0.01)
        assert stream._waiting == {} and stream.ended is None  # the stream itself is still good


async def test_a_step_waiting_on_a_stream_whose_channel_is_closed_fails_over_at_once() -> None:
    async with gateway_to(SilentWorker()) as (workers, hop):
        waiting = asyncio.ensure_future(step(workers, hop, 0, 0, timeout=60.0))
        await asyncio.sleep(0.2)
        started = asyncio.get_running_loop().time()
        workers._channels.renew(hop.address, min_age_s=0)  # as after a failed connect: the call is cancelled
        with pytest.raises(Unavailable):
            await waiting
        assert asyncio.get_running_loop().time() - started < 10  # not the step's 60 s deadline
