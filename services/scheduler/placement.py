"""Placement policy: which contiguous layer ranges go on which workers. Pure functions, no I/O.

A model version is cut into stages [start, end) that cover every layer exactly once; each stage gets
`replicas` copies on distinct workers (a worker holds at most one stage of a version). A stage costs its
layers' weights, the embeddings when it is first, the head when it is last, and a KV-cache reserve of
`kv_bytes_per_token_per_layer * layers * kv_reserve_tokens`; it must fit the worker's free memory (its total
minus what OTHER placements already use there).

Search order: full replication before fewer replicas, then as few stages as possible; for each stage count
the previous cut first (so a re-placement keeps surviving replicas where they are), then the cuts whose
stages do the most even work, then the most even in bytes. A stage's work is what a forward pass reads:
its layers' weights and KV caches (the reserve stands for them), plus the LM head when it is last. The
embeddings weigh in memory but not in work (a lookup reads one row per token), so the first stage takes
more layers than the last: a pipeline runs at the pace of its slowest stage. Small models try every cut (exact); large ones try the work-balanced cut,
the byte-balanced cut and two capacity-guided cuts.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Iterable, Sequence

# Up to this many cuts per stage count the search enumerates them all (exact); above it, heuristics.
MAX_ENUMERATED_CUTS = 512


@dataclass(frozen=True)
class ModelSizes:
    """Byte sizes of one model version, as the registry recorded them."""

    layer_bytes: tuple[int, ...]  # parameter bytes of each transformer layer
    embed_bytes: int = 0  # extra bytes of the first stage (embeddings)
    head_bytes: int = 0  # extra bytes of the last stage (final norm + LM head, or pooling)
    kv_bytes_per_token_per_layer: int = 0  # KV cache of one token in one layer (0 for encoders)
    shared_bytes: int = 0  # counted in both embed and head (tied embeddings): a single stage loads it once

    @property
    def num_layers(self) -> int:
        return len(self.layer_bytes)


@dataclass(frozen=True)
class WorkerCapacity:
    """A worker that may receive stages: its memory and what other placements already use of it."""

    worker_id: str
    total_memory: int
    used_memory: int = 0  # bytes reserved on it by placements of OTHER model versions

    @property
    def free(self) -> int:
        return self.total_memory - self.used_memory


@dataclass(frozen=True)
class StagePlan:
    """One stage: layers [start, end) and the workers holding a copy (the first ones kept from before)."""

    start: int
    end: int
    worker_ids: tuple[str, ...]
    bytes: int = 0  # memory one copy needs: weights + extras + KV reserve


@dataclass(frozen=True)
class PlacementPlan:
    """The outcome of `place`: stages (empty when nothing fits) and a message for operators."""

    stages: tuple[StagePlan, ...]
    message: str = ""

    @property
    def placed(self) -> bool:
        return bool(self.stages)


def format_bytes(n: int) -> str:
    """1536 -> '1.5 KiB'; readable sizes for messages."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


class _Cost:
    """stage_bytes over prefix sums, so a stage's cost is O(1); with work=True, the stage's work instead
    (the bytes a forward pass reads: layers and their KV reserve, and the head when last; no embeddings)."""

    def __init__(self, sizes: ModelSizes, kv_reserve_tokens: int, work: bool = False) -> None:
        per_layer_kv = sizes.kv_bytes_per_token_per_layer * kv_reserve_tokens
        self.n = sizes.num_layers
        self.sizes = sizes
        self.work = work
        self.kv_reserve_tokens = kv_reserve_tokens
        self.prefix = [0, *itertools.accumulate(b + per_layer_kv for b in sizes.layer_bytes)]

    def __call__(self, start: int, end: int) -> int:
        total = self.prefix[end] - self.prefix[start]
        if start == 0 and not self.work:
            total += self.sizes.embed_bytes
        if end == self.n:
            total += self.sizes.head_bytes
        if start == 0 and end == self.n and not self.work:
            total -= self.sizes.shared_bytes
        return total

    def demands(self, cut: Sequence[int]) -> list[int]:
        return [self(a, b) for a, b in zip(cut, cut[1:])]

    def work_cost(self) -> "_Cost":
        return _Cost(self.sizes, self.kv_reserve_tokens, work=True)


def stage_work(sizes: ModelSizes, start: int, end: int, kv_reserve_tokens: int) -> int:
    """Bytes a forward pass of layers [start, end) reads (weights, KV reserve, no embeddings): what placement
    balances."""
    return _Cost(sizes, kv_reserve_tokens, work=True)(start, end)


def stage_bytes(sizes: ModelSizes, start: int, end: int, kv_reserve_tokens: int) -> int:
    """Memory one copy of layers [start, end) needs: weights, embeddings/head at the ends, KV reserve."""
    return _Cost(sizes, kv_reserve_tokens)(start, end)


def place(
    sizes: ModelSizes,
    workers: Sequence[WorkerCapacity],
    *,
    replicas: int = 1,
    num_stages: int = 0,
    kv_reserve_tokens: int = 0,
    previous: Sequence[StagePlan] = (),
    label: str = "the model",
) -> PlacementPlan:
    """Place a model version on workers; see the module docstring for the policy.

    `previous` is the version's current placement (its workers may have gone); `label` names the version
    in messages ("model 'demo' v1"). Never raises for an impossible request: the plan has no stages and
    its message says why.
    """
    n = sizes.num_layers
    want = max(1, replicas)
    pool = sorted((w for w in workers if w.total_memory > 0), key=lambda w: w.worker_id)
    count = len(pool)
    if n == 0:
        return PlacementPlan((), f"{label} has no layers to place")
    if num_stages < 0 or num_stages > n:
        return PlacementPlan((), f"{label} asks for {num_stages} stages but has {n} layers (1..{n} allowed)")
    if count == 0:
        return PlacementPlan((), f"{label} cannot be placed: no workers are registered")
    if num_stages > count:
        return PlacementPlan((), f"{label} needs {_workers_needed(num_stages, want)}; {count} are registered")

    cost = _Cost(sizes, kv_reserve_tokens)
    stage_counts = [num_stages] if num_stages else list(range(1, min(n, count) + 1))
    prev_cut, keep = _previous(previous, n)
    cut_cache: dict[int, list[tuple[int, ...]]] = {}
    for r in range(want, 0, -1):
        if prev_cut is not None and len(prev_cut) - 1 in stage_counts and (len(prev_cut) - 1) * r <= count:
            stages = _try_cut(cost, prev_cut, r, pool, keep, want)
            if stages is not None:
                return _finish(stages, want, count, label)
        for s in stage_counts:
            if s * r > count:
                break
            for cut in _candidate_cuts(cost, s, r, pool, cut_cache):
                stages = _try_cut(cost, cut, r, pool, keep, want)
                if stages is not None:
                    return _finish(stages, want, count, label)
    return PlacementPlan((), _unplaceable_message(cost, pool, num_stages or min(n, count), kv_reserve_tokens, label))


def _workers_needed(stages: int, replicas: int) -> str:
    return f"{stages} stages x {replicas} replicas = {stages * replicas} workers"


def _previous(
    previous: Sequence[StagePlan], n: int
) -> tuple[tuple[int, ...] | None, dict[tuple[int, int], tuple[str, ...]]]:
    """The previous cut when it still covers [0, n) contiguously, and who held each range."""
    keep = {(s.start, s.end): tuple(s.worker_ids) for s in previous}
    ordered = sorted(previous, key=lambda s: s.start)
    bounds = [0]
    for s in ordered:
        if s.start != bounds[-1] or s.end <= s.start:
            return None, keep
        bounds.append(s.end)
    if len(bounds) < 2 or bounds[-1] != n:
        return None, keep
    return tuple(bounds), keep


def _candidate_cuts(
    cost: _Cost, s: int, r: int, pool: Sequence[WorkerCapacity], cache: dict[int, list[tuple[int, ...]]]
) -> list[tuple[int, ...]]:
    """Cuts into s stages worth trying: the most even work first, then the most even bytes."""
    n = cost.n
    work = cost.work_cost()
    if math.comb(n - 1, s - 1) <= MAX_ENUMERATED_CUTS:
        if s not in cache:
            cuts = [(0, *inner, n) for inner in itertools.combinations(range(1, n), s - 1)]
            cuts.sort(key=lambda c: (max(work.demands(c)), max(cost.demands(c)), c))
            cache[s] = cuts
        return cache[s]
    frees = sorted((w.free for w in pool), reverse=True)
    caps = [frees[g * r + r - 1] for g in range(s)]  # the smallest worker of each group of r
    out: list[tuple[int, ...]] = []
    cuts = (_balanced_cut(work, s), _balanced_cut(cost, s), _greedy_cut(cost, caps), _greedy_cut(cost, caps[::-1]))
    for cut in cuts:
        if cut is not None and cut not in out:
            out.append(cut)
    return out


def _greedy_cut(cost: _Cost, caps: Sequence[int]) -> tuple[int, ...] | None:
    """Cut into len(caps) stages, stage k no larger than caps[k], each stage as long as it can be.

    Extending a stage only grows its cost, so taking the furthest end at each step reaches at least as
    far as any other cut; each stage leaves one layer for every stage after it.
    """
    n, s = cost.n, len(caps)
    bounds, start = [0], 0
    for k, cap in enumerate(caps):
        if k == s - 1:
            end = n
            if cost(start, end) > cap:
                return None
        else:
            end = start
            while end + 1 <= n - (s - k - 1) and cost(start, end + 1) <= cap:
                end += 1
            if end == start:
                return None
        bounds.append(end)
        start = end
    return tuple(bounds)


def _balanced_cut(cost: _Cost, s: int) -> tuple[int, ...]:
    """The cut into s stages with the smallest largest stage by `cost` (binary search on the cap)."""
    lo, hi = 0, cost(0, cost.n)
    best = _greedy_cut(cost, [hi] * s)
    assert best is not None
    while lo < hi:
        mid = (lo + hi) // 2
        cut = _greedy_cut(cost, [mid] * s)
        if cut is None:
            lo = mid + 1
        else:
            hi, best = mid, cut
    return best


def _try_cut(
    cost: _Cost,
    cut: tuple[int, ...],
    r: int,
    pool: Sequence[WorkerCapacity],
    keep: dict[tuple[int, int], tuple[str, ...]],
    want: int,
) -> list[StagePlan] | None:
    """Stages of this cut with r copies each (more, up to want, where room is left), or None."""
    ranges = list(zip(cut, cut[1:]))
    demands = cost.demands(cut)
    kept = [keep.get(rng, ()) for rng in ranges]
    assigned = _assign(demands, r, pool, kept) or _assign(demands, r, pool, [()] * len(ranges))
    if assigned is None:
        return None
    _add_extra_replicas(assigned, demands, want, pool, kept)
    return [StagePlan(a, b, tuple(ids), d) for (a, b), ids, d in zip(ranges, assigned, demands)]


def _assign(
    demands: Sequence[int], r: int, pool: Sequence[WorkerCapacity], kept: Sequence[Iterable[str]]
) -> list[list[str]] | None:
    """r distinct workers per stage, no worker twice, each fitting its stage; kept holders first.

    Without kept holders this is exact: with one slot per worker and "fits" a threshold, matching the
    largest demands to the largest workers succeeds whenever any matching does.
    """
    free = {w.worker_id: w.free for w in pool}
    taken: set[str] = set()
    result: list[list[str]] = [[] for _ in demands]
    for i, holders in enumerate(kept):
        for wid in holders:
            if len(result[i]) < r and wid in free and wid not in taken and free[wid] >= demands[i]:
                result[i].append(wid)
                taken.add(wid)
    slots = sorted(((demands[i], i) for i in range(len(demands)) for _ in range(r - len(result[i]))), reverse=True)
    spare = sorted((wid for wid in free if wid not in taken), key=lambda wid: (-free[wid], wid))
    if len(slots) > len(spare):
        return None
    for (demand, i), wid in zip(slots, spare):
        if free[wid] < demand:
            return None
        result[i].append(wid)
    return result


def _add_extra_replicas(
    assigned: list[list[str]],
    demands: Sequence[int],
    want: int,
    pool: Sequence[WorkerCapacity],
    kept: Sequence[Sequence[str]],
) -> None:
    """Give stages more copies (round robin, previous holders first) while unused workers fit them."""
    free = {w.worker_id: w.free for w in pool}
    used = {wid for ids in assigned for wid in ids}
    spare = sorted((wid for wid in free if wid not in used), key=lambda wid: (-free[wid], wid))
    progress = True
    while progress:
        progress = False
        for i in sorted(range(len(assigned)), key=lambda i: (len(assigned[i]), -demands[i])):
            if len(assigned[i]) >= want:
                continue
            fitting = [wid for wid in spare if free[wid] >= demands[i]]
            preferred = [wid for wid in kept[i] if wid in fitting] or fitting
            if preferred:
                assigned[i].append(preferred[0])
                spare.remove(preferred[0])
                progress = True


def _finish(stages: list[StagePlan], want: int, count: int, label: str) -> PlacementPlan:
    copies = [len(s.worker_ids) for s in stages]
    if min(copies) >= want:
        return PlacementPlan(tuple(stages))
    placed = str(min(copies)) if min(copies) == max(copies) else f"{min(copies)}-{max(copies)}"
    s = len(stages)
    if s * want > count:
        reason = f"it needs {_workers_needed(s, want)}; {count} are registered"
    else:
        reason = "the other workers lack the free memory for more copies"
    return PlacementPlan(tuple(stages), f"{label}: placed {placed} of {want} replicas per stage ({reason})")


def _unplaceable_message(
    cost: _Cost, pool: Sequence[WorkerCapacity], stages: int, kv_reserve_tokens: int, label: str
) -> str:
    """Say how much memory the model needs and how much the workers have."""
    whole = cost(0, cost.n)
    largest = max(pool, key=lambda w: (w.free, w.worker_id))
    need = max(cost.demands(_balanced_cut(cost, stages)))
    head = f"{label} does not fit: it needs {format_bytes(whole)} (weights + KV reserve for {kv_reserve_tokens} tokens)"
    if need > largest.free:
        return (
            f"{head}; split into {stages} stage(s) its largest stage needs {format_bytes(need)}, but the largest "
            f"worker ({largest.worker_id}) has {format_bytes(largest.free)} free "
            f"of {format_bytes(largest.total_memory)}"
        )
    roomy = sum(1 for w in pool if w.free >= need)
    return (
        f"{head}; split into {stages} stages each needs up to {format_bytes(need)} on its own worker, but only "
        f"{roomy} of {len(pool)} workers have that much free (largest: {format_bytes(largest.free)})"
    )
