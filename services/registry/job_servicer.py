"""JobStoreServicer: the registry's batch-job RPCs. Each parses its request, runs JobDB in a thread, replies."""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

import grpc

from modelgrid.errors import InvalidArgument
from modelgrid.v1 import jobs_pb2, jobs_pb2_grpc
from services.common.clock import now_ms
from services.common.rpc import rpc
from services.registry import convert
from services.registry.job_db import JobDB
from services.registry.job_records import KINDS

RESULTS_PAGE = 512  # items read from the database per query while streaming results


class JobStoreServicer(jobs_pb2_grpc.JobStoreServicer):
    def __init__(self, jobs: JobDB) -> None:
        self._jobs = jobs

    @rpc
    async def CreateJob(self, request: jobs_pb2.CreateJobRequest, context: grpc.aio.ServicerContext) -> jobs_pb2.Job:
        if request.kind not in KINDS:
            raise InvalidArgument(f"job kind must be one of {', '.join(KINDS)}, got {request.kind!r}")
        if not request.items:
            raise InvalidArgument("a job needs at least one item")
        items = [convert.item_from_proto(i) for i in request.items]
        record = await asyncio.to_thread(
            self._jobs.create, request.model, request.version, request.kind,
            convert.job_params_to_json(request.params), items, request.owner,
        )
        return convert.job_to_proto(record, now_ms())

    @rpc
    async def GetJob(self, request: jobs_pb2.GetJobRequest, context: grpc.aio.ServicerContext) -> jobs_pb2.Job:
        return convert.job_to_proto(await asyncio.to_thread(self._jobs.get, request.job_id), now_ms())

    @rpc
    async def ListJobs(
        self, request: jobs_pb2.StoreListJobsRequest, context: grpc.aio.ServicerContext
    ) -> jobs_pb2.ListJobsResponse:
        owner = request.owner or None
        records = await asyncio.to_thread(self._jobs.list, list(request.states), owner, request.limit or 50)
        now = now_ms()
        return jobs_pb2.ListJobsResponse(jobs=[convert.job_to_proto(r, now) for r in records])

    @rpc
    async def UpdateJobState(
        self, request: jobs_pb2.UpdateJobStateRequest, context: grpc.aio.ServicerContext
    ) -> jobs_pb2.Job:
        record = await asyncio.to_thread(self._jobs.update_state, request.job_id, request.state, request.error)
        return convert.job_to_proto(record, now_ms())

    @rpc
    async def FetchJobItems(
        self, request: jobs_pb2.FetchJobItemsRequest, context: grpc.aio.ServicerContext
    ) -> jobs_pb2.FetchJobItemsResponse:
        items = await asyncio.to_thread(self._jobs.fetch_items, request.job_id, request.start, request.end)
        return jobs_pb2.FetchJobItemsResponse(items=[convert.item_to_proto(i, item) for i, item in items])

    @rpc
    async def PutJobResults(
        self, request: jobs_pb2.PutJobResultsRequest, context: grpc.aio.ServicerContext
    ) -> jobs_pb2.Job:
        results = [convert.result_from_proto(r) for r in request.results]
        record = await asyncio.to_thread(self._jobs.put_results, request.job_id, results)
        return convert.job_to_proto(record, now_ms())

    @rpc
    async def ListPendingItems(
        self, request: jobs_pb2.GetJobRequest, context: grpc.aio.ServicerContext
    ) -> jobs_pb2.PendingItems:
        return convert.pending_to_proto(await asyncio.to_thread(self._jobs.pending, request.job_id))

    @rpc
    async def StreamJobResults(
        self, request: jobs_pb2.GetJobResultsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[jobs_pb2.JobResult]:
        start = max(request.start, 0)
        while True:
            page = await asyncio.to_thread(self._jobs.results, request.job_id, start, RESULTS_PAGE)
            for result in page:
                yield convert.result_to_proto(result)
            if len(page) < RESULTS_PAGE:
                return
            start = page[-1].index + 1
