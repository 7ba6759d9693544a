"""WorkerApp: wires the runtime, the gRPC server, membership and session eviction together.

`start_worker(config)` starts a real worker in the current event loop (port 0 works), for
`python -m services.worker` and for in-process tests alike.
"""

from __future__ import annotations

import asyncio
import logging
import time

from modelgrid.v1 import worker_pb2_grpc
from services.common.server import RunningServer, create_server
from services.worker import metrics
from services.worker.clients import RegistryClient, SchedulerClient
from services.worker.config import WorkerConfig
from services.worker.device import DeviceProbe, choose_device, device_total_memory
from services.worker.health import DeviceHealthServicer
from services.worker.membership import Membership
from services.worker.runtime import WorkerRuntime
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
        self.membership = Membership(scheduler, runtime.status, runtime.observe_epoch)
        self._evictor: asyncio.Task | None = None

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
        """Refuse new sessions (UNAVAILABLE "worker draining"); wait for open ones to close, up to grace_s."""
        self.runtime.draining = True
        self.membership.poke()  # tell the scheduler "draining" now
        deadline = time.monotonic() + grace_s
        while self.runtime.sessions.active_sessions() > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        left = self.runtime.sessions.active_sessions()
        if left:
            log.warning("grace period over with %d session(s) still open; exiting anyway", left)
        else:
            log.info("all sessions closed")

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
    runtime = WorkerRuntime(device, total, ShardCache(config.cache_path(), registry), registry)
    app = WorkerApp(config, runtime, registry, scheduler)
    servicer = WorkerServicer(runtime, on_change=app.membership.poke)
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
    log.info("worker %s serving on %s (device %s, %d bytes offered, cache %s)",
             runtime.worker_id, runtime.address, device, total, config.cache_path())
    return running, app


async def stop_worker(running: RunningServer, app: WorkerApp, grace_s: float = 0.0) -> None:
    """Stop an in-process worker: NOT_SERVING, stop the server, then its background tasks."""
    await running.stop(grace_s)
    await app.close()
