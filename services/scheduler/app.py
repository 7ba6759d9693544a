"""Wiring: build the scheduler's collaborators and start its gRPC server (in-process, for main and tests)."""

from __future__ import annotations

import random

from modelgrid.v1 import scheduler_pb2_grpc
from services.common.server import RunningServer, create_server
from services.scheduler.clients import RegistryClient, WorkerClients
from services.scheduler.config import SchedulerConfig
from services.scheduler.controller import Controller
from services.scheduler.membership import Membership
from services.scheduler.queries import Queries
from services.scheduler.servicer import SchedulerServicer
from services.scheduler.state import SchedulerState

SERVICE_NAME = "modelgrid.v1.Scheduler"


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
    try:
        running = await create_server(
            config.listen,
            lambda server: scheduler_pb2_grpc.add_SchedulerServicer_to_server(servicer, server),
            [SERVICE_NAME],
            "scheduler",
        )
    except BaseException:
        await controller.close()
        raise
    controller.start()
    return running, controller
