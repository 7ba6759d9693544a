"""SchedulerState against a real Redis: TTL membership, pruning, atomic epoch-bumping compare-and-set writes."""

from __future__ import annotations

import asyncio

import pytest

from modelgrid.errors import Unavailable
from services.scheduler.records import PlacedStageRecord, PlacementRecord, ReplicaRecord, WorkerRecord
from services.scheduler.state import SchedulerState
from tests.support import free_port


@pytest.fixture
async def state(redis_url: str):
    s = SchedulerState.from_url(redis_url)
    yield s
    await s.close()


def record(epoch: int = 0, worker: str = "w1") -> PlacementRecord:
    return PlacementRecord(
        "demo", "v1", epoch, [PlacedStageRecord(0, 4, [ReplicaRecord(worker, "127.0.0.1:1", False)], 400)]
    )


async def test_membership_lives_as_long_as_heartbeats(state: SchedulerState) -> None:
    worker = WorkerRecord("w1", "127.0.0.1:1", total_memory=10)
    assert await state.heartbeat(worker, 1.0) is None  # not registered: the worker must register
    await state.register(worker, 0.3)
    assert [w.worker_id for w in await state.workers()] == ["w1"]
    worker.active_sessions = 4
    assert await state.heartbeat(worker, 0.3) == 0
    assert (await state.get_worker("w1")).active_sessions == 4
    assert await state.prune_expired() == []

    deadline = asyncio.get_running_loop().time() + 5
    while await state.get_worker("w1") is not None:  # the key expires after its TTL
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.05)
    assert await state.workers() == []
    assert await state.heartbeat(worker, 0.3) is None
    assert await state.prune_expired() == ["w1"]
    assert await state.prune_expired() == []


async def test_workers_and_epoch_reads_both_at_once(state: SchedulerState) -> None:
    assert await state.workers_and_epoch([]) == ({}, 0)
    await state.register(WorkerRecord("w1", "127.0.0.1:1", active_sessions=3), 30.0)
    await state.write_placement(record(), expected_epoch=None)
    workers, epoch = await state.workers_and_epoch(["w1", "gone", "w1"])
    assert list(workers) == ["w1"] and workers["w1"].active_sessions == 3
    assert epoch == await state.epoch() == 1


async def test_placement_writes_bump_the_epoch_and_refuse_stale_writers(state: SchedulerState) -> None:
    first = await state.write_placement(record(), expected_epoch=None)
    assert first is not None and first.epoch == 1 and await state.epoch() == 1
    assert await state.write_placement(record(), expected_epoch=None) is None  # someone placed it already

    stored = await state.get_placement("demo", "v1")
    assert stored == first
    second = await state.write_placement(record(worker="w2"), expected_epoch=1)
    assert second is not None and second.epoch == 2
    assert await state.write_placement(record(worker="w3"), expected_epoch=1) is None  # stale writer
    assert (await state.get_placement("demo", "v1")).stages[0].replicas[0].worker_id == "w2"

    stored = await state.get_placement("demo", "v1")
    stored.stages[0].replicas[0].ready = True
    assert await state.update_placement(stored)  # readiness: same epoch
    assert await state.epoch() == 2 and (await state.get_placement("demo", "v1")).stages[0].replicas[0].ready
    stored.epoch = 1
    assert not await state.update_placement(stored)

    assert await state.delete_placement("demo", "v1", expected_epoch=2) == 3
    assert await state.placements() == {}


async def test_the_epoch_never_goes_below_a_floor(state: SchedulerState) -> None:
    assert await state.raise_epoch(41) == 41
    assert await state.raise_epoch(7) == 41
    written = await state.write_placement(record(), expected_epoch=None, floor=100)
    assert written is not None and written.epoch == 101 and await state.epoch() == 101


async def test_concurrent_writers_one_wins(state: SchedulerState) -> None:
    await state.write_placement(record(), expected_epoch=None)
    results = await asyncio.gather(*(state.write_placement(record(worker=f"w{i}"), expected_epoch=1) for i in range(8)))
    assert sum(r is not None for r in results) == 1
    assert await state.epoch() == 2


async def test_unreachable_redis_is_unavailable() -> None:
    state = SchedulerState.from_url(f"redis://127.0.0.1:{free_port()}/0")
    with pytest.raises(Unavailable, match="cannot reach Redis"):
        await state.workers()
    await state.close()


async def test_a_read_only_redis_is_unavailable_not_internal(state: SchedulerState, redis_url: str) -> None:
    """A Redis demoted to a replica (a failover) answers writes with READONLY: retryable, like an outage."""
    import redis

    admin = redis.Redis.from_url(redis_url)
    try:
        admin.execute_command("REPLICAOF", "127.0.0.1", "1")  # nothing listens there: it stays read-only
        with pytest.raises(Unavailable, match="refuses the scheduler's writes"):
            await state.write_placement(record(), expected_epoch=None)
    finally:
        admin.execute_command("REPLICAOF", "NO", "ONE")
        admin.close()
    assert (await state.write_placement(record(), expected_epoch=None)) is not None
