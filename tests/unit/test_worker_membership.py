"""Membership: register, heartbeat, re-register on NOT_FOUND, keep going while the scheduler is down."""

from __future__ import annotations

import asyncio

from modelgrid.errors import NotFound, Unavailable
from services.worker.membership import Membership
from services.worker.runtime import WorkerStatus

STATUS = WorkerStatus("w1", "127.0.0.1:1", "cpu", 100, 100, (), "serving", 0, 0)


class Scheduler:
    """An in-memory scheduler link whose availability the test switches."""

    def __init__(self, interval_s: float = 0.05) -> None:
        self.interval_s = interval_s
        self.up = False
        self.known: set[str] = set()
        self.calls: list[str] = []
        self.epoch = 3

    async def register(self, status: WorkerStatus) -> tuple[float, int]:
        self.calls.append("register")
        if not self.up:
            raise Unavailable("scheduler down")
        self.known.add(status.worker_id)
        return self.interval_s, self.epoch

    async def heartbeat(self, status: WorkerStatus) -> int:
        self.calls.append("heartbeat")
        if not self.up:
            raise Unavailable("scheduler down")
        if status.worker_id not in self.known:
            raise NotFound("unknown worker")
        return self.epoch


async def test_register_retry_heartbeat_and_reregister() -> None:
    scheduler, epochs = Scheduler(interval_s=0.2), []
    m = Membership(scheduler, lambda: STATUS, epochs.append, interval_s=0.01)
    for _ in range(3):  # down: every tick retries registration, nothing raises
        await m.tick()
    assert scheduler.calls == ["register"] * 3 and not m.registered and epochs == []

    scheduler.up = True
    await m.tick()
    assert m.registered and m.interval_s == 0.2 and epochs == [3]  # the scheduler's interval
    scheduler.epoch = 4
    await m.tick()
    assert scheduler.calls[-1] == "heartbeat" and epochs == [3, 4] and m.heartbeats == 1

    scheduler.up = False  # down while registered: heartbeats fail, membership stays
    await m.tick()
    assert m.registered and epochs == [3, 4]

    scheduler.up, scheduler.known = True, set()  # back, but it forgot us (fresh Redis)
    await m.tick()
    assert not m.registered and scheduler.calls[-1] == "heartbeat"
    await m.tick()
    assert m.registered and scheduler.calls[-1] == "register" and "w1" in scheduler.known


async def test_background_loop_reregisters_without_waiting_an_interval() -> None:
    scheduler, epochs = Scheduler(), []
    scheduler.up = True
    m = Membership(scheduler, lambda: STATUS, epochs.append, interval_s=0.01)
    m.start()
    try:
        async def until(cond) -> None:
            while not cond():
                await asyncio.sleep(0.005)

        await asyncio.wait_for(until(lambda: m.heartbeats >= 3), 5)
        scheduler.known.clear()
        registrations = scheduler.calls.count("register")
        await asyncio.wait_for(until(lambda: scheduler.calls.count("register") > registrations), 5)
    finally:
        await m.stop()
    assert set(epochs) == {3}


async def test_stop_ends_the_loop_even_when_poked_just_before() -> None:
    """A poke that lands with the cancel (a leaving worker does both) must not keep the loop alive."""
    scheduler = Scheduler(interval_s=0.5)
    scheduler.up = True
    for _ in range(20):  # the race depends on where the loop is: try it at several points
        m = Membership(scheduler, lambda: STATUS, lambda epoch: None, interval_s=0.5)
        m.start()
        for _ in range(3):
            await asyncio.sleep(0)
        m.poke()
        await asyncio.sleep(0)
        stopping = asyncio.ensure_future(m.stop())
        done, _ = await asyncio.wait({stopping}, timeout=2)
        assert stopping in done, "the heartbeat loop outlived stop()"
