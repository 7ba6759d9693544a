"""The worker's gRPC stubs to the registry and the scheduler, behind small classes of ours.

Each returns domain objects and raises ModelGridError subclasses (a failed call keeps its status code
and message), so the runtime and membership logic never see grpc or *_pb2 types.
"""

from __future__ import annotations

from typing import AsyncIterator, Sequence

import grpc

from modelgrid.channel import CLIENT_OPTIONS
from modelgrid.errors import ModelGridError, from_code
from modelgrid.v1 import common_pb2, registry_pb2, registry_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc
from services.common.tracing import traced_channel
from services.worker.convert import piece_from_proto, version_from_proto, worker_info_to_proto
from services.worker.runtime import WorkerStatus
from services.worker.shard_cache import TensorPiece, VersionInfo

RESOLVE_TIMEOUT_S = 30.0
SCHEDULER_TIMEOUT_S = 5.0


def _error(err: grpc.aio.AioRpcError, who: str, address: str) -> ModelGridError:
    """The downstream failure as our error, saying which service failed."""
    details = err.details() or err.code().name
    return from_code(err.code().name, f"{who} at {address}: {details}")


class RegistryClient:
    """Registry.ResolveVersion and Registry.FetchTensors over one persistent channel."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._channel = traced_channel(address, CLIENT_OPTIONS)  # weight downloads: lenient keepalive (channel.py)
        self._stub = registry_pb2_grpc.RegistryStub(self._channel)

    async def resolve(self, model: str, version: str) -> VersionInfo:
        try:
            reply = await self._stub.ResolveVersion(
                registry_pb2.ResolveVersionRequest(model=model, version=version), timeout=RESOLVE_TIMEOUT_S
            )
        except grpc.aio.AioRpcError as err:
            raise _error(err, "registry", self.address) from None
        return version_from_proto(reply)

    async def fetch_tensors(self, model: str, version: str, names: Sequence[str]) -> AsyncIterator[TensorPiece]:
        call = self._stub.FetchTensors(registry_pb2.FetchTensorsRequest(model=model, version=version, names=names))
        try:
            async for chunk in call:
                yield piece_from_proto(chunk)
        except grpc.aio.AioRpcError as err:
            raise _error(err, "registry", self.address) from None
        finally:
            call.cancel()

    async def close(self) -> None:
        await self._channel.close()


class SchedulerClient:
    """Scheduler.RegisterWorker, Scheduler.Heartbeat, and GetPlacement (is a draining worker still placed?)."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._channel = traced_channel(address)
        self._stub = scheduler_pb2_grpc.SchedulerStub(self._channel)

    async def register(self, status: WorkerStatus) -> tuple[float, int]:
        """(heartbeat interval the scheduler expects, newest placement epoch)."""
        try:
            reply = await self._stub.RegisterWorker(
                scheduler_pb2.RegisterWorkerRequest(worker=worker_info_to_proto(status)), timeout=SCHEDULER_TIMEOUT_S
            )
        except grpc.aio.AioRpcError as err:
            raise _error(err, "scheduler", self.address) from None
        return float(reply.heartbeat_interval_s), int(reply.epoch)

    async def heartbeat(self, status: WorkerStatus) -> int:
        """The newest placement epoch; NotFound means "register again"."""
        try:
            reply = await self._stub.Heartbeat(
                scheduler_pb2.HeartbeatRequest(worker_id=status.worker_id, worker=worker_info_to_proto(status)),
                timeout=SCHEDULER_TIMEOUT_S,
            )
        except grpc.aio.AioRpcError as err:
            raise _error(err, "scheduler", self.address) from None
        return int(reply.epoch)

    async def placed_workers(self, model: str, version: str) -> set[str]:
        """Ids of the workers the scheduler's placement of a version names (none when it has no placement)."""
        try:
            reply = await self._stub.GetPlacement(
                common_pb2.GetPlacementRequest(model=model, version=version), timeout=SCHEDULER_TIMEOUT_S
            )
        except grpc.aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.NOT_FOUND:
                return set()
            raise _error(err, "scheduler", self.address) from None
        return {r.worker_id for s in reply.stages for r in s.replicas}

    async def close(self) -> None:
        await self._channel.close()
