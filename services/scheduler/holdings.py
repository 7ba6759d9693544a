"""What workers already hold, and who is leaving: pure helpers of the controller (no I/O).

Workers report the stages they hold in every heartbeat. Placement keeps those holders (rather than
loading a range elsewhere), a replica whose worker already holds it is ready without a LoadStage
(adopted: after a Redis reset, or when a scale-up lands on a worker that kept its copy), and a draining
worker's ready copy stays placed until another copy of its range is ready.
"""

from __future__ import annotations

from typing import Collection, Mapping

from services.scheduler.placement import StagePlan
from services.scheduler.records import Deployment, PlacedStageRecord, PlacementRecord, ReplicaRecord, WorkerRecord

Job = tuple[str, str, int, int, str]  # model, version, start, end, worker id


def held_plans(dep: Deployment, live: Mapping[str, WorkerRecord]) -> list[StagePlan]:
    """What workers report holding of a version: the previous placement after Redis lost it."""
    holders: dict[tuple[int, int], list[str]] = {}
    for worker in live.values():
        for s in worker.stages:
            if (s.model, s.version) == dep.key:
                holders.setdefault((s.start, s.end), []).append(worker.worker_id)
    return [StagePlan(a, b, tuple(sorted(ids))) for (a, b), ids in sorted(holders.items())]


def previous_with_holders(current: PlacementRecord | None, held: list[StagePlan]) -> list[StagePlan]:
    """The current placement, each range's holders followed by other workers that report holding it
    (placement keeps them rather than loading the range elsewhere); what is held when there is none."""
    if current is None or not current.stages:
        return held
    holders = {(h.start, h.end): h.worker_ids for h in held}
    out = []
    for plan in current.plans():
        extra = tuple(w for w in holders.get((plan.start, plan.end), ()) if w not in plan.worker_ids)
        out.append(StagePlan(plan.start, plan.end, plan.worker_ids + extra, plan.bytes))
    return out


def draining_copies(
    old: PlacedStageRecord | None, replicas: list[ReplicaRecord], live: Mapping[str, WorkerRecord]
) -> list[ReplicaRecord]:
    """Ready copies on draining workers that a stage keeps: all of them while none of `replicas` (its new
    copies) is ready; routes use them only as the last choice."""
    if old is None or any(r.ready for r in replicas):
        return []
    placed = {r.worker_id for r in replicas}
    return [
        ReplicaRecord(r.worker_id, r.address, True) for r in old.replicas
        if r.ready and r.worker_id not in placed and r.worker_id in live and not live[r.worker_id].serving
    ]


def adoptable(
    record: PlacementRecord,
    live: Mapping[str, WorkerRecord],
    busy: Collection[Job],
    unloaded_ms: Mapping[Job, int],
    margin_ms: int,
) -> list[ReplicaRecord]:
    """Replicas not ready whose worker reports holding their range: ready without a LoadStage. Not those
    with a load or unload in flight (`busy`), nor when the worker's report may predate an unload that
    returned at `unloaded_ms` (plus margin_ms, a heartbeat interval)."""
    found = []
    for stage in record.stages:
        for replica in stage.replicas:
            worker = live.get(replica.worker_id)
            job = (record.model, record.version, stage.start, stage.end, replica.worker_id)
            if (
                not replica.ready and worker is not None and worker.address == replica.address
                and worker.holds(record.model, record.version, stage.start, stage.end)
                and job not in busy and worker.last_seen_ms > unloaded_ms.get(job, 0) + margin_ms
            ):
                found.append(replica)
    return found
