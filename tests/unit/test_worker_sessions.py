"""Session store: keyed by (session, stage), idle eviction by last use, counts and bytes."""

from __future__ import annotations

from dataclasses import dataclass

from services.worker.sessions import SessionStore, StageKey

A = StageKey("llama", "v1", 0, 2)
B = StageKey("llama", "v1", 2, 4)


@dataclass
class FakeCache:
    nbytes: int


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_idle_sessions_are_evicted_and_used_ones_kept() -> None:
    clock = Clock()
    store = SessionStore(clock)
    store.put("s1", A, FakeCache(100))
    store.put("s1", B, FakeCache(50))
    store.put("s2", A, FakeCache(10))
    assert store.active_sessions() == 2 and len(store) == 3 and store.kv_bytes() == 160
    clock.now += 200
    assert store.get("s2", A) is not None  # a step on s2 refreshes it
    clock.now += 150
    evicted = store.evict_idle(300)
    assert sorted((s.session_id, s.stage) for s in evicted) == [("s1", A), ("s1", B)]
    assert store.active_sessions() == 1 and store.kv_bytes() == 10
    assert store.evict_idle(300) == []
    clock.now += 300
    assert [s.session_id for s in store.evict_idle(300)] == ["s2"]
    assert len(store) == 0 and store.kv_bytes() == 0


def test_drop_one_stage_all_stages_and_a_whole_stage() -> None:
    store = SessionStore(Clock())
    for sid in ("s1", "s2"):
        store.put(sid, A, FakeCache(1))
        store.put(sid, B, FakeCache(1))
    assert store.drop("s1", A) == 1
    assert store.known("s1") and store.get("s1", A) is None and store.get("s1", B) is not None
    assert store.drop("s1") == 1 and not store.known("s1")
    assert store.drop("s1") == 0  # idempotent
    assert store.drop_stage(B) == 1
    assert store.active_sessions() == 1 and store.get("s2", A) is not None
