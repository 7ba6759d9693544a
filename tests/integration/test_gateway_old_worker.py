"""A worker without ForwardBatch (older than the gateway, during a rolling upgrade), over real gRPC: concurrent
sessions' steps to it, which the gateway would coalesce, are each answered through plain Forwards."""

from __future__ import annotations

import asyncio

import grpc

from modelgrid.v1 import worker_pb2, worker_pb2_grpc
from services.gateway.domain import Hop, Route, Sampling
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


async def test_concurrent_steps_to_a_worker_without_forward_batch_all_get_answers() -> None:
    server = grpc.aio.server()
    old = OldWorker()
    worker_pb2_grpc.add_WorkerServicer_to_server(old, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channels = Channels()
    try:
        workers = Workers(channels)
        hop = Hop(0, 2, "old", f"127.0.0.1:{port}")
        route = Route("m", "v1", 1, (hop,))

        async def step(session: int, round_: int) -> int:
            out = await workers.forward_decoder(
                route, hop, f"s{session}", tokens=[5], hidden=None, position=session, reset=False,
                sampling=Sampling(0.0, 0, 1.0, 7), step=round_, max_session_tokens=16, timeout=10.0,
            )
            return out.token[0]

        for round_ in range(2):  # the second round goes straight to plain Forwards
            tokens = await asyncio.gather(*(step(s, round_) for s in range(4)))
            assert tokens == [s + round_ for s in range(4)]
        assert sorted(old.forwards) == sorted([f"s{s}" for s in range(4)] * 2)
    finally:
        await channels.close()
        await server.stop(None)
