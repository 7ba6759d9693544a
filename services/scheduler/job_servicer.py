"""gRPC edge of the scheduler's batch-job queue (JobQueue): parse the request, call JobQueue, build the reply."""

from __future__ import annotations

import grpc

from modelgrid.v1 import jobs_pb2, jobs_pb2_grpc
from services.common.rpc import rpc
from services.scheduler.convert import lease_to_proto
from services.scheduler.jobs import JobQueue


class JobQueueServicer(jobs_pb2_grpc.JobQueueServicer):
    def __init__(self, jobs: JobQueue) -> None:
        self._jobs = jobs

    @rpc
    async def EnqueueJob(
        self, request: jobs_pb2.EnqueueJobRequest, context: grpc.aio.ServicerContext
    ) -> jobs_pb2.EnqueueJobResponse:
        return jobs_pb2.EnqueueJobResponse(tasks=await self._jobs.enqueue(request.job_id))

    @rpc
    async def LeaseTask(
        self, request: jobs_pb2.LeaseTaskRequest, context: grpc.aio.ServicerContext
    ) -> jobs_pb2.LeaseTaskResponse:
        left = context.time_remaining()
        wait_s = request.wait_s if left is None else min(request.wait_s, max(left - 1.0, 0.0))
        lease = await self._jobs.lease(request.executor_id, wait_s)
        return jobs_pb2.LeaseTaskResponse(lease=lease_to_proto(lease)) if lease else jobs_pb2.LeaseTaskResponse()

    @rpc
    async def ExtendLease(
        self, request: jobs_pb2.TaskRef, context: grpc.aio.ServicerContext
    ) -> jobs_pb2.ExtendLeaseResponse:
        await self._jobs.extend(request.job_id, request.task, request.lease_id)
        return jobs_pb2.ExtendLeaseResponse()

    @rpc
    async def FinishTask(
        self, request: jobs_pb2.TaskRef, context: grpc.aio.ServicerContext
    ) -> jobs_pb2.FinishTaskResponse:
        await self._jobs.finish(request.job_id, request.task)
        return jobs_pb2.FinishTaskResponse()

    @rpc
    async def FailTask(
        self, request: jobs_pb2.FailTaskRequest, context: grpc.aio.ServicerContext
    ) -> jobs_pb2.FailTaskResponse:
        t = request.task
        requeued = await self._jobs.fail(t.job_id, t.task, t.lease_id, request.reason, list(request.workers))
        return jobs_pb2.FailTaskResponse(requeued=requeued)

    @rpc
    async def CancelJob(
        self, request: jobs_pb2.CancelJobRequest, context: grpc.aio.ServicerContext
    ) -> jobs_pb2.CancelJobResponse:
        await self._jobs.cancel(request.job_id)
        return jobs_pb2.CancelJobResponse()
