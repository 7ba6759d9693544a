"""The scheduler's client of the registry's JobStore: the durable job records it builds tasks from."""

from __future__ import annotations

from typing import Any

import grpc

from modelgrid.v1 import jobs_pb2, jobs_pb2_grpc
from services.common.tracing import traced_channel
from services.scheduler.clients import raise_registry_error
from services.scheduler.convert import stored_job_from_proto
from services.scheduler.job_tasks import StoredJob

ACTIVE_STATES = ("queued", "running")
MAX_LIST = 1000


class JobStoreClient:
    def __init__(self, address: str, timeout_s: float) -> None:
        self.address = address
        self._timeout = timeout_s
        self._channel = traced_channel(address)
        self._stub = jobs_pb2_grpc.JobStoreStub(self._channel)

    async def _call(self, method: str, request: Any) -> Any:
        try:
            return await getattr(self._stub, method)(request, timeout=self._timeout)
        except grpc.aio.AioRpcError as err:
            raise_registry_error(err, self.address)

    async def get(self, job_id: str) -> StoredJob:
        return stored_job_from_proto(await self._call("GetJob", jobs_pb2.GetJobRequest(job_id=job_id)))

    async def active(self) -> list[StoredJob]:
        """Jobs queued or running, by the registry's record."""
        reply = await self._call("ListJobs", jobs_pb2.StoreListJobsRequest(states=ACTIVE_STATES, limit=MAX_LIST))
        return [stored_job_from_proto(j) for j in reply.jobs]

    async def pending(self, job_id: str) -> list[tuple[int, int]]:
        reply = await self._call("ListPendingItems", jobs_pb2.GetJobRequest(job_id=job_id))
        return list(zip(reply.starts, reply.ends))

    async def set_state(self, job_id: str, state: str, error: str = "") -> StoredJob:
        request = jobs_pb2.UpdateJobStateRequest(job_id=job_id, state=state, error=error)
        return stored_job_from_proto(await self._call("UpdateJobState", request))

    async def close(self) -> None:
        await self._channel.close()
