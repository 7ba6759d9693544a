"""Worker membership: registration, heartbeats, listing, and failure reports from the gateway."""

from __future__ import annotations

import logging

from modelgrid.errors import InvalidArgument, NotFound
from services.common.clock import now_ms
from services.scheduler.controller import Controller
from services.scheduler.metrics import HEARTBEAT_AGES
from services.scheduler.records import WorkerRecord

log = logging.getLogger(__name__)


class Membership:
    """Keeps worker keys alive in Redis; a loss (expiry or failed probe) triggers re-placement."""

    def __init__(self, controller: Controller) -> None:
        self._controller = controller
        self._state = controller.state
        self._config = controller.config

    async def register(self, worker: WorkerRecord) -> int:
        """Store the worker (TTL = heartbeat TTL); returns the newest epoch, never below what it has seen."""
        if not worker.worker_id:
            raise InvalidArgument("worker.worker_id is required")
        if not worker.address:
            raise InvalidArgument(f"worker '{worker.worker_id}' has no address: set worker.address to host:port")
        if worker.total_memory < 0:
            raise InvalidArgument(f"worker '{worker.worker_id}': total_memory must be >= 0, got {worker.total_memory}")
        worker.last_seen_ms = now_ms()
        await self._state.register(worker, self._config.heartbeat_ttl_s)
        HEARTBEAT_AGES.seen(worker.worker_id, worker.last_seen_ms)
        self._controller.note_state(worker.worker_id, worker.serving)
        if not worker.stages:  # a fresh process: our channel to its address may be in reconnect backoff
            await self._controller.workers.forget(worker.address)
        epoch = await self._state.raise_epoch(self._controller.epoch_floor([worker]))
        self._controller.note_epoch(epoch)
        log.info(
            "worker %s registered at %s (%s, %d bytes, %d stage(s) loaded, %s)",
            worker.worker_id, worker.address, worker.device or "?", worker.total_memory, len(worker.stages),
            worker.state,
        )
        await self._controller.forget_unheld(worker)
        return epoch

    async def heartbeat(self, worker_id: str, worker: WorkerRecord) -> int:
        """Refresh the worker's key and info; NotFound when it must register again."""
        if not worker_id:
            raise InvalidArgument("worker_id is required")
        if worker.worker_id and worker.worker_id != worker_id:
            raise InvalidArgument(f"worker_id '{worker_id}' does not match worker.worker_id '{worker.worker_id}'")
        worker.worker_id = worker_id
        if not worker.address:  # a heartbeat that carries only counters: keep the registered identity
            known = await self._state.get_worker(worker_id)
            if known is None:
                raise self._unknown(worker_id)
            worker.address, worker.device = known.address, worker.device or known.device
            worker.total_memory = worker.total_memory or known.total_memory
        worker.last_seen_ms = now_ms()
        epoch = await self._state.heartbeat(worker, self._config.heartbeat_ttl_s)
        if epoch is None:
            raise self._unknown(worker_id)
        HEARTBEAT_AGES.seen(worker_id, worker.last_seen_ms)
        self._controller.note_state(worker_id, worker.serving)
        return self._controller.newest_epoch(epoch)

    @staticmethod
    def _unknown(worker_id: str) -> NotFound:
        return NotFound(
            f"worker '{worker_id}' is not registered (unknown, its heartbeats lapsed, or the scheduler's Redis "
            "was reset): call RegisterWorker again"
        )

    async def workers(self) -> list[WorkerRecord]:
        return await self._state.workers()

    async def report_failure(self, worker_id: str, reason: str) -> None:
        """Probe a worker the gateway says failed; when it does not answer, remove it and re-place now."""
        if not worker_id:
            raise InvalidArgument("worker_id is required")
        worker = await self._state.get_worker(worker_id)
        if worker is None:
            log.info("failure report for %s (%s): not registered, nothing to do", worker_id, reason or "no reason")
            return
        answer = await self._controller.workers.probe(worker.address, self._config.probe_timeout_s)
        if answer == "SERVING" or (answer == "NOT_SERVING" and not worker.serving):
            log.info(
                "failure report for %s (%s): it answers its health check (%s), keeping it",
                worker_id, reason or "no reason", "draining" if answer == "NOT_SERVING" else "serving",
            )
            return
        log.warning(
            "worker %s at %s reported failed (%s) and does not answer its health check: "
            "removing it, re-placing its stages",
            worker_id, worker.address, reason or "no reason",
        )
        await self._state.remove_worker(worker_id)
        await self._controller.workers.forget(worker.address)
        await self._controller.reconcile(refresh_registry=False)
