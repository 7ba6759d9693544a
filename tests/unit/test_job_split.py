"""The batch-job policy (services/scheduler/job_split.py): tasks of N items over pending ranges, and the route
of the next task through the least loaded replica, with a per-worker cap and soft avoidance."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from services.scheduler.job_split import choose_task_route, split, worker_load
from services.scheduler.records import PlacedStageRecord, ReplicaRecord


def test_split_cuts_each_range_into_tasks_without_spanning_gaps() -> None:
    assert split([(0, 10)], 4) == [(0, 4), (4, 8), (8, 10)]
    assert split([(0, 3), (5, 6), (9, 20)], 5) == [(0, 3), (5, 6), (9, 14), (14, 19), (19, 20)]
    assert split([], 4) == []
    assert sum(e - s for s, e in split([(0, 10_000)], 128)) == 10_000
    with pytest.raises(ValueError, match=">= 1"):
        split([(0, 1)], 0)


def _stages() -> list[PlacedStageRecord]:
    """2 stages x 2 replicas: a and b hold layers 0-2, c and d layers 2-4."""
    return [
        PlacedStageRecord(0, 2, [ReplicaRecord("a", "h:1", True), ReplicaRecord("b", "h:2", True)]),
        PlacedStageRecord(2, 4, [ReplicaRecord("c", "h:3", True), ReplicaRecord("d", "h:4", True)]),
    ]


def _workers(hops) -> list[str]:
    return [h.worker_id for h in hops] if hops is not None else None


def test_route_goes_through_the_least_loaded_replicas() -> None:
    live = {"a", "b", "c", "d"}
    assert _workers(choose_task_route(_stages(), live, {}, 2)) == ["a", "c"]  # ties: smallest id
    load = worker_load([["a", "c"]])
    assert _workers(choose_task_route(_stages(), live, load, 2)) == ["b", "d"]
    load = worker_load([["a", "c"], ["b", "d"], ["a", "d"]])
    assert _workers(choose_task_route(_stages(), live, load, 2)) == ["b", "c"]


def test_tasks_leased_one_after_another_spread_over_the_replicas_with_a_rng() -> None:
    """Each task finished before the next is leased: every worker looks idle every time. Without a rng all
    go through a and c; with one, ties are random and every replica gets a share (20 leases, seeded)."""
    live = {"a", "b", "c", "d"}
    assert {tuple(_workers(choose_task_route(_stages(), live, {}, 2))) for _ in range(20)} == {("a", "c")}
    rng = random.Random(7)
    ran = Counter(w for _ in range(20) for w in _workers(choose_task_route(_stages(), live, {}, 2, rng=rng)))
    assert set(ran) == live and min(ran.values()) >= 2, ran
    load = worker_load([["a", "c"]])  # the least loaded replica still wins over a tie-break
    assert all(_workers(choose_task_route(_stages(), live, load, 2, rng=rng)) == ["b", "d"] for _ in range(10))


def test_route_waits_when_every_replica_of_a_stage_is_at_the_cap_or_gone() -> None:
    live = {"a", "b", "c", "d"}
    full = worker_load([["a", "c"], ["a", "d"], ["b", "c"], ["b", "d"]])
    assert choose_task_route(_stages(), live, full, 2) is None
    assert _workers(choose_task_route(_stages(), live, full, 3)) == ["a", "c"]
    assert _workers(choose_task_route(_stages(), {"b", "c"}, {}, 2)) == ["b", "c"]  # a and d are gone
    assert choose_task_route(_stages(), {"c", "d"}, {}, 2) is None  # no replica of layers 0-2
    not_ready = [PlacedStageRecord(0, 4, [ReplicaRecord("a", "h:1", False)])]
    assert choose_task_route(not_ready, {"a"}, {}, 2) is None


def test_workers_a_task_failed_on_are_avoided_unless_nothing_else_is_left() -> None:
    live = {"a", "b", "c", "d"}
    assert _workers(choose_task_route(_stages(), live, {}, 2, avoid=["a", "c"])) == ["b", "d"]
    assert _workers(choose_task_route(_stages(), {"a", "c"}, {}, 2, avoid=["a"])) == ["a", "c"]
