"""The scheduler's half of batch jobs: tasks made from the registry's records, leased to the gateways' executors.

  enqueue   the job's items without results (registry) -> tasks of --job-task-items (Redis); idempotent.
  lease     the oldest job's next task, pinned to a full route through the least busy replica
            (job_split.choose_task_route); waits up to wait_s for one (woken when tasks come back or leases end).
  finish    the task's results are in the registry: done (whoever wrote them; a stale lease's too).
  fail      queued again, avoiding the workers it failed on, until --job-max-attempts; then the job fails.
  cancel    the job's tasks are dropped: nothing more is handed out.

A background loop (every --job-sync-interval-s) re-queues tasks whose lease expired (a gateway died),
records jobs that failed in Redis in the registry, and compares Redis with the registry: a queued or
running job Redis does not know (Redis restarted empty, or the gateway could not reach the scheduler at
submission) gets tasks for its items without results; a job the registry says has ended is dropped; a job
whose version is no longer deployed fails. So a scheduler restart resumes from Redis, and a Redis loss
from the database.
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
import time

from modelgrid.errors import FailedPrecondition, InvalidArgument, ModelGridError, NotFound
from services.common.clock import now_ms
from services.scheduler.config import SchedulerConfig
from services.scheduler.controller import Controller
from services.scheduler.job_clients import ACTIVE_STATES, JobStoreClient
from services.scheduler.job_split import choose_task_route, split, worker_load
from services.scheduler.job_tasks import JobTasks, Lease, StoredJob
from services.scheduler.records import PlacementRecord, Route

log = logging.getLogger(__name__)

MAX_WAIT_S = 10.0  # longest a LeaseTask call waits for a task
RECHECK_S = 0.5  # waiting lease calls look at Redis this often (tasks queued by another scheduler)
REGISTRY_SYNC_EVERY = 5  # compare with the registry every this many ticks of the loop


class Wakeup:
    """Wakes every waiting LeaseTask at once when tasks come back or leases end."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def notify(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self, timeout_s: float) -> None:
        waiter = asyncio.ensure_future(self._event.wait())
        try:
            await asyncio.wait({waiter}, timeout=timeout_s)
        finally:
            waiter.cancel()


class JobQueue:
    def __init__(self, tasks: JobTasks, store: JobStoreClient, controller: Controller, config: SchedulerConfig) -> None:
        self.tasks = tasks
        self.store = store
        self._controller = controller
        self._state = controller.state
        self._config = config
        self._wakeup = Wakeup()
        self._rng = random.Random()  # ties between equally busy replicas (job_split.choose_task_route)
        # one lease at a time here: concurrent LeaseTask calls would all read the same load and put every task
        # on the least busy replica, past --job-tasks-per-worker
        self._leasing = asyncio.Lock()
        self._loop: asyncio.Task | None = None
        self._down = False  # the loop's last tick failed (logged once)

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.create_task(self._sync_loop(), name="scheduler-jobs")

    async def close(self) -> None:
        if self._loop is not None:
            self._loop.cancel()
            await asyncio.wait({self._loop}, timeout=5)
            self._loop = None
        self._wakeup.notify()
        await self.tasks.close()
        await self.store.close()

    # -- calls ------------------------------------------------------------------------------------

    async def enqueue(self, job_id: str) -> int:
        if not job_id:
            raise InvalidArgument("job_id is required")
        return await self._enqueue(await self.store.get(job_id))

    async def _enqueue(self, job: StoredJob) -> int:
        if job.state not in ACTIVE_STATES:
            raise FailedPrecondition(f"job {job.meta.job_id} is {job.state}: nothing to run")
        task_items = int(job.meta.params.get("task_items") or self._config.job_task_items)
        spans = split(await self.store.pending(job.meta.job_id), task_items)
        created = await self.tasks.create(job.meta, job.created_ms, spans)
        if created:
            log.info("job %s: %d tasks of up to %d items for %s %s", job.meta.job_id, created, task_items,
                     job.meta.model, job.meta.version)
            if job.state == "queued":
                await self.store.set_state(job.meta.job_id, "running")
            self._wakeup.notify()
        return created

    async def lease(self, executor_id: str, wait_s: float) -> Lease | None:
        deadline = time.monotonic() + min(max(wait_s, 0.0), MAX_WAIT_S)
        while True:
            async with self._leasing:
                lease = await self._try_lease()
            left = deadline - time.monotonic()
            if lease is not None:
                log.debug("job %s task %d (items %d-%d, attempt %d) -> %s on %s", lease.meta.job_id,
                          lease.task.task, lease.task.start, lease.task.end, lease.task.attempt, executor_id,
                          ",".join(h.worker_id for h in lease.route.hops))
                return lease
            if left <= 0:
                return None
            await self._wakeup.wait(min(left, RECHECK_S))

    async def _try_lease(self) -> Lease | None:
        job_ids, routes = await self.tasks.active_and_routes()
        if not job_ids:
            return None
        load = worker_load(routes)
        cap = self._config.job_tasks_per_worker
        # (model, version) -> (placement, its serving workers, epoch) or None: read once per pass, however
        # many of the active jobs run on the same version
        placed: dict[tuple[str, str], tuple[PlacementRecord, set[str], int] | None] = {}
        for job_id, status in zip(job_ids, await self.tasks.statuses(job_ids)):
            if status is None or status.state != "running":
                continue
            meta = status.meta
            key = (meta.model, meta.version)
            if key not in placed:
                placement = await self._state.get_placement(*key)
                placed[key] = None if placement is None else (placement, *await self._live(placement))
            if placed[key] is None:
                continue
            placement, live, epoch = placed[key]
            label = f"model '{meta.model}' {meta.version}"
            hops = choose_task_route(placement.stages, live, load, cap, label=label, rng=self._rng)
            if hops is None:
                continue  # every replica busy: do not take a task out of the queue
            lease_id = secrets.token_hex(8)
            task = await self.tasks.pop(job_id, lease_id, now_ms() + int(self._config.job_lease_s * 1000))
            if task is None:
                continue
            if task.avoid:  # a retried task keeps away from the workers it failed on
                hops = choose_task_route(placement.stages, live, load, cap, task.avoid, label, self._rng)
            if not await self.tasks.set_route(task, [h.worker_id for h in hops]):
                await self.tasks.set_route(task, [])
                continue
            route = Route(meta.model, meta.version, self._controller.newest_epoch(epoch), tuple(hops))
            return Lease(meta, task, route, self._config.job_lease_s)
        return None

    async def _live(self, placement: PlacementRecord) -> tuple[set[str], int]:
        """The placement's serving workers, and the stored epoch (read with them, for the lease's route)."""
        ids = {r.worker_id for s in placement.stages for r in s.replicas}
        workers, epoch = await self._state.workers_and_epoch(ids)
        return {wid for wid, w in workers.items() if w.serving}, epoch

    async def extend(self, job_id: str, task: int, lease_id: str) -> None:
        expiry = now_ms() + int(self._config.job_lease_s * 1000)
        if not await self.tasks.extend(job_id, task, lease_id, expiry):
            raise NotFound(f"job {job_id} task {task} has no lease {lease_id!r} (it expired, or the job ended)")

    async def finish(self, job_id: str, task: int) -> None:
        outcome = await self.tasks.finish(job_id, task)
        if outcome == 2:
            log.info("job %s: every task finished", job_id)
        self._wakeup.notify()

    async def fail(self, job_id: str, task: int, lease_id: str, reason: str, workers: list[str]) -> bool:
        """True when the task was queued again; False when the lease was stale or the job is out of attempts."""
        outcome = await self.tasks.release(job_id, task, lease_id, now_ms(), self._config.job_max_attempts, workers,
                                           f"task {task} failed {self._config.job_max_attempts} times; last: {reason}")
        log.info("job %s task %d failed on %s (%s): %s", job_id, task, ",".join(workers) or "?", reason,
                 {1: "queued again", 0: "out of attempts", -1: "stale lease"}[outcome])
        if outcome == 0:
            await self._settle_failed(job_id)
        self._wakeup.notify()
        return outcome == 1

    async def cancel(self, job_id: str) -> None:
        if await self.tasks.drop(job_id):
            log.info("job %s cancelled: its tasks are no longer handed out", job_id)
        self._wakeup.notify()

    # -- the loop ---------------------------------------------------------------------------------

    async def _sync_loop(self) -> None:
        tick = 0
        while True:
            try:
                await self._requeue_expired()
                if tick % REGISTRY_SYNC_EVERY == 0:
                    await self._sync_registry()
                if self._down:
                    log.info("job bookkeeping works again")
                    self._down = False
            except ModelGridError as err:
                if not self._down:
                    log.warning("job bookkeeping failed (retrying): %s", err.message)
                self._down = True
            except Exception:
                # e.g. a Redis error reply (READONLY after a failover, OOM): the loop must go on, or expired
                # leases never run again and their jobs stay running forever
                if not self._down:
                    log.exception("job bookkeeping failed (retrying)")
                self._down = True
            tick += 1
            await asyncio.sleep(self._config.job_sync_interval_s)

    async def _requeue_expired(self) -> None:
        for job_id, task in await self.tasks.expired(now_ms()):
            outcome = await self.tasks.release(
                job_id, task, "", now_ms(), self._config.job_max_attempts, [],
                f"task {task}'s lease expired {self._config.job_max_attempts} times (its executor stopped answering)",
            )
            if outcome >= 0:
                log.warning("job %s task %d: lease expired; %s", job_id, task,
                            "queued again" if outcome else "out of attempts")
            if outcome == 0:
                await self._settle_failed(job_id)
            self._wakeup.notify()

    async def _settle_failed(self, job_id: str) -> None:
        """Record a job that failed in Redis in the registry, then forget its tasks (or retry at the next sync)."""
        status = await self.tasks.status(job_id)
        if status is None or status.state != "failed":
            return
        await self.store.set_state(job_id, "failed", status.error)
        await self.tasks.drop(job_id)

    async def _sync_registry(self) -> None:
        # Redis first: a job that ends (cancelled, failed, succeeded) ends in the registry before its tasks leave
        # Redis, so a job missing from Redis here is still active in the registry's list only if it really lacks
        # tasks; read the other way round, a cancel in between would rebuild the cancelled job's tasks.
        in_redis = set(await self.tasks.active())
        stored = {j.meta.job_id: j for j in await self.store.active()}
        for job_id in in_redis - set(stored):
            await self._drop_if_ended(job_id)
        for job_id in in_redis:
            await self._settle_failed(job_id)
        deployments = self._controller.deployments
        for job_id, job in stored.items():
            key = (job.meta.model, job.meta.version)
            if deployments is not None and key not in deployments:
                await self.store.set_state(job_id, "failed", f"model '{key[0]}' {key[1]} is no longer deployed "
                                           "(no alias points at it); submit the job again")
                await self.tasks.drop(job_id)
            elif job_id not in in_redis and await self._enqueue(job):
                log.warning("job %s: tasks rebuilt from the registry (Redis did not have them)", job_id)

    async def _drop_if_ended(self, job_id: str) -> None:
        """A job in Redis but not among the registry's active ones: drop it if it really ended (it may have been
        created after the registry's list was read)."""
        try:
            job = await self.store.get(job_id)
        except NotFound:
            job = None
        if job is None or job.state not in ACTIVE_STATES:
            await self.tasks.drop(job_id)
            log.info("job %s %s: its tasks were dropped", job_id, job.state if job else "is gone from the registry")
