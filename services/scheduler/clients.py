"""The scheduler's gRPC clients: the registry, and the workers it instructs. Persistent channels; failed
calls become ModelGridErrors with the downstream code and message."""

from __future__ import annotations

import logging
from typing import Any, NoReturn

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from modelgrid.errors import Unavailable
from modelgrid.v1 import registry_pb2, registry_pb2_grpc, worker_pb2, worker_pb2_grpc
from services.common.rpc import raise_for_rpc_error
from services.common.tracing import traced_channel
from services.scheduler.convert import deployment_from_proto
from services.scheduler.records import Deployment

log = logging.getLogger(__name__)

WORKER_SERVICE = "modelgrid.v1.Worker"


def raise_registry_error(err: grpc.aio.AioRpcError, address: str) -> NoReturn:
    """A failed registry call as a ModelGridError: unreachable or too slow becomes Unavailable (retryable)."""
    if err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        raise Unavailable(f"registry at {address} is unavailable: {err.details() or err.code().name}") from err
    raise_for_rpc_error(err)


class RegistryClient:
    """Registry.ListDeployments and ResolveVersion."""

    def __init__(self, address: str, timeout_s: float) -> None:
        self.address = address
        self._timeout = timeout_s
        self._channel = traced_channel(address)
        self._stub = registry_pb2_grpc.RegistryStub(self._channel)

    async def list_deployments(self) -> list[Deployment]:
        try:
            reply = await self._stub.ListDeployments(registry_pb2.ListDeploymentsRequest(), timeout=self._timeout)
        except grpc.aio.AioRpcError as err:
            raise_registry_error(err, self.address)
        return [deployment_from_proto(d) for d in reply.deployments]

    async def resolve_version(self, model: str, version: str) -> str:
        """The concrete version ("v2") a version or alias names; NotFound when there is none."""
        try:
            reply = await self._stub.ResolveVersion(
                registry_pb2.ResolveVersionRequest(model=model, version=version), timeout=self._timeout
            )
        except grpc.aio.AioRpcError as err:
            raise_registry_error(err, self.address)
        return reply.version

    async def close(self) -> None:
        await self._channel.close()


class WorkerClients:
    """One persistent channel per worker address; LoadStage, UnloadStage and a health probe."""

    def __init__(self) -> None:
        self._channels: dict[str, grpc.aio.Channel] = {}

    def _channel(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = traced_channel(address)
        return channel

    async def load_stage(
        self, address: str, model: str, version: str, start: int, end: int, epoch: int, timeout_s: float
    ) -> None:
        request = worker_pb2.LoadStageRequest(
            model=model, version=version, start_layer=start, end_layer=end, epoch=epoch
        )
        await self._instruct(address, "LoadStage", request, timeout_s)

    async def unload_stage(
        self, address: str, model: str, version: str, start: int, end: int, epoch: int, timeout_s: float
    ) -> None:
        request = worker_pb2.UnloadStageRequest(
            model=model, version=version, start_layer=start, end_layer=end, epoch=epoch
        )
        await self._instruct(address, "UnloadStage", request, timeout_s)

    async def _instruct(self, address: str, method: str, request: Any, timeout_s: float) -> None:
        try:
            await getattr(worker_pb2_grpc.WorkerStub(self._channel(address)), method)(request, timeout=timeout_s)
        except grpc.aio.AioRpcError as err:
            await self._forget_unreachable(address, err)
            raise_for_rpc_error(err)

    async def _forget_unreachable(self, address: str, err: grpc.aio.AioRpcError) -> None:
        """A channel that could not connect waits out gRPC's reconnect backoff; the next call gets a new one
        (a worker restarted at the same address is reachable at once)."""
        details = (err.details() or "").lower()
        if err.code() == grpc.StatusCode.UNAVAILABLE and ("failed to connect" in details or "refused" in details):
            await self.forget(address)

    async def probe(self, address: str, timeout_s: float) -> str:
        """The worker's gRPC health status within timeout_s ("SERVING", "NOT_SERVING" while it drains, ...),
        or "" when it does not answer."""
        stub = health_pb2_grpc.HealthStub(self._channel(address))
        for service in (WORKER_SERVICE, ""):
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
            except grpc.aio.AioRpcError as err:
                if err.code() == grpc.StatusCode.NOT_FOUND:
                    continue  # no per-service status: ask for the server's overall one
                log.info("health probe of %s failed: %s", address, err.code().name)
                return ""
            return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        return ""

    async def forget(self, address: str) -> None:
        channel = self._channels.pop(address, None)
        if channel is not None:
            await channel.close()

    async def close(self) -> None:
        for address in list(self._channels):
            await self.forget(address)
