"""The gateway's batch-job executor: lanes that lease tasks from the scheduler and run them through the pipeline.

Tokenizers, sessions and replay live in the gateway, so tasks run here: a lane leases a task (items
[start, end) of a job, pinned to one replica: a route with one worker per stage), reads the items from the
registry, runs them as one batched Embed or as concurrent generations on exactly that route, writes the
results to the registry and finishes the task. A failed hop fails the task (no re-route inside it): the
scheduler runs it again on other workers, up to its --job-max-attempts. The lease is extended while the
task runs; if this gateway dies, the lease expires and the task runs elsewhere. Results are written by
(job, index) idempotently, so a task that runs twice never yields a duplicate.

Idle, only lane 0 asks the scheduler for work (a long poll); the other lanes join when it gets some, and go
back to sleep when they find none, so an idle gateway costs one call every few seconds.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from contextlib import aclosing
from typing import TYPE_CHECKING, Awaitable, Callable, Sequence, TypeVar

from prometheus_client import Counter

from modelgrid.errors import FailedPrecondition, InvalidArgument, ModelGridError, NotFound, Unavailable
from services.gateway import pipeline
from services.gateway.domain import ItemOutput, Route, TaskLease, VersionInfo
from services.gateway.failover import RetryPolicy, Router
from services.gateway.job_clients import JobQueueClient, JobStoreClient
from services.gateway.job_inputs import JobInput
from services.gateway.validation import parse_generate

if TYPE_CHECKING:
    from services.gateway.app import GatewayApp

log = logging.getLogger(__name__)

TASKS = Counter("modelgrid_gateway_job_tasks_total", "Batch-job tasks this gateway ran", ["kind", "outcome"])
ITEMS = Counter("modelgrid_gateway_job_items_total", "Batch-job items this gateway finished", ["kind"])
WORKER_TASKS = Counter("modelgrid_gateway_job_worker_tasks_total", "Batch-job tasks run through each worker",
                       ["worker"])

SCOUT_WAIT_S = 5.0  # lane 0's long poll while idle
JOIN_WAIT_S = 0.5  # the other lanes' wait for a task before they sleep again
BACKOFF_S = (0.5, 1.0, 2.0, 5.0)  # after failed calls to the scheduler
WRITE_TRIES = 5  # results and the finish are retried (the work is done; losing it costs a re-run)
# results per PutJobResults call: a task may have up to 100,000 items, and their vectors in one message would pass
# the 64 MiB gRPC cap (1024 vectors of 4096 floats are 16 MiB). Results are idempotent, so a partial write is safe.
WRITE_CHUNK = 1024
T = TypeVar("T")


class PinnedRoutes:
    """Stands in for the RouteCache: always the leased route. A request that must avoid one of its workers
    cannot be served here: the task fails and runs elsewhere."""

    def __init__(self, route: Route) -> None:
        self.route = route

    async def get(self, model: str, version: str, exclude: Sequence[str] = (), timeout: float | None = None,
                  stand_in: bool = True) -> Route:
        if set(exclude) & set(self.route.worker_ids):
            raise Unavailable(f"the task's route through {', '.join(self.route.worker_ids)} failed")
        return self.route

    def invalidate(self, route: Route) -> None:
        pass


class JobRunner:
    def __init__(self, app: GatewayApp, store: JobStoreClient, queue: JobQueueClient, lanes: int,
                 task_timeout_s: float, generate_concurrency: int) -> None:
        self._app = app
        self._store = store
        self._queue = queue
        self._lanes = lanes
        self._task_timeout_s = task_timeout_s
        self._concurrency = generate_concurrency
        self.executor_id = f"gateway-{uuid.uuid4().hex[:8]}"
        self._work = asyncio.Event()  # set while tasks are to be had: the non-scout lanes lease
        self._tasks: list[asyncio.Task] = []
        self._down = False

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._lane(n), name=f"job-lane-{n}") for n in range(self._lanes)]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=10)
            if pending:
                log.warning("%d job lane(s) did not stop within 10 s", len(pending))
        self._tasks = []

    # -- leasing ----------------------------------------------------------------------------------

    async def _lane(self, n: int) -> None:
        idle, failures = n > 0, 0
        while True:
            if idle:
                await self._work.wait()
            try:
                lease = await self._queue.lease(self.executor_id, SCOUT_WAIT_S if n == 0 else JOIN_WAIT_S)
                failures = 0
                if self._down:
                    log.info("the scheduler hands out job tasks again")
                    self._down = False
            except ModelGridError as err:
                if not self._down:
                    log.warning("cannot lease job tasks from the scheduler (retrying): %s", err.message)
                    self._down = True
                await asyncio.sleep(BACKOFF_S[min(failures, len(BACKOFF_S) - 1)])
                failures += 1
                continue
            if lease is None:
                idle = n > 0
                if idle:
                    self._work.clear()
                continue
            idle = False
            self._work.set()
            try:
                await self._run(lease)
            except Exception:  # a bug must not end the lane; the task's lease expires and it runs again
                log.exception("%s: the executor failed", lease.label)

    async def _run(self, lease: TaskLease) -> None:
        keeper = asyncio.create_task(self._keep_leased(lease), name=f"lease-{lease.job_id}-{lease.task}")
        started = time.monotonic()
        try:
            outputs = await self._execute(lease)
        except asyncio.CancelledError:
            await asyncio.shield(self._give_back(lease, "the gateway is shutting down", []))
            raise
        except (InvalidArgument, NotFound, FailedPrecondition) as err:
            await self._give_back(lease, f"{err.code}: {err.message}", [])  # runs out of attempts: the job fails
            return
        except ModelGridError as err:
            await self._give_back(lease, f"{err.code}: {err.message}", lease.route.worker_ids)
            return
        finally:
            keeper.cancel()
        # counted as soon as the workers have done their part, before the results are written: once a job has
        # all its results, every task's count is in (a count after FinishTask could lag the job's end)
        for worker in set(lease.route.worker_ids):
            WORKER_TASKS.labels(worker).inc()
        try:
            for begin in range(0, len(outputs), WRITE_CHUNK):
                chunk = outputs[begin : begin + WRITE_CHUNK]
                await self._retry(functools.partial(self._store.put_results, lease.job_id, chunk), "write results")
        except FailedPrecondition as err:  # the job was cancelled (or failed) meanwhile: nothing more to do
            log.info("%s: results not written: %s", lease.label, err.message)
            TASKS.labels(lease.kind, "dropped").inc()
            return
        except ModelGridError as err:
            log.warning("%s: results not written (%s); the task will run again", lease.label, err.message)
            await self._give_back(lease, f"results not written: {err.message}", [])
            return
        try:
            await self._retry(lambda: self._queue.finish(lease), "finish the task")
        except ModelGridError as err:  # its lease expires and it runs again: the results are idempotent
            log.warning("%s: done, but FinishTask failed (%s); it will run again", lease.label, err.message)
        TASKS.labels(lease.kind, "done").inc()
        ITEMS.labels(lease.kind).inc(len(outputs))
        log.debug("%s: %d items in %.3f s on %s", lease.label, len(outputs), time.monotonic() - started,
                  ",".join(lease.route.worker_ids))

    async def _keep_leased(self, lease: TaskLease) -> None:
        while True:
            await asyncio.sleep(max(lease.lease_s / 3, 0.5))
            try:
                await self._queue.extend(lease)
            except NotFound:
                log.info("%s: lease lost (expired, or the job ended); finishing anyway", lease.label)
                return
            except ModelGridError as err:
                log.warning("%s: could not extend the lease: %s", lease.label, err.message)

    async def _give_back(self, lease: TaskLease, reason: str, workers: Sequence[str]) -> None:
        TASKS.labels(lease.kind, "failed").inc()
        log.warning("%s failed on %s: %s", lease.label, ",".join(lease.route.worker_ids), reason)
        try:
            await self._queue.fail(lease, reason, workers)
        except ModelGridError as err:
            log.warning("%s: FailTask failed (%s); its lease will expire", lease.label, err.message)

    @staticmethod
    async def _retry(call: Callable[[], Awaitable[T]], what: str) -> T:
        for attempt in range(WRITE_TRIES):
            try:
                return await call()
            except Unavailable as err:
                if attempt == WRITE_TRIES - 1:
                    raise
                log.info("could not %s (%s); retrying", what, err.message)
                await asyncio.sleep(BACKOFF_S[min(attempt, len(BACKOFF_S) - 1)])
        raise AssertionError("unreachable")

    # -- running ----------------------------------------------------------------------------------

    async def _execute(self, lease: TaskLease) -> list[ItemOutput]:
        deadline = time.monotonic() + self._task_timeout_s
        items = await self._store.items(lease.job_id, lease.start, lease.end)
        router = Router(PinnedRoutes(lease.route), self._app.scheduler, self._app.workers,
                        RetryPolicy(max_failovers=0, max_route_waits=0), avoid=self._app.router.avoid)
        version = await self._app.versions.resolve(lease.route.model, lease.route.version)
        if lease.kind == "embed":
            return await self._embed(router, version, items, deadline)
        return await self._generate(router, lease, items, deadline)

    async def _embed(self, router: Router, version: VersionInfo, items: list[tuple[int, JobInput]],
                     deadline: float) -> list[ItemOutput]:
        tokenizer = await self._app.tokenizers.get(version)
        try:
            result = await pipeline.embed(router, version, tokenizer, [it.text for _, it in items], deadline)
        except InvalidArgument:
            if len(items) == 1:
                raise
            return await self._embed_one_by_one(router, version, items, deadline)
        return [ItemOutput(index, embedding=row) for (index, _), row in zip(items, result.vectors)]

    async def _embed_one_by_one(self, router: Router, version: VersionInfo, items: list[tuple[int, JobInput]],
                                deadline: float) -> list[ItemOutput]:
        """A text the batch refused: find which, and record it as that item's own error."""
        out = []
        for index, item in items:
            try:
                out += await self._embed(router, version, [(index, item)], deadline)
            except InvalidArgument as err:
                out.append(ItemOutput(index, error=err.message))
        return out

    async def _generate(self, router: Router, lease: TaskLease, items: list[tuple[int, JobInput]],
                        deadline: float) -> list[ItemOutput]:
        gate = asyncio.Semaphore(self._concurrency)

        async def one(index: int, item: JobInput) -> ItemOutput:
            async with gate:
                return await self._generate_one(router, lease, index, item, deadline)

        return list(await asyncio.gather(*(one(index, item) for index, item in items)))

    async def _generate_one(self, router: Router, lease: TaskLease, index: int, item: JobInput,
                            deadline: float) -> ItemOutput:
        s, route = lease.settings, lease.route
        try:
            params = parse_generate(
                model=route.model, version=route.version, text=item.prompt, token_ids=None,
                max_tokens=item.max_tokens or s.max_tokens, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                seed=None if s.seed is None else (s.seed + index) % 2**63, stop=s.stop, limits=self._app.limits,
            )
            plan, tokenizer = await self._app.plan_generation(params, deadline)
        except InvalidArgument as err:
            return ItemOutput(index, error=err.message)
        text, ids, finish = [], [], ""
        async with aclosing(pipeline.generate(router, plan, tokenizer)) as chunks:
            async for chunk in chunks:
                text.append(chunk.text)
                ids.append(chunk.token_id)
                finish = chunk.finish_reason or finish
        return ItemOutput(index, text="".join(text), token_ids=tuple(ids), finish_reason=finish)
