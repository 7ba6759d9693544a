"""Wiring: build the scheduler's collaborators and start its gRPC server (in-process, for main and tests)."""

from __future__ import annotations

import random

import grpc

from modelgrid.v1 import jobs_pb2_grpc, scheduler_pb2_grpc
from services.common.server import RunningServer, create_server
from services.scheduler.clients import RegistryClient, WorkerClients
from services.scheduler.config import SchedulerConfig
from services.scheduler.controller import Controller
from services.scheduler.job_clients import JobStoreClient
from services.scheduler.job_servicer import JobQueueServicer
from services.scheduler.job_tasks import JobTasks
from services.scheduler.jobs import JobQueue
from services.scheduler.membership import Membership
from services.scheduler.queries import Queries
from services.scheduler.servicer import SchedulerServicer
from services.scheduler.state import SchedulerState

SERVICE_NAME = "modelgrid.v1.Scheduler"
JOBS_SERVICE_NAME = "modelgrid.v1.JobQueue"


async def start_scheduler(
    config: SchedulerConfig, rng: random.Random | None = None
) -> tuple[RunningServer, Controller]:
    """Start the server and the reconcile/monitor loops. Stop with `await running.stop(grace)` then
    `await controller.close()`."""
    controller = Controller(
        SchedulerState.from_url(config.redis_url),
        RegistryClient(config.registry, config.rpc_timeout_s),
        WorkerClients(),
        config,
    )
    servicer = SchedulerServicer(controller, Membership(controller), Queries(controller, rng))
    jobs = JobQueue(JobTasks.from_url(config.redis_url), JobStoreClient(config.registry, config.rpc_timeout_s),
                    controller, config)
    controller.closers.append(jobs.close)

    def add(server: grpc.aio.Server) -> None:
        scheduler_pb2_grpc.add_SchedulerServicer_to_server(servicer, server)
        jobs_pb2_grpc.add_JobQueueServicer_to_server(JobQueueServicer(jobs), server)

    try:
        running = await create_server(config.listen, add, [SERVICE_NAME, JOBS_SERVICE_NAME], "scheduler")
    except BaseException:
        await controller.close()
        raise
    controller.start()
    jobs.start()
    return running, controller
