"""WorkerApp: wires the runtime, the gRPC server, membership and session eviction together.

`start_worker(config)` starts a real worker in the current event loop (port 0 works), for
`python -m services.worker` and for in-process tests alike.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Callable

import torch

from modelgrid.errors import ModelGridError
from modelgrid.v1 import worker_pb2_grpc
from services.common.server import RunningServer, create_server
from services.worker import metrics
from services.worker.batching import BatchLimits
from services.worker.clients import RegistryClient, SchedulerClient
from services.worker.config import WorkerConfig
from services.worker.device import DeviceProbe, choose_device, device_total_memory
from services.worker.health import DeviceHealthServicer
from services.worker.membership import Membership
from services.worker.runtime import WorkerRuntime, WorkerStatus
from services.worker.servicer import WorkerServicer
from services.worker.shard_cache import ShardCache

log = logging.getLogger(__name__)

SERVICE_NAME = "modelgrid.v1.Worker"


class WorkerApp:
    def __init__(self, config: WorkerConfig, runtime: WorkerRuntime, registry: RegistryClient,
                 scheduler: SchedulerClient) -> None:
        self.config = config
        self.runtime = runtime
        self.registry = registry
        self.scheduler = scheduler
        self.membership = Membership(scheduler, self.status, runtime.observe_epoch)
        self.leaving = False  # SIGTERM: report "draining" while the scheduler hands our stages over
        self._evictor: asyncio.Task | None = None
        # ends the servicer's open ForwardStream calls (set by start_worker)
        self.end_streams: Callable[[], None] = lambda: None

    def status(self) -> WorkerStatus:
        """What heartbeats report: the runtime's status, "draining" from the moment the worker is leaving."""
        status = self.runtime.status()
        return dataclasses.replace(status, state="draining") if self.leaving else status

    def start_background(self) -> None:
        self.membership.start()
        self._evictor = asyncio.create_task(self._evict_loop(), name="session-eviction")

    async def _evict_loop(self) -> None:
        idle = self.config.session_idle_timeout_s
        period = min(max(idle / 4, 0.05), 5.0)
        while True:
            await asyncio.sleep(period)
            self.runtime.evict_idle(idle)

    async def drain(self, grace_s: float) -> None:
        """Leave without failing a request, in at most grace_s.

        1. report "draining": the scheduler places our stages on other workers; until a copy is ready there
           it keeps routing to us, so we keep accepting new sessions meanwhile;
        2. once no placement names us (or the scheduler cannot tell), refuse new sessions (UNAVAILABLE
           "worker draining": the gateway re-routes them) and let the open ones finish;
        3. return when none is left, or at the grace limit (streams still open then fail over and replay).
        """
        self.leaving = True
        deadline = time.monotonic() + grace_s
        if self.membership.registered:  # else no route leads here: refuse new sessions at once
            self.membership.poke()  # tell the scheduler now
            await self._wait_handed_over(deadline)
        self.runtime.draining = True
        self.membership.poke()
        while self.runtime.sessions.active_sessions() > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        left = self.runtime.sessions.active_sessions()
        if left:
            log.warning("grace period over with %d session(s) still open; exiting anyway", left)
        else:
            log.info("all sessions closed")
        self.end_streams()  # open ForwardStream calls would hold the server's stop for its whole grace

    async def _wait_handed_over(self, deadline: float) -> None:
        """Until the scheduler's placements no longer name this worker for any version it holds."""
        worker_id = self.runtime.worker_id
        versions = sorted({(s.model, s.version) for s in self.runtime.status().stages})
        started = time.monotonic()
        while versions and time.monotonic() < deadline:
            try:
                placed = [v for v in versions if worker_id in await self.scheduler.placed_workers(*v)]
            except ModelGridError as err:
                log.warning("cannot ask the scheduler whether our stages moved (%s); draining now", err.message)
                return
            if not placed:
                log.info("stages handed over to other workers after %.1f s; refusing new sessions",
                         time.monotonic() - started)
                return
            versions = placed
            await asyncio.sleep(min(self.membership.interval_s, 0.5))
        if versions:
            log.warning("grace period over before the scheduler moved %s", ", ".join(f"{m} {v}" for m, v in versions))

    async def close(self) -> None:
        if self._evictor is not None:
            self._evictor.cancel()
            try:
                await self._evictor
            except asyncio.CancelledError:
                pass
        await self.membership.stop()
        await self.registry.close()
        await self.scheduler.close()
        self.runtime.close()


async def start_worker(config: WorkerConfig) -> tuple[RunningServer, WorkerApp]:
    """Start a worker's gRPC server and background tasks; stop it with `await stop_worker(running, app)`."""
    device = choose_device(config.device)
    total = config.memory_bytes or device_total_memory(device)
    registry = RegistryClient(config.registry)
    scheduler = SchedulerClient(config.scheduler)
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    runtime = WorkerRuntime(
        device, total, ShardCache(config.cache_path(), registry), registry,
        kv_budget=config.kv_budget_bytes, admission_timeout_s=config.kv_admission_timeout_s,
        limits=BatchLimits(max_tokens=config.max_batch_tokens, wait_s=config.batch_wait_ms / 1000),
    )
    app = WorkerApp(config, runtime, registry, scheduler)
    servicer = WorkerServicer(runtime, on_change=app.membership.poke)
    app.end_streams = servicer.end_streams
    running = await create_server(
        config.listen,
        lambda server: worker_pb2_grpc.add_WorkerServicer_to_server(servicer, server),
        [SERVICE_NAME],
        "worker",
        health_servicer=DeviceHealthServicer(DeviceProbe(device)),
    )
    runtime.worker_id, runtime.address = config.identity(running.port)
    metrics.bind(runtime)
    app.start_background()
    log.info("worker %s serving on %s (device %s, %d bytes offered, KV budget %s, cache %s)",
             runtime.worker_id, runtime.address, device, total,
             config.kv_budget_bytes or "what the weights leave", config.cache_path())
    return running, app


async def stop_worker(running: RunningServer, app: WorkerApp, grace_s: float = 0.0) -> None:
    """Stop an in-process worker: NOT_SERVING, stop the server, then its background tasks."""
    app.end_streams()
    await running.stop(grace_s)
    await app.close()
