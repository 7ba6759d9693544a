"""The gateway's clients of the batch-job services: the registry's JobStore and the scheduler's JobQueue."""

from __future__ import annotations

from typing import AsyncIterator, Sequence

from modelgrid.v1 import jobs_pb2, jobs_pb2_grpc
from services.gateway import convert
from services.gateway.domain import ItemOutput, TaskLease
from services.gateway.job_inputs import JobInput
from services.gateway.upstream import DEFAULT_TIMEOUT_S, Channels, _Client


class JobStoreClient(_Client):
    service = "registry"

    def __init__(self, channels: Channels, address: str) -> None:
        super().__init__(channels, address, jobs_pb2_grpc.JobStoreStub)

    async def create(self, request: jobs_pb2.CreateJobRequest, timeout: float | None) -> jobs_pb2.Job:
        return await self._unary("CreateJob", request, timeout)

    async def get(self, job_id: str, timeout: float | None = DEFAULT_TIMEOUT_S) -> jobs_pb2.Job:
        return await self._unary("GetJob", jobs_pb2.GetJobRequest(job_id=job_id), timeout)

    async def list(self, states: Sequence[str], limit: int, owner: str, timeout: float | None) -> jobs_pb2.ListJobsResponse:
        request = jobs_pb2.StoreListJobsRequest(states=list(states), limit=limit, owner=owner)
        return await self._unary("ListJobs", request, timeout)

    async def set_state(self, job_id: str, state: str, timeout: float | None = DEFAULT_TIMEOUT_S) -> jobs_pb2.Job:
        return await self._unary("UpdateJobState", jobs_pb2.UpdateJobStateRequest(job_id=job_id, state=state), timeout)

    async def items(self, job_id: str, start: int, end: int) -> list[tuple[int, JobInput]]:
        request = jobs_pb2.FetchJobItemsRequest(job_id=job_id, start=start, end=end)
        return convert.job_items_from_proto(await self._unary("FetchJobItems", request))

    async def put_results(self, job_id: str, outputs: Sequence[ItemOutput]) -> jobs_pb2.Job:
        request = jobs_pb2.PutJobResultsRequest(job_id=job_id, results=convert.outputs_to_proto(outputs))
        return await self._unary("PutJobResults", request)

    def results(self, job_id: str, start: int, timeout: float | None) -> AsyncIterator[jobs_pb2.JobResult]:
        request = jobs_pb2.GetJobResultsRequest(job_id=job_id, start=start)
        return self._stream("StreamJobResults", request, timeout)


class JobQueueClient(_Client):
    service = "scheduler"

    def __init__(self, channels: Channels, address: str) -> None:
        super().__init__(channels, address, jobs_pb2_grpc.JobQueueStub)

    async def enqueue(self, job_id: str, timeout: float | None = DEFAULT_TIMEOUT_S) -> int:
        reply = await self._unary("EnqueueJob", jobs_pb2.EnqueueJobRequest(job_id=job_id), timeout)
        return reply.tasks

    async def lease(self, executor_id: str, wait_s: float) -> TaskLease | None:
        request = jobs_pb2.LeaseTaskRequest(executor_id=executor_id, wait_s=wait_s)
        reply = await self._unary("LeaseTask", request, wait_s + DEFAULT_TIMEOUT_S)
        return convert.lease_from_proto(reply.lease) if reply.HasField("lease") else None

    @staticmethod
    def _ref(lease: TaskLease) -> jobs_pb2.TaskRef:
        return jobs_pb2.TaskRef(job_id=lease.job_id, task=lease.task, lease_id=lease.lease_id)

    async def extend(self, lease: TaskLease) -> None:
        await self._unary("ExtendLease", self._ref(lease))

    async def finish(self, lease: TaskLease) -> None:
        await self._unary("FinishTask", self._ref(lease))

    async def fail(self, lease: TaskLease, reason: str, workers: Sequence[str]) -> bool:
        request = jobs_pb2.FailTaskRequest(task=self._ref(lease), reason=reason[:2000], workers=list(workers))
        return (await self._unary("FailTask", request)).requeued

    async def cancel(self, job_id: str, timeout: float | None = DEFAULT_TIMEOUT_S) -> None:
        await self._unary("CancelJob", jobs_pb2.CancelJobRequest(job_id=job_id), timeout)
