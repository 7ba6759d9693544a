"""The scheduler's batch-job queue (services/scheduler/jobs.py + job_tasks.py) against a real Redis and a real
registry (JobStore on port 0, SQLite): tasks from the durable items, leases pinned to the least busy replica
with a per-worker cap, bounded re-runs avoiding the failed worker, expired leases, a woken long poll,
cancellation, and tasks rebuilt from the database when Redis lost them."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from pathlib import Path
from typing import AsyncIterator

import pytest
import redis

from modelgrid.channel import aio_channel
from modelgrid.v1 import jobs_pb2, jobs_pb2_grpc
from services.registry.app import start_registry
from services.registry.config import RegistryConfig
from services.scheduler.clients import RegistryClient, WorkerClients
from services.scheduler.config import SchedulerConfig
from services.scheduler.controller import Controller
from services.scheduler.job_clients import JobStoreClient
from services.scheduler import jobs as jobs_module
from services.scheduler.job_tasks import JobTasks
from services.scheduler.jobs import JobQueue
from services.scheduler.records import PlacedStageRecord, PlacementRecord, ReplicaRecord, WorkerRecord
from services.scheduler.state import SchedulerState

MODEL, VERSION = "enc", "v1"


class Env:
    def __init__(self, queue: JobQueue, store: jobs_pb2_grpc.JobStoreStub, redis_url: str) -> None:
        self.queue = queue
        self.store = store
        self.redis_url = redis_url

    async def job(self, n: int, task_items: int) -> str:
        items = [jobs_pb2.JobItem(id=f"i{i}", text=f"t{i}") for i in range(n)]
        job = await self.store.CreateJob(jobs_pb2.CreateJobRequest(
            model=MODEL, version=VERSION, kind="embed", items=items, params=jobs_pb2.JobParams(task_items=task_items)))
        return job.job_id

    async def put(self, job_id: str, start: int, end: int) -> jobs_pb2.Job:
        results = [jobs_pb2.JobResult(index=i, embedding=[1.0]) for i in range(start, end)]
        return await self.store.PutJobResults(jobs_pb2.PutJobResultsRequest(job_id=job_id, results=results))

    async def state(self, job_id: str) -> jobs_pb2.Job:
        return await self.store.GetJob(jobs_pb2.GetJobRequest(job_id=job_id))


@pytest.fixture
async def env(tmp_path: Path, redis_url: str) -> AsyncIterator[Env]:
    registry = await start_registry(RegistryConfig(listen="127.0.0.1:0", metrics_port=-1, data_dir=str(tmp_path)))
    address = f"127.0.0.1:{registry.port}"
    config = SchedulerConfig(redis_url=redis_url, registry=address, job_max_attempts=2, job_lease_s=30.0,
                             job_tasks_per_worker=2)
    state = SchedulerState.from_url(redis_url)
    controller = Controller(state, RegistryClient(address, 5.0), WorkerClients(), config)
    for worker in ("w0", "w1"):
        await state.register(WorkerRecord(worker, f"127.0.0.1:{worker[-1]}"), ttl_s=60)
    stage = PlacedStageRecord(0, 2, [ReplicaRecord("w0", "127.0.0.1:0", True), ReplicaRecord("w1", "127.0.0.1:1", True)])
    await state.write_placement(PlacementRecord(MODEL, VERSION, stages=[stage], state="ready"), None)
    queue = JobQueue(JobTasks.from_url(redis_url), JobStoreClient(address, 5.0), controller, config)
    channel = aio_channel(address)
    try:
        yield Env(queue, jobs_pb2_grpc.JobStoreStub(channel), redis_url)
    finally:
        await channel.close()
        await queue.close()
        await controller.close()
        await registry.stop(0)


async def test_leases_spread_over_replicas_up_to_the_cap_and_finish_the_job(
        env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jobs_module, "RECHECK_S", 60.0)  # a waiting lease gets a task only if it is woken
    job_id = await env.job(10, task_items=3)
    assert await env.queue.enqueue(job_id) == 4
    assert await env.queue.enqueue(job_id) == 0  # idempotent: the gateway and the sync loop may both ask
    assert (await env.state(job_id)).state == "running"

    leases = [await env.queue.lease("gw", 0) for _ in range(4)]
    assert [(ls.task.start, ls.task.end) for ls in leases] == [(0, 3), (3, 6), (6, 9), (9, 10)]
    # the least loaded replica: the second of each pair goes to the worker the first did not (ties are random)
    workers = [ls.route.hops[0].worker_id for ls in leases]
    assert sorted(workers) == ["w0", "w0", "w1", "w1"] and workers[0] != workers[1] and workers[2] != workers[3]
    assert leases[0].meta.params == {"task_items": 3} and leases[0].task.attempt == 1

    job2 = await env.job(2, task_items=2)
    await env.queue.enqueue(job2)
    assert await env.queue.lease("gw", 0.2) is None  # both workers hold 2 tasks: job2 waits

    # a finish frees a slot: a waiting lease wakes at once (not after its whole wait)
    waiting = asyncio.ensure_future(env.queue.lease("gw", 10.0))
    await asyncio.sleep(0.1)
    await env.put(job_id, 0, 3)
    started = time.monotonic()
    await env.queue.finish(job_id, leases[0].task.task)
    got = await waiting
    # unwoken, it would look again only at the end of its wait (10 s)
    assert got is not None and got.meta.job_id == job2 and time.monotonic() - started < 5.0
    assert got.route.hops[0].worker_id == leases[0].route.hops[0].worker_id  # the worker that has a slot now

    for lease in leases[1:]:
        await env.put(job_id, lease.task.start, lease.task.end)
        await env.queue.finish(job_id, lease.task.task)
    assert (await env.state(job_id)).state == "succeeded"
    assert await env.queue.tasks.active() == [job2]  # the finished job's tasks are gone from Redis


async def test_a_failed_task_runs_again_elsewhere_then_the_job_fails(env: Env) -> None:
    job_id = await env.job(4, task_items=4)
    await env.queue.enqueue(job_id)
    first = await env.queue.lease("gw", 0)
    one = first.route.hops[0].worker_id
    other = {"w0": "w1", "w1": "w0"}[one]
    assert await env.queue.fail(job_id, 0, first.task.lease_id, f"worker {one} is unavailable", [one])
    assert not await env.queue.fail(job_id, 0, first.task.lease_id, "again", [one])  # stale lease: ignored
    second = await env.queue.lease("gw", 0)
    assert second.route.hops[0].worker_id == other and second.task.attempt == 2  # avoids the first
    assert not await env.queue.fail(job_id, 0, second.task.lease_id, f"worker {other} is unavailable", [other])
    job = await env.state(job_id)
    assert job.state == "failed" and "failed 2 times" in job.error and f"{other} is unavailable" in job.error
    assert await env.queue.tasks.active() == []
    assert await env.queue.lease("gw", 0) is None


async def test_an_expired_lease_runs_again_and_a_late_finish_still_counts(env: Env) -> None:
    env.queue._config = replace(env.queue._config, job_lease_s=0.2, job_max_attempts=3)
    job_id = await env.job(2, task_items=2)
    await env.queue.enqueue(job_id)
    stale = await env.queue.lease("gw-dead", 0)
    await asyncio.sleep(0.3)
    await env.queue._requeue_expired()
    fresh = await env.queue.lease("gw", 0)
    assert fresh.task.task == stale.task.task and fresh.task.lease_id != stale.task.lease_id
    with pytest.raises(Exception, match="no lease"):
        await env.queue.extend(job_id, stale.task.task, stale.task.lease_id)
    await env.queue.extend(job_id, fresh.task.task, fresh.task.lease_id)
    # the old holder finishes after all: its results are in the registry, so the task is done
    await env.put(job_id, 0, 2)
    await env.queue.finish(job_id, stale.task.task)
    await env.queue.finish(job_id, fresh.task.task)
    assert (await env.state(job_id)).state == "succeeded" and (await env.state(job_id)).done == 2


async def test_cancel_stops_handing_out_tasks(env: Env) -> None:
    job_id = await env.job(6, task_items=2)
    await env.queue.enqueue(job_id)
    held = await env.queue.lease("gw", 0)
    await env.store.UpdateJobState(jobs_pb2.UpdateJobStateRequest(job_id=job_id, state="cancelled"))
    await env.queue.cancel(job_id)
    assert await env.queue.lease("gw", 0) is None
    assert not await env.queue.fail(job_id, held.task.task, held.task.lease_id, "x", [])


async def test_tasks_are_rebuilt_from_the_database_after_redis_lost_them(env: Env) -> None:
    job_id = await env.job(10, task_items=4)
    await env.queue.enqueue(job_id)
    await env.put(job_id, 0, 3)
    await env.put(job_id, 5, 6)
    client = redis.Redis.from_url(env.redis_url)
    client.delete(*client.keys("modelgrid:jobs:*"))  # Redis restarted empty
    client.close()
    assert await env.queue.tasks.active() == []
    await env.queue._sync_registry()
    spans = []
    while (lease := await env.queue.lease("gw", 0)) is not None:
        spans.append((lease.task.start, lease.task.end))
        await env.put(job_id, lease.task.start, lease.task.end)
        await env.queue.finish(job_id, lease.task.task)
    assert spans == [(3, 5), (6, 10)]  # only the items without results
    job = await env.state(job_id)
    assert (job.state, job.done) == ("succeeded", 10)
    # a job that ended while Redis still had its tasks is dropped there
    other = await env.job(2, task_items=1)
    await env.queue.enqueue(other)
    await env.store.UpdateJobState(jobs_pb2.UpdateJobStateRequest(job_id=other, state="cancelled"))
    await env.queue._sync_registry()
    assert await env.queue.tasks.active() == []


async def test_concurrent_leases_keep_the_per_worker_cap(env: Env) -> None:
    """Eight lanes asking at once (as a gateway's lanes do when work appears) get 2 tasks per worker, not 8 on the
    least busy one."""
    job_id = await env.job(20, task_items=2)
    await env.queue.enqueue(job_id)
    got = [ls for ls in await asyncio.gather(*(env.queue.lease(f"gw{i}", 0) for i in range(8))) if ls is not None]
    assert sorted(ls.route.hops[0].worker_id for ls in got) == ["w0", "w0", "w1", "w1"]


async def test_a_job_cancelled_during_a_registry_sync_is_not_rebuilt(env: Env) -> None:
    job_id = await env.job(4, task_items=2)
    await env.queue.enqueue(job_id)
    read_active = env.queue.store.active

    async def active_then_cancel() -> list:
        stored = await read_active()  # the job is running in this list...
        await env.store.UpdateJobState(jobs_pb2.UpdateJobStateRequest(job_id=job_id, state="cancelled"))
        await env.queue.cancel(job_id)  # ...and is cancelled right after it was read
        return stored

    env.queue.store.active = active_then_cancel  # type: ignore[method-assign]
    await env.queue._sync_registry()
    assert await env.queue.tasks.active() == []
    assert await env.queue.lease("gw", 0) is None


async def test_the_bookkeeping_loop_outlives_a_redis_error_reply(env: Env) -> None:
    """Redis demoted to a read-only replica (a failover) answers writes with an error reply, not a dropped
    connection; once it takes writes again, the expired lease runs again."""
    env.queue._config = replace(env.queue._config, job_lease_s=0.2, job_sync_interval_s=0.05)
    job_id = await env.job(2, task_items=2)
    await env.queue.enqueue(job_id)
    assert await env.queue.lease("gw-dead", 0) is not None
    env.queue.start()
    admin = redis.Redis.from_url(env.redis_url)
    try:
        admin.execute_command("REPLICAOF", "127.0.0.1", "1")  # nothing listens there: it stays read-only
        deadline = time.monotonic() + 20
        while not env.queue._down and not env.queue._loop.done():
            assert time.monotonic() < deadline, "the loop never tried to re-queue the expired lease"
            await asyncio.sleep(0.05)
        assert not env.queue._loop.done(), env.queue._loop.exception()
    finally:
        admin.execute_command("REPLICAOF", "NO", "ONE")
        admin.close()
    deadline = time.monotonic() + 20
    while (lease := await env.queue.lease("gw", 0.5)) is None:
        assert time.monotonic() < deadline, "the expired lease was never queued again"
    assert lease.task.attempt == 2
