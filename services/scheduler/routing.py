"""Route choice: one ready replica per stage, least busy first. A pure function, no I/O."""

from __future__ import annotations

import random
from typing import Collection, Mapping, Sequence

from modelgrid.errors import Unavailable
from services.scheduler.records import PlacedStageRecord, RouteHop


def choose_route(
    stages: Sequence[PlacedStageRecord],
    sessions: Mapping[str, int],
    exclude: Collection[str] = (),
    label: str = "the model",
    rng: random.Random | None = None,
    draining: Collection[str] = (),
) -> list[RouteHop]:
    """Pick, for every stage, a ready replica on a usable worker with the fewest active sessions.

    sessions maps each live worker to its active session count; a worker missing from it is gone.
    A worker in `draining` is leaving: its replica is used only for a stage with no other usable one
    (the scheduler keeps it placed until the copy replacing it is ready). Ties go to a random replica
    when rng is given (spreads a burst of new sessions that all see the same counts), else to the
    smallest worker id. Raises Unavailable naming the stage that has no usable replica.
    """
    if not stages:
        raise Unavailable(f"{label} is not placed yet")
    excluded = set(exclude)
    hops: list[RouteHop] = []
    missing: list[PlacedStageRecord] = []
    for stage in stages:
        usable = [r for r in stage.replicas if r.ready and r.worker_id in sessions and r.worker_id not in excluded]
        usable = [r for r in usable if r.worker_id not in draining] or usable
        if not usable:
            missing.append(stage)
            continue
        fewest = min(sessions[r.worker_id] for r in usable)
        best = sorted((r for r in usable if sessions[r.worker_id] == fewest), key=lambda r: r.worker_id)
        pick = rng.choice(best) if rng is not None else best[0]
        hops.append(RouteHop(stage.start, stage.end, pick.worker_id, pick.address))
    if not missing:
        return hops

    def alive_ready(stage: PlacedStageRecord) -> bool:
        return any(r.ready and r.worker_id in sessions for r in stage.replicas)

    ready = sum(1 for s in stages if alive_ready(s))
    if ready < len(stages):
        raise Unavailable(f"{label} is loading: {ready}/{len(stages)} stages ready")
    stage = missing[0]
    names = ", ".join(sorted(excluded & {r.worker_id for r in stage.replicas}))
    raise Unavailable(
        f"{label}: no ready replica of layers [{stage.start}, {stage.end}) outside the excluded workers ({names})"
    )

