"""The pure placement policy: coverage, replicas, memory, stage counts, messages, stability."""

from __future__ import annotations

import itertools
import random

import pytest

from services.scheduler import placement
from services.scheduler.placement import (
    ModelSizes,
    PlacementPlan,
    StagePlan,
    WorkerCapacity,
    format_bytes,
    place,
    stage_bytes,
    stage_work,
)


def sizes(n: int, layer: int = 100, embed: int = 0, head: int = 0, kv: int = 0) -> ModelSizes:
    return ModelSizes(tuple([layer] * n), embed, head, kv)


def workers(*memories: int, used: dict[int, int] | None = None) -> list[WorkerCapacity]:
    used = used or {}
    return [WorkerCapacity(f"w{i}", m, used.get(i, 0)) for i, m in enumerate(memories)]


def ranges(plan: PlacementPlan) -> list[tuple[int, int]]:
    return [(s.start, s.end) for s in plan.stages]


def check(plan: PlacementPlan, model: ModelSizes, pool: list[WorkerCapacity], replicas: int, reserve: int = 0) -> None:
    """Invariants of every placed plan."""
    assert plan.placed, plan.message
    bounds = [0]
    for s in plan.stages:
        assert s.start == bounds[-1] and s.end > s.start, ranges(plan)
        bounds.append(s.end)
    assert bounds[-1] == model.num_layers, "every layer exactly once"
    free = {w.worker_id: w.free for w in pool}
    seen: list[str] = []
    for s in plan.stages:
        assert 1 <= len(s.worker_ids) <= replicas
        assert s.bytes == stage_bytes(model, s.start, s.end, reserve)
        for wid in s.worker_ids:
            assert free[wid] >= s.bytes, f"{wid} has {free[wid]} free, stage needs {s.bytes}"
        seen.extend(s.worker_ids)
    assert len(seen) == len(set(seen)), f"a worker holds two stages or two copies: {seen}"


def test_one_stage_when_the_model_fits_one_worker() -> None:
    model, pool = sizes(4), workers(1000, 1000)
    plan = place(model, pool)
    check(plan, model, pool, 1)
    assert ranges(plan) == [(0, 4)] and plan.message == ""


def test_auto_uses_as_few_stages_as_fit_with_balanced_cuts() -> None:
    model, pool = sizes(6), workers(250, 250, 250, 250)
    plan = place(model, pool)
    check(plan, model, pool, 1)
    assert ranges(plan) == [(0, 2), (2, 4), (4, 6)]


def test_cuts_balance_bytes_not_layer_counts() -> None:
    model = ModelSizes((100, 100, 100, 300))
    pool = workers(1000, 1000)
    plan = place(model, pool, num_stages=2)
    assert ranges(plan) == [(0, 3), (3, 4)]
    assert [s.bytes for s in plan.stages] == [300, 300]


def test_cuts_balance_work_the_head_weighs_the_embeddings_do_not() -> None:
    # The throughput bench's shape: 8 layers of 100, untied embeddings and head of 520 each. Bytes balance at
    # [0,4)/[4,8) (920/920), but the last stage would read 920 bytes of weights per pass and the first 400:
    # the work-balanced cut gives the first stage 7 layers (700 of work vs 620).
    model = sizes(8, layer=100, embed=520, head=520)
    assert stage_work(model, 0, 7, 0) == 700 and stage_work(model, 7, 8, 0) == 620
    assert stage_work(model, 0, 8, 0) == 1320
    pool = workers(10_000, 10_000)
    plan = place(model, pool, num_stages=2)
    check(plan, model, pool, 1)
    assert ranges(plan) == [(0, 7), (7, 8)]
    assert [s.bytes for s in plan.stages] == [1220, 620]
    # a pass also reads its sessions' KV caches, layer by layer: with a reserve of 10 tokens of 3 bytes a
    # layer weighs 130, and [0,6)/[6,8) (780/780) is the even cut
    kv_model = sizes(8, layer=100, embed=520, head=520, kv=3)
    assert stage_work(kv_model, 0, 6, 10) == 780 and stage_work(kv_model, 6, 8, 10) == 780
    plan = place(kv_model, pool, num_stages=2, kv_reserve_tokens=10)
    check(plan, kv_model, pool, 1, 10)
    assert ranges(plan) == [(0, 6), (6, 8)]


def test_work_balance_yields_to_memory() -> None:
    # The work-balanced [0,7) needs 1220 bytes; with 1000-byte workers the next-best cut that fits is taken.
    model = sizes(8, layer=100, embed=520, head=520)
    pool = workers(1000, 1000)
    plan = place(model, pool, num_stages=2)
    check(plan, model, pool, 1)
    assert ranges(plan) == [(0, 4), (4, 8)]


def test_heuristic_cuts_try_the_work_balanced_cut_first(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(placement, "MAX_ENUMERATED_CUTS", 0)
    model = sizes(8, layer=100, embed=520, head=520)
    assert ranges(place(model, workers(10_000, 10_000), num_stages=2)) == [(0, 7), (7, 8)]
    assert ranges(place(model, workers(1000, 1000), num_stages=2)) == [(0, 4), (4, 8)]


def test_first_stage_carries_embeddings_last_carries_head_plus_kv_reserve() -> None:
    model = sizes(4, layer=100, embed=150, head=70, kv=1)
    assert stage_bytes(model, 0, 2, 10) == 150 + 200 + 20
    assert stage_bytes(model, 2, 4, 10) == 200 + 70 + 20
    assert stage_bytes(model, 0, 4, 10) == 150 + 400 + 70 + 40
    pool = workers(400, 400)
    plan = place(model, pool, kv_reserve_tokens=10)
    check(plan, model, pool, 1, 10)
    assert ranges(plan) == [(0, 2), (2, 4)]
    # Without the reserve the model (620 bytes) fits one 650-byte worker; with it (660), it does not.
    assert ranges(place(model, workers(650))) == [(0, 4)]
    assert not place(model, workers(650), kv_reserve_tokens=10).placed


def test_exact_stage_count_is_honoured_even_when_fewer_would_fit() -> None:
    model, pool = sizes(6), workers(10_000, 10_000, 10_000)
    plan = place(model, pool, num_stages=3)
    check(plan, model, pool, 1)
    assert ranges(plan) == [(0, 2), (2, 4), (4, 6)]


def test_more_stages_than_layers_is_refused() -> None:
    plan = place(sizes(2), workers(1000, 1000, 1000), num_stages=3, label="model 'demo' v1")
    assert not plan.placed
    assert plan.message == "model 'demo' v1 asks for 3 stages but has 2 layers (1..2 allowed)"


def test_more_stages_than_workers_is_refused_with_the_arithmetic() -> None:
    plan = place(sizes(8), workers(1000, 1000), num_stages=3, replicas=2, label="model")
    assert not plan.placed
    assert plan.message == "model needs 3 stages x 2 replicas = 6 workers; 2 are registered"


def test_too_few_workers_for_all_replicas_places_what_fits_and_says_so() -> None:
    model, pool = sizes(6), workers(1000, 1000, 1000, 1000)
    plan = place(model, pool, num_stages=3, replicas=2, label="model")
    check(plan, model, pool, 2)
    assert sorted(len(s.worker_ids) for s in plan.stages) == [1, 1, 2]
    assert "needs 3 stages x 2 replicas = 6 workers; 4 are registered" in plan.message
    assert "placed 1-2 of 2 replicas" in plan.message


def test_replicas_land_on_distinct_workers() -> None:
    model, pool = sizes(4), workers(500, 500, 500, 500)
    plan = place(model, pool, replicas=2)
    check(plan, model, pool, 2)
    assert ranges(plan) == [(0, 4)] and len(plan.stages[0].worker_ids) == 2 and plan.message == ""


def test_more_replicas_before_fewer_stages() -> None:
    # 1 stage x 2 copies does not fit (only one 400-byte worker); 2 stages x 2 copies does.
    model, pool = sizes(4), workers(400, 200, 200, 200)
    plan = place(model, pool, replicas=2)
    check(plan, model, pool, 2)
    assert ranges(plan) == [(0, 2), (2, 4)] and all(len(s.worker_ids) == 2 for s in plan.stages)


def test_replicas_that_do_not_fit_are_dropped_with_a_message() -> None:
    model, pool = sizes(4), workers(1000, 1000, 10)
    plan = place(model, pool, replicas=3, label="model 'demo' v1")
    check(plan, model, pool, 3)
    assert len(plan.stages[0].worker_ids) == 2
    assert plan.message.startswith("model 'demo' v1: placed 2 of 3 replicas per stage")
    assert "lack the free memory" in plan.message


def test_unplaceable_says_what_is_needed_and_what_the_largest_worker_has() -> None:
    plan = place(sizes(4, layer=1 << 30), workers(1 << 29, 1 << 29), label="model 'big' v1")
    assert not plan.placed and plan.stages == ()
    assert "model 'big' v1 does not fit" in plan.message
    assert "needs 4.0 GiB" in plan.message
    assert "largest stage needs 2.0 GiB" in plan.message
    assert "has 512.0 MiB free of 512.0 MiB" in plan.message


def test_unplaceable_when_stages_fit_singly_but_workers_are_too_few_with_room() -> None:
    plan = place(sizes(4), workers(250, 100), label="m")
    assert not plan.placed
    assert "only 1 of 2 workers have that much free" in plan.message


def test_memory_used_by_other_placements_is_respected() -> None:
    model = sizes(4)
    pool = workers(1000, 1000, 1000, used={0: 900, 1: 700})
    plan = place(model, pool)
    check(plan, model, pool, 1)
    assert plan.stages[0].worker_ids == ("w2",)
    pool = workers(1000, 1000, used={0: 900, 1: 700})  # 100 and 300 bytes free
    plan = place(model, pool)
    check(plan, model, pool, 1)
    assert [(s.start, s.end, s.worker_ids) for s in plan.stages] == [(0, 1, ("w0",)), (1, 4, ("w1",))]


def test_no_workers_and_zero_memory_workers() -> None:
    assert place(sizes(2), [], label="m").message == "m cannot be placed: no workers are registered"
    assert not place(sizes(2), workers(0, 0)).placed
    assert not place(ModelSizes(()), workers(100)).placed


def test_uneven_workers_get_uneven_cuts() -> None:
    # 1100 bytes on a 1000-byte and a 200-byte worker: only a 900/200 cut works, not the balanced 600/500.
    model, pool = sizes(11), workers(1000, 200)
    plan = place(model, pool)
    check(plan, model, pool, 1)
    assert sorted(s.bytes for s in plan.stages) == [200, 900]


def test_heuristic_cuts_for_large_models(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(placement, "MAX_ENUMERATED_CUTS", 0)
    model = sizes(40, embed=300, head=300)
    pool = workers(1500, 1500, 1500, 1500)  # 4600 bytes: needs 4 stages; balanced cut must absorb the ends
    plan = place(model, pool)
    check(plan, model, pool, 1)
    assert len(plan.stages) == 4
    pool = workers(3500, 800, 400)  # capacity-guided: a big first stage, then smaller ones
    plan = place(model, pool)
    check(plan, model, pool, 1)
    assert len(plan.stages) == 3


def test_replacement_after_a_worker_loss_keeps_the_surviving_stages() -> None:
    model = sizes(4)
    pool = workers(250, 250, 250)
    first = place(model, pool)
    check(first, model, pool, 1)
    lost = first.stages[1].worker_ids[0]
    survivors = [w for w in pool if w.worker_id != lost]
    second = place(model, survivors, previous=first.stages)
    check(second, model, survivors, 1)
    assert ranges(second) == ranges(first)
    assert second.stages[0].worker_ids == first.stages[0].worker_ids
    assert second.stages[1].worker_ids != first.stages[1].worker_ids


def test_previous_placement_is_kept_when_a_bigger_worker_joins() -> None:
    model = sizes(4)
    first = place(model, workers(250, 250))
    assert len(first.stages) == 2
    second = place(model, [*workers(250, 250), WorkerCapacity("big", 10_000)], previous=first.stages)
    assert second.stages == first.stages


def test_replica_loss_keeps_other_copies_and_refills() -> None:
    model = sizes(4)
    pool = workers(250, 250, 250, 250, 250)
    first = place(model, pool, replicas=2)
    check(first, model, pool, 2)
    gone = first.stages[0].worker_ids[0]
    rest = [w for w in pool if w.worker_id != gone]
    second = place(model, rest, replicas=2, previous=first.stages)
    check(second, model, rest, 2)
    assert second.stages[0].worker_ids[0] == first.stages[0].worker_ids[1]
    assert second.stages[1].worker_ids == first.stages[1].worker_ids
    assert all(len(s.worker_ids) == 2 for s in second.stages)


def test_previous_cut_that_no_longer_fits_is_replaced() -> None:
    model = sizes(4)
    previous = (StagePlan(0, 1, ("w0",)), StagePlan(1, 4, ("w1",)))
    plan = place(model, workers(250, 250), previous=previous)
    assert ranges(plan) == [(0, 2), (2, 4)]


def test_format_bytes() -> None:
    assert format_bytes(512) == "512 B"
    assert format_bytes(1536) == "1.5 KiB"
    assert format_bytes(3 << 30) == "3.0 GiB"


# -- property checks against brute force -------------------------------------------------------------


def _brute_force(model: ModelSizes, pool: list[WorkerCapacity], replicas: int, num_stages: int) -> tuple[int, int]:
    """(largest uniform replica count that fits, fewest stages achieving it), by trying everything."""
    n = model.num_layers
    counts = [num_stages] if num_stages else range(1, n + 1)
    for r in range(replicas, 0, -1):
        for s in counts:
            if s * r > len(pool):
                continue
            for inner in itertools.combinations(range(1, n), s - 1):
                cut = (0, *inner, n)
                demands = [stage_bytes(model, a, b, 0) for a, b in zip(cut, cut[1:]) for _ in range(r)]
                if any(
                    all(w.free >= d for w, d in zip(chosen, demands))
                    for chosen in itertools.permutations(pool, len(demands))
                ):
                    return r, s
    return 0, 0


@pytest.mark.parametrize("seed", range(6))
def test_matches_brute_force_on_small_instances(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(60):
        n = rng.randint(1, 5)
        model = ModelSizes(
            tuple(rng.randint(1, 100) for _ in range(n)), rng.choice([0, 0, 30]), rng.choice([0, 20]), 0
        )
        pool = [WorkerCapacity(f"w{i}", rng.randint(0, 300), rng.choice([0, 0, 50])) for i in range(rng.randint(0, 4))]
        replicas = rng.randint(1, 3)
        num_stages = rng.choice([0, 0, 1, 2, 3])
        plan = place(model, pool, replicas=replicas, num_stages=num_stages)
        best_r, best_s = _brute_force(model, [w for w in pool if w.total_memory > 0], replicas, num_stages)
        if best_r == 0:
            assert not plan.placed, (model, pool, plan)
            assert plan.message
            continue
        check(plan, model, pool, replicas)
        assert min(len(s.worker_ids) for s in plan.stages) == best_r, (model, pool, plan)
        assert len(plan.stages) == best_s, (model, pool, plan)
        assert (plan.message == "") == (best_r == replicas and all(len(s.worker_ids) == replicas for s in plan.stages))


@pytest.mark.parametrize("seed", range(4))
def test_invariants_on_random_larger_instances(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(100 + seed)
    if seed % 2:
        monkeypatch.setattr(placement, "MAX_ENUMERATED_CUTS", 0)  # exercise the heuristic cuts
    for _ in range(40):
        n = rng.randint(1, 48)
        model = ModelSizes(
            tuple(rng.randint(50, 150) for _ in range(n)), rng.randint(0, 500), rng.randint(0, 500), rng.randint(0, 2)
        )
        pool = [WorkerCapacity(f"w{i}", rng.randint(200, 4000), rng.randint(0, 300)) for i in range(rng.randint(1, 12))]
        replicas, reserve = rng.randint(1, 3), rng.choice([0, 16])
        num_stages = rng.choice([0, 0, 0, rng.randint(1, n)])
        plan = place(model, pool, replicas=replicas, num_stages=num_stages, kv_reserve_tokens=reserve)
        if plan.placed:
            check(plan, model, pool, replicas, reserve)
            if num_stages:
                assert len(plan.stages) == num_stages
            # Stability: placing again with the plan as previous changes nothing.
            again = place(
                model, pool, replicas=replicas, num_stages=num_stages, kv_reserve_tokens=reserve, previous=plan.stages
            )
            assert again.stages == plan.stages
        else:
            assert plan.message
