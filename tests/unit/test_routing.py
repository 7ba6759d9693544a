"""The pure route choice: ready replicas only, fewest sessions first, exclusions, clear refusals."""

from __future__ import annotations

import random

import pytest

from modelgrid.errors import Unavailable
from services.scheduler.records import PlacedStageRecord, ReplicaRecord
from services.scheduler.routing import choose_route


def stage(start: int, end: int, *replicas: tuple[str, bool]) -> PlacedStageRecord:
    return PlacedStageRecord(start, end, [ReplicaRecord(w, f"{w}:1", ready) for w, ready in replicas])


STAGES = [stage(0, 2, ("a", True), ("b", True)), stage(2, 4, ("c", True), ("d", True))]


def test_one_hop_per_stage_in_order_fewest_sessions_first() -> None:
    hops = choose_route(STAGES, {"a": 3, "b": 1, "c": 0, "d": 2})
    assert [(h.start, h.end, h.worker_id, h.address) for h in hops] == [(0, 2, "b", "b:1"), (2, 4, "c", "c:1")]


def test_ties_are_deterministic_without_rng_and_spread_with_one() -> None:
    sessions = {"a": 0, "b": 0, "c": 0, "d": 0}
    assert [h.worker_id for h in choose_route(STAGES, sessions)] == ["a", "c"]
    rng = random.Random(0)
    picks = {choose_route(STAGES, sessions, rng=rng)[0].worker_id for _ in range(50)}
    assert picks == {"a", "b"}


def test_excluded_and_gone_workers_are_skipped() -> None:
    hops = choose_route(STAGES, {"a": 0, "b": 9, "c": 0, "d": 9}, exclude=["a"])
    assert [h.worker_id for h in hops] == ["b", "c"]
    hops = choose_route(STAGES, {"b": 9, "d": 9})  # a and c are gone (expired or draining)
    assert [h.worker_id for h in hops] == ["b", "d"]


def test_replicas_still_loading_are_not_routed_and_the_message_counts_ready_stages() -> None:
    stages = [stage(0, 2, ("a", True)), stage(2, 4, ("c", False))]
    with pytest.raises(Unavailable) as err:
        choose_route(stages, {"a": 0, "c": 0}, label="model 'demo' v1")
    assert err.value.message == "model 'demo' v1 is loading: 1/2 stages ready"


def test_every_replica_excluded_names_the_stage_and_workers() -> None:
    with pytest.raises(Unavailable) as err:
        choose_route(STAGES, {"a": 0, "b": 0, "c": 0, "d": 0}, exclude=["c", "d"], label="model 'demo' v1")
    assert err.value.message == (
        "model 'demo' v1: no ready replica of layers [2, 4) outside the excluded workers (c, d)"
    )


def test_no_stages_means_not_placed() -> None:
    with pytest.raises(Unavailable, match="not placed yet"):
        choose_route([], {}, label="m")


def test_a_draining_replica_is_the_last_choice() -> None:
    sessions = {"a": 5, "b": 0, "c": 0, "d": 0}
    hops = choose_route(STAGES, sessions, draining=["b", "c"])
    assert [h.worker_id for h in hops] == ["a", "d"]  # busier, but not leaving
    leaving_alone = [stage(0, 2, ("a", False), ("b", True)), stage(2, 4, ("c", True))]
    hops = choose_route(leaving_alone, sessions, draining=["b"])
    assert [h.worker_id for h in hops] == ["b", "c"]  # its replacement is still loading: b serves meanwhile
