"""Our servers accept the keepalive pings of our channels: an idle connection is not closed with
GOAWAY "too_many_pings" (gRPC's default server allows one ping per 5 minutes without data)."""

from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from modelgrid.channel import GRPC_OPTIONS
from services.common.server import create_server

FAST_PINGS = [*dict([*GRPC_OPTIONS, ("grpc.keepalive_time_ms", 500)]).items()]  # 10x the services' rate, to see it in 4 s


async def idle_states(server_options: list[tuple[str, int]]) -> list[str]:
    """Connectivity states of an idle channel that pings every 0.5 s, sampled over 4 s after one call."""
    running = await create_server("127.0.0.1:0", lambda server: None, [], "keepalive-test", options=server_options)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}", options=FAST_PINGS)
    try:
        await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        states = []
        for _ in range(8):
            await asyncio.sleep(0.5)
            states.append(channel.get_state().name)
        return states
    finally:
        await channel.close()
        await running.stop(0)


async def test_idle_connection_survives_keepalive_pings() -> None:
    assert set(await idle_states([])) == {"READY"}


async def test_grpc_default_would_close_it() -> None:
    """The check above can fail: with gRPC's default ping policy the same channel is sent away."""
    defaults = [("grpc.http2.min_ping_interval_without_data_ms", 300_000), ("grpc.http2.max_ping_strikes", 2)]
    assert "IDLE" in await idle_states(defaults)
