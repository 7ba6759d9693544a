"""Resync: how long the scheduler leaves placements alone after a start or a Redis reset."""

from __future__ import annotations

from services.scheduler.resync import Resync


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def ms(self) -> int:
        return int(self.now * 1000)


def test_start_up_waits_the_window_unless_the_known_members_are_back() -> None:
    clock = Clock()
    resync = Resync(6.0, clock, clock.ms)
    assert resync.active({"w1": clock.ms()}) and not resync.awaits_any({})  # nobody awaited: fresh Redis
    clock.now += 6.0
    assert not resync.active({})

    resync = Resync(6.0, clock, clock.ms)
    resync.await_also(["w1", "w2"])  # members Redis still lists from before the restart
    clock.now += 1.0
    old = clock.ms() - 2000  # a key that outlived the restart: not back until it heartbeats again
    assert resync.missing({"w1": clock.ms(), "w2": old}) == {"w2"}
    assert resync.awaits("w2", {"w1": clock.ms()}) and not resync.awaits("w1", {"w1": clock.ms()})
    assert resync.active({"w1": clock.ms(), "w2": old})
    assert not resync.active({"w1": clock.ms(), "w2": clock.ms(), "w3": 0})  # all awaited back: over at once
    assert resync.missing({}) == set() and not resync.awaits("w2", {})


def test_a_reset_restarts_the_window_for_the_workers_known_before() -> None:
    clock = Clock()
    resync = Resync(4.0, clock, clock.ms)
    clock.now += 5.0
    assert not resync.active({})
    resync.begin({"a", "b"}, "Redis was reset")
    back = {"a": clock.ms()}
    assert resync.active(back) and resync.awaits_any(back)
    clock.now += 3.9
    assert resync.active(back)
    clock.now += 0.2
    assert not resync.active(back) and not resync.awaits_any(back)  # b is gone for good
    resync.await_also(["c"])  # outside a window: nothing to await
    assert not resync.active({})
