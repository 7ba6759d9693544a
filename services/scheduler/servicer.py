"""gRPC edge of the scheduler: parse the request, call the domain object, build the reply."""

from __future__ import annotations

import grpc

from modelgrid.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc
from services.common.clock import now_ms
from services.common.rpc import rpc
from services.scheduler.controller import Controller
from services.scheduler.convert import placement_to_proto, route_to_proto, worker_from_proto, worker_to_proto
from services.scheduler.membership import Membership
from services.scheduler.queries import Queries


class SchedulerServicer(scheduler_pb2_grpc.SchedulerServicer):
    def __init__(self, controller: Controller, membership: Membership, queries: Queries) -> None:
        self._controller = controller
        self._membership = membership
        self._queries = queries

    @rpc
    async def RegisterWorker(
        self, request: scheduler_pb2.RegisterWorkerRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.RegisterWorkerResponse:
        epoch = await self._membership.register(worker_from_proto(request.worker, now_ms()))
        return scheduler_pb2.RegisterWorkerResponse(
            heartbeat_interval_s=self._controller.config.heartbeat_interval_s, epoch=epoch
        )

    @rpc
    async def Heartbeat(
        self, request: scheduler_pb2.HeartbeatRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.HeartbeatResponse:
        epoch = await self._membership.heartbeat(request.worker_id, worker_from_proto(request.worker, now_ms()))
        return scheduler_pb2.HeartbeatResponse(epoch=epoch)

    @rpc
    async def GetRoute(
        self, request: scheduler_pb2.GetRouteRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.Route:
        route = await self._queries.route(request.model, request.version, request.exclude_workers)
        return route_to_proto(route)

    @rpc
    async def ListWorkers(
        self, request: common_pb2.ListWorkersRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.ListWorkersResponse:
        workers, now = await self._membership.workers(), now_ms()
        return common_pb2.ListWorkersResponse(workers=[worker_to_proto(w, now) for w in workers])

    @rpc
    async def GetPlacement(
        self, request: common_pb2.GetPlacementRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.Placement:
        return placement_to_proto(await self._queries.placement(request.model, request.version))

    @rpc
    async def ListPlacements(
        self, request: common_pb2.ListPlacementsRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.ListPlacementsResponse:
        records = await self._queries.placements()
        return common_pb2.ListPlacementsResponse(placements=[placement_to_proto(r) for r in records])

    @rpc
    async def Reconcile(
        self, request: scheduler_pb2.ReconcileRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.ReconcileResponse:
        records = await self._controller.reconcile()
        return scheduler_pb2.ReconcileResponse(placements=[placement_to_proto(r) for r in records])

    @rpc
    async def ReportFailure(
        self, request: scheduler_pb2.ReportFailureRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.ReportFailureResponse:
        await self._membership.report_failure(request.worker_id, request.reason)
        return scheduler_pb2.ReportFailureResponse()
