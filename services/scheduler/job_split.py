"""Batch-job policy as pure functions (no I/O): how a job is cut into tasks, and which replica runs the next one.

Data parallel across replicas, pipeline within each: a task goes to a full route (one ready replica per
stage) whose workers hold the fewest leased tasks, and no worker takes more than `per_worker` tasks at
once, so every replica is kept busy (two tasks per worker overlap one task's hops with the next one's)
without piling work on one of them.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Collection, Iterable, Mapping, Sequence

from modelgrid.errors import Unavailable
from services.scheduler.records import PlacedStageRecord, RouteHop
from services.scheduler.routing import choose_route


def split(spans: Iterable[tuple[int, int]], task_items: int) -> list[tuple[int, int]]:
    """Cut item ranges [start, end) into tasks of at most task_items items, in order; a task never spans a gap
    (after a rebuild only the items without a result are pending)."""
    if task_items < 1:
        raise ValueError(f"task_items must be >= 1, got {task_items}")
    tasks = []
    for start, end in spans:
        for begin in range(start, end, task_items):
            tasks.append((begin, min(begin + task_items, end)))
    return tasks


def worker_load(routes: Iterable[Sequence[str]]) -> Counter[str]:
    """Leased tasks per worker, from the worker ids of every live lease's route."""
    load: Counter[str] = Counter()
    for workers in routes:
        load.update(set(workers))
    return load


def choose_task_route(
    stages: Sequence[PlacedStageRecord],
    live: Collection[str],
    load: Mapping[str, int],
    per_worker: int,
    avoid: Collection[str] = (),
    label: str = "the model",
    rng: random.Random | None = None,
) -> list[RouteHop] | None:
    """A route through ready replicas on live workers below per_worker leased tasks, least loaded first.

    Ties go to a random replica when rng is given: tasks leased one after another, each finished before
    the next (a slow machine, a single executor lane), all see every worker idle, and would otherwise all
    go to the smallest worker id, leaving the other replicas unused. Workers in `avoid` (they failed this
    task before) are used only when no route avoids them. None when every replica of some stage is busy,
    gone or not ready: the task waits.
    """
    free = {w: load.get(w, 0) for w in live if load.get(w, 0) < per_worker}
    for exclude in ([*avoid], []) if avoid else ([],):
        try:
            return choose_route(stages, free, exclude, label, rng)
        except Unavailable:
            continue
    return None
