"""What workers hold and who is leaving (services/scheduler/holdings.py): pure helpers, plain records."""

from __future__ import annotations

from services.scheduler.holdings import adoptable, draining_copies, held_plans, previous_with_holders
from services.scheduler.placement import ModelSizes, StagePlan
from services.scheduler.records import (
    Deployment,
    LoadedStageRecord,
    PlacedStageRecord,
    PlacementRecord,
    ReplicaRecord,
    WorkerRecord,
)

DEP = Deployment("m", "v1", ModelSizes((1, 1, 1, 1)))


def worker(wid: str, *ranges: tuple[int, int], state: str = "serving", seen: int = 10_000) -> WorkerRecord:
    stages = [LoadedStageRecord("m", "v1", a, b) for a, b in ranges]
    return WorkerRecord(wid, f"{wid}:1", stages=stages, state=state, last_seen_ms=seen)


def record(*stages: tuple[int, int, list[tuple[str, bool]]]) -> PlacementRecord:
    return PlacementRecord("m", "v1", 3, [
        PlacedStageRecord(a, b, [ReplicaRecord(w, f"{w}:1", ready) for w, ready in replicas])
        for a, b, replicas in stages
    ])


def test_held_stages_become_the_previous_placement_and_extend_the_current_one() -> None:
    live = {"a": worker("a", (0, 2)), "b": worker("b", (2, 4)), "c": worker("c", (0, 2))}
    held = held_plans(DEP, live)
    assert held == [StagePlan(0, 2, ("a", "c")), StagePlan(2, 4, ("b",))]
    assert previous_with_holders(None, held) == held
    current = record((0, 2, [("c", True)]), (2, 4, [("d", True)]))
    assert [p.worker_ids for p in previous_with_holders(current, held)] == [("c", "a"), ("d", "b")]


def test_a_draining_copy_stays_until_a_new_one_is_ready() -> None:
    old = record((2, 4, [("d", True)])).stages[0]
    live = {"d": worker("d", (2, 4), state="draining"), "s": worker("s")}
    loading = [ReplicaRecord("s", "s:1", False)]
    assert [(r.worker_id, r.ready) for r in draining_copies(old, loading, live)] == [("d", True)]
    assert draining_copies(old, [ReplicaRecord("s", "s:1", True)], live) == []
    live["d"].state = "serving"  # not leaving: placement decides about it as about any other worker
    assert draining_copies(old, loading, live) == []
    assert draining_copies(old, loading, {"s": live["s"]}) == []  # gone: nothing to keep


def test_replicas_held_already_are_adopted_unless_a_report_may_be_stale() -> None:
    rec = record((0, 2, [("a", False), ("c", False)]), (2, 4, [("b", False), ("e", True)]))
    live = {"a": worker("a", (0, 2)), "b": worker("b", (2, 4)), "c": worker("c")}
    assert [r.worker_id for r in adoptable(rec, live, set(), {}, 500)] == ["a", "b"]  # c holds nothing
    assert [r.worker_id for r in adoptable(rec, live, {("m", "v1", 0, 2, "a")}, {}, 500)] == ["b"]  # a loading
    # b's last report came before its unload of [2, 4) returned (+ a heartbeat): it may not hold it now
    assert [r.worker_id for r in adoptable(rec, live, set(), {("m", "v1", 2, 4, "b"): 9_600}, 500)] == ["a"]
    live["a"].address = "a:2"  # restarted elsewhere: not the replica placed
    assert [r.worker_id for r in adoptable(rec, live, set(), {}, 500)] == ["b"]
