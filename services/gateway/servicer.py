"""The public Gateway API: each RPC parses the proto, calls the app, builds the reply."""

from __future__ import annotations

from contextlib import aclosing
from typing import AsyncIterator

import grpc

from modelgrid.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, jobs_pb2
from services.common.rpc import rpc
from services.gateway import convert
from services.gateway.app import GatewayApp
from services.gateway.auth import current_principal
from services.gateway.upstream import DEFAULT_TIMEOUT_S


def _timeout(context: grpc.aio.ServicerContext, default: float | None = DEFAULT_TIMEOUT_S) -> float | None:
    """The caller's remaining time for a proxied call (default when the caller set no deadline)."""
    left = context.time_remaining()
    return default if left is None else max(left, 0.0)


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    def __init__(self, app: GatewayApp) -> None:
        self._app = app

    @rpc
    async def Generate(
        self, request: gateway_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[gateway_pb2.GenerateChunk]:
        params = convert.generate_params(request, self._app.limits)
        plan, tokenizer = await self._app.plan_generation(params, self._app.deadline(context.time_remaining()))
        async with aclosing(self._app.generate(plan, tokenizer)) as chunks:
            async for chunk in chunks:
                yield convert.chunk_to_proto(chunk, plan.version.version)

    @rpc
    async def Embed(
        self, request: gateway_pb2.EmbedRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.EmbedResponse:
        params = convert.embed_params(request)
        version, result = await self._app.embed(params, self._app.deadline(context.time_remaining()))
        return convert.embed_response(result, version.version)

    @rpc
    async def ListModels(
        self, request: common_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.ListModelsResponse:
        return await self._app.registry.list_models(request, _timeout(context))

    @rpc
    async def GetModel(
        self, request: common_pb2.GetModelRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.Model:
        return await self._app.registry.get_model(request, _timeout(context))

    @rpc
    async def RegisterModel(
        self, request_iterator: AsyncIterator[common_pb2.UploadVersionChunk], context: grpc.aio.ServicerContext
    ) -> common_pb2.ModelVersion:
        return await self._app.register(request_iterator, _timeout(context, default=None))

    @rpc
    async def SetAlias(
        self, request: common_pb2.SetAliasRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.ModelVersion:
        version = await self._app.registry.set_alias(request, _timeout(context))
        self._app.reconcile_soon(f"alias {request.model}:{request.alias} -> {version.version}")
        return version

    @rpc
    async def SetReplicas(
        self, request: common_pb2.SetReplicasRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.Model:
        model = await self._app.registry.set_replicas(request, _timeout(context))
        self._app.reconcile_soon(f"replicas of {request.model} -> {request.replicas}")
        return model

    @rpc
    async def ListWorkers(
        self, request: common_pb2.ListWorkersRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.ListWorkersResponse:
        return await self._app.scheduler.list_workers(request, _timeout(context))

    @rpc
    async def GetPlacement(
        self, request: common_pb2.GetPlacementRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.Placement:
        placement = await self._app.scheduler.get_placement(request, _timeout(context))
        return placement if current_principal().admin else convert.without_addresses(placement)

    # ---- admin calls (guard.py's POLICY makes them admin-only) ---------------------------------

    @rpc
    async def ListPlacements(
        self, request: common_pb2.ListPlacementsRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.ListPlacementsResponse:
        return await self._app.scheduler.list_placements(request, _timeout(context))

    @rpc
    async def CreateKey(
        self, request: common_pb2.CreateKeyRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.CreateKeyResponse:
        return await self._app.registry.create_key(request, _timeout(context))

    @rpc
    async def ListKeys(
        self, request: common_pb2.ListKeysRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.ListKeysResponse:
        return await self._app.registry.list_keys(request, _timeout(context))

    @rpc
    async def RevokeKey(
        self, request: common_pb2.RevokeKeyRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.ApiKey:
        key = await self._app.registry.revoke_key(request, _timeout(context))
        self._app.auth.forget()  # at once here; other gateways within their --auth-cache-s
        return key

    @rpc
    async def GetStats(
        self, request: gateway_pb2.GetStatsRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.GatewayStats:
        return convert.stats_to_proto(self._app.meter.traffic, self._app.meter.active_streams)

    # ---- batch jobs (services/gateway/jobs.py) ----------------------------------------------------

    @rpc
    async def SubmitJob(self, request: jobs_pb2.SubmitJobRequest, context: grpc.aio.ServicerContext) -> jobs_pb2.Job:
        config = self._app.config
        submission = convert.submission_from_proto(request, config.max_job_items, config.max_tokens_cap)
        return await self._app.jobs.submit(submission, current_principal(), _timeout(context))

    @rpc
    async def GetJob(self, request: jobs_pb2.GetJobRequest, context: grpc.aio.ServicerContext) -> jobs_pb2.Job:
        return await self._app.jobs.get(request.job_id, current_principal(), _timeout(context))

    @rpc
    async def WatchJob(
        self, request: jobs_pb2.WatchJobRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[jobs_pb2.Job]:
        async for job in self._app.jobs.watch(request.job_id, request.interval_s, current_principal()):
            yield job

    @rpc
    async def CancelJob(self, request: jobs_pb2.CancelJobRequest, context: grpc.aio.ServicerContext) -> jobs_pb2.Job:
        return await self._app.jobs.cancel(request.job_id, current_principal(), _timeout(context))

    @rpc
    async def ListJobs(
        self, request: jobs_pb2.ListJobsRequest, context: grpc.aio.ServicerContext
    ) -> jobs_pb2.ListJobsResponse:
        return await self._app.jobs.list(list(request.states), request.limit, current_principal(), _timeout(context))

    @rpc
    async def GetJobResults(
        self, request: jobs_pb2.GetJobResultsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[jobs_pb2.JobResult]:
        async for result in self._app.jobs.results(request.job_id, request.start, current_principal(),
                                                   _timeout(context, default=None)):
            yield result
