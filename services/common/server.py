"""gRPC server bootstrap shared by every service: health, reflection, metrics, graceful SIGTERM.

`create_server` builds and starts a server on an address (port 0 picks a free port, for tests);
`serve_forever` runs it until SIGTERM/SIGINT, then marks it NOT_SERVING, drains and stops.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from modelgrid.channel import SERVER_OPTIONS
from services.common.metrics import MetricsInterceptor
from services.common.tracing import TracingInterceptor

log = logging.getLogger(__name__)


@dataclass
class RunningServer:
    """A started gRPC server and its health servicer."""

    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    service_names: list[str] = field(default_factory=list)

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ["", *self.service_names]:
            await self.health.set(name, status)

    async def stop(self, grace: float) -> None:
        """NOT_SERVING first, so load balancers and probes move away; then drain in-flight calls."""
        await self.set_serving(False)
        await self.server.stop(grace)


async def create_server(
    listen: str,
    add_servicers: Callable[[grpc.aio.Server], None],
    service_names: Sequence[str],
    metrics_name: str,
    health_servicer: health.aio.HealthServicer | None = None,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    make_request_ids: bool = False,
    options: Sequence[tuple[str, int]] = (),
) -> RunningServer:
    """Build, bind and start a grpc.aio server on listen ("host:port"; port 0 = any free port).

    service_names are the fully-qualified names (e.g. "modelgrid.v1.Worker") reported by health and
    reflection. Pass health_servicer to control per-service health yourself (the worker's check
    touches its device). Every call runs inside the request-id interceptor (make_request_ids: invent
    ids for calls without one; the gateway does), then the metrics interceptor, then `interceptors`
    (e.g. the gateway's auth). `options` override SERVER_OPTIONS by name.
    """
    chain = [TracingInterceptor(metrics_name, make_request_ids), MetricsInterceptor(metrics_name), *interceptors]
    server = grpc.aio.server(options=[*dict([*SERVER_OPTIONS, *options]).items()], interceptors=chain)
    add_servicers(server)
    health_servicer = health_servicer or health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    port = server.add_insecure_port(listen)
    if port == 0:
        raise OSError(f"could not bind {listen}: is the port in use?")
    await server.start()
    running = RunningServer(server=server, port=port, health=health_servicer, service_names=list(service_names))
    await running.set_serving(True)
    return running


async def serve_forever(
    running: RunningServer,
    grace_s: float,
    on_stop: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Serve until SIGTERM or SIGINT; then NOT_SERVING, on_stop() (e.g. drain sessions), drain, stop."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down: NOT_SERVING, draining for up to %.0f s", grace_s)
    await running.set_serving(False)
    if on_stop is not None:
        await on_stop()
    await running.server.stop(grace_s)
    log.info("stopped")
