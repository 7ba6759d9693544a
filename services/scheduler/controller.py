"""The reconcile loop: what should run (registry) vs. where it runs (Redis), closed by telling workers.

One tick, under an asyncio lock so ticks never overlap:
  1. read the registry's deployments (kept from the last good read when it is down) and Redis snapshots;
  2. drop placements of versions no longer deployed;
  3. for each deployment, call the pure `place` with the workers' memory minus what other placements use
     and the current placement as `previous`, and write the result atomically under a new epoch if the
     assignment changed;
  4. start Worker.LoadStage for every replica not ready yet (background tasks, long deadline; a replica is
     ready when its call returns OK; failures retry on a later tick with backoff);
  5. start Worker.UnloadStage for stages workers report holding that are no longer placed on them.
A monitor notices expired workers within a quarter heartbeat interval and runs a tick at once.

What workers already hold is adopted, never reloaded: placement prefers the workers that report holding a
range, and a replica whose worker reports holding it is marked ready without a LoadStage (so the epoch its
sessions run under does not move). A worker reporting "draining" keeps a ready replica in the placement
(and in routes, as the last choice) until a copy elsewhere is ready. After a start or a Redis reset the
controller resyncs (see resync.py) before changing placements.

Epochs: a placement record keeps the epoch of its last change. Instructions and routes carry the newest
epoch at the time they are issued (>= every placement's): workers fence LoadStage/UnloadStage against the
newest epoch they have heard of (heartbeat replies included), and Forward against the newest instruction
they got for the model, so a route fetched after an instruction always passes and one from before fails.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Callable, Iterable

from prometheus_client import Gauge

from modelgrid.errors import ModelGridError
from services.common.clock import now_ms
from services.scheduler.clients import RegistryClient, WorkerClients
from services.scheduler.config import SchedulerConfig
from services.scheduler.holdings import Job, adoptable, draining_copies, held_plans, previous_with_holders
from services.scheduler.metrics import HEARTBEAT_AGES
from services.scheduler.placement import PlacementPlan, WorkerCapacity, place
from services.scheduler.records import (
    LOADING,
    READY,
    UNPLACEABLE,
    Deployment,
    PlacedStageRecord,
    PlacementRecord,
    ReplicaRecord,
    WorkerRecord,
)
from services.scheduler.resync import Resync
from services.scheduler.state import SchedulerState

log = logging.getLogger(__name__)

WORKERS = Gauge("modelgrid_scheduler_workers", "Registered, live workers")
PLACEMENTS = Gauge("modelgrid_scheduler_placements", "Placements by state", ["state"])
EPOCH = Gauge("modelgrid_scheduler_epoch", "Newest placement epoch written by this scheduler")

Key = tuple[str, str]
MAX_BACKOFF_S = 60.0
RESYNC_MIN_S = 10.0


class Controller:
    """Owns the reconcile tick, the background loads/unloads and the expiry monitor."""

    def __init__(
        self,
        state: SchedulerState,
        registry: RegistryClient,
        workers: WorkerClients,
        config: SchedulerConfig,
    ) -> None:
        self.state = state
        self.registry = registry
        self.workers = workers
        self.config = config
        self.lock = asyncio.Lock()
        self.wake = asyncio.Event()
        self.deployments: dict[Key, Deployment] | None = None  # last good ListDeployments; None: never read
        self._epoch_seen = 0
        self._loading: set[Job] = set()
        self._unloading: set[Job] = set()
        self._backoff: dict[Job, tuple[int, float]] = {}  # failures, monotonic time of the next try
        self._refusals = 0  # stale-epoch refusals in a row
        self._tasks: set[asyncio.Task] = set()
        self._loops: list[asyncio.Task] = []
        self._stopping = False
        self._down: set[str] = set()  # what is failing now ("registry", "reconcile", ...), to log it once
        # long enough for workers whose channel to a restarted scheduler is in reconnect backoff
        self.resync = Resync(max(2 * config.heartbeat_ttl_s, RESYNC_MIN_S))
        self._marker_claimed = False  # this process has written the Redis marker once
        self._last_live: set[str] = set()  # worker ids registered at the last tick
        self._unloaded: dict[Job, int] = {}  # unix ms an UnloadStage returned: older reports of it are stale
        self._serving: dict[str, bool] = {}  # last state each worker reported, to react to "draining" at once
        self.closers: list[Callable[[], Awaitable[None]]] = []

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> None:
        self.wake.set()  # first tick right away
        self._loops = [
            asyncio.create_task(self._reconcile_loop(), name="scheduler-reconcile"),
            asyncio.create_task(self._monitor_loop(), name="scheduler-monitor"),
        ]

    async def stop(self) -> None:
        """Stop ticking and cancel in-flight loads (workers finish or drop them on their own)."""
        self._stopping = True
        tasks = [*self._loops, *self._tasks]
        for task in tasks:
            task.cancel()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=5)
            if pending:
                log.warning("%d scheduler task(s) did not stop within 5 s", len(pending))
        self._loops.clear()

    async def close(self) -> None:
        await self.stop()
        for close in self.closers:  # what app.py started next to the controller (the batch-job queue)
            await close()
        await self.workers.close()
        await self.registry.close()
        await self.state.close()

    def note_epoch(self, epoch: int) -> None:
        if epoch > self._epoch_seen:
            self._epoch_seen = epoch
            EPOCH.set(epoch)

    async def current_epoch(self) -> int:
        """The newest epoch: what instructions and routes carry (never below one this process saw)."""
        return self.newest_epoch(await self.state.epoch())

    def newest_epoch(self, stored: int) -> int:
        """current_epoch from an epoch the caller read from Redis itself (with other keys, in one round trip)."""
        epoch = max(stored, self._epoch_seen)
        self.note_epoch(epoch)
        return epoch

    def epoch_floor(self, workers: Iterable[WorkerRecord]) -> int:
        """No new epoch may be at or below one a worker has seen (Redis may have been flushed)."""
        return max([self._epoch_seen, *(s.epoch for w in workers for s in w.stages)])

    # -- loops ------------------------------------------------------------------------------------

    async def _reconcile_loop(self) -> None:
        while not self._stopping:
            # asyncio.wait, not wait_for: before Python 3.12 wait_for can swallow a cancellation.
            waiter = asyncio.ensure_future(self.wake.wait())
            try:
                await asyncio.wait({waiter}, timeout=self.config.reconcile_interval_s)
            finally:
                waiter.cancel()
            self.wake.clear()
            await self._guard("reconcile", self.reconcile())

    async def _monitor_loop(self) -> None:
        period = self.config.heartbeat_interval_s / 4
        while not self._stopping:
            await self._guard("expiry monitor", self._check_expired())
            await asyncio.sleep(period)

    async def check_reset(self) -> None:
        """Notice that Redis lost our state (the marker is gone) and resync; at start-up, await the members
        Redis still lists."""
        if not await self.state.claim_marker():
            if not self._marker_claimed:
                self._marker_claimed = True
                self.resync.await_also(await self.state.member_ids())
            return
        if self._marker_claimed:
            log.warning("Redis lost the scheduler's state (restarted empty or flushed): workers re-register "
                        "on their next heartbeat; placements are rebuilt from what they hold")
            self.resync.begin(self._last_live, "Redis was reset")
        self._marker_claimed = True

    async def _check_expired(self) -> None:
        await self.check_reset()
        removed = await self.state.prune_expired()
        if removed:
            log.warning(
                "worker(s) %s sent no heartbeat for %.1f s: removed; re-placing their stages",
                ", ".join(removed), self.config.heartbeat_ttl_s,
            )
            await self.reconcile(refresh_registry=False)

    async def _guard(self, what: str, work: Awaitable[object]) -> None:
        """Run one unit of background work; log a failure once (e.g. Redis down) and the recovery; never die."""
        try:
            await work
        except ModelGridError as err:
            if what not in self._down:
                log.warning("%s failed: %s (retrying)", what, err.message)
                self._down.add(what)
            return
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s failed; retrying", what)
            return
        if what in self._down:
            log.info("%s works again", what)
            self._down.discard(what)

    # -- the tick ---------------------------------------------------------------------------------

    async def reconcile(self, refresh_registry: bool = True) -> list[PlacementRecord]:
        """One reconcile tick; returns every placement after it."""
        if refresh_registry or self.deployments is None:
            await self.refresh_deployments()  # outside the lock: a slow registry must not delay re-placement
        async with self.lock:
            await self.check_reset()
            live = {w.worker_id: w for w in await self.state.workers()}
            HEARTBEAT_AGES.live(live.values())
            records = await self.state.placements()
            await self.check_reset()  # a reset while we read: what we read is not the whole truth
            floor = self.epoch_floor(live.values())
            seen = {w.worker_id: w.last_seen_ms for w in live.values()}
            resyncing = self.resync.active(seen)
            if self.deployments is not None:
                for key in sorted(k for k in records if k not in self.deployments):
                    await self._drop(records, key, floor)
                # Versions already placed first, so they keep their memory when room is short.
                for key in sorted(self.deployments, key=lambda k: (k not in records, k)):
                    dep = self.deployments[key]
                    if resyncing and self._awaits_holders(records.get(key), dep, live, seen):
                        continue
                    await self._place(dep, records, live, floor)
            await self._adopt(records, live)
            epoch = await self.current_epoch()
            self._start_loads(records, live, epoch)
            self._start_unloads(records, live, epoch)
            self._last_live = set(live) | self.resync.missing(seen)  # who to await back if Redis is reset
            WORKERS.set(len(live))
            for state in (READY, LOADING, UNPLACEABLE):
                PLACEMENTS.labels(state).set(sum(1 for r in records.values() if r.state == state))
            return [records[k] for k in sorted(records)]

    async def refresh_deployments(self) -> None:
        """Re-read what should run; on failure keep the last answer (and never drop placements)."""
        try:
            deployments = await self.registry.list_deployments()
        except ModelGridError as err:
            if "registry" not in self._down:
                log.warning("cannot list deployments (%s: %s); keeping current placements", err.code, err.message)
                self._down.add("registry")
            return
        if "registry" in self._down:
            log.info("registry at %s reachable again", self.registry.address)
            self._down.discard("registry")
        self.deployments = {d.key: d for d in deployments}

    async def _drop(self, records: dict[Key, PlacementRecord], key: Key, floor: int) -> None:
        record = records[key]
        epoch = await self.state.delete_placement(record.model, record.version, record.epoch, floor)
        if epoch is None:
            log.warning("%s changed under us while being removed (another scheduler?); next tick", record.label)
            return
        self.note_epoch(epoch)
        del records[key]
        log.info("%s is no longer deployed: placement removed (epoch %d)", record.label, epoch)

    @staticmethod
    def _capacities(
        live: dict[str, WorkerRecord], records: dict[Key, PlacementRecord], key: Key
    ) -> list[WorkerCapacity]:
        """Serving workers, with the memory placements of other versions reserve on them."""
        used: dict[str, int] = {}
        for other in records.values():
            if other.key == key:
                continue
            for stage in other.stages:
                for replica in stage.replicas:
                    used[replica.worker_id] = used.get(replica.worker_id, 0) + stage.bytes
        return [
            WorkerCapacity(w.worker_id, w.total_memory, used.get(w.worker_id, 0))
            for w in live.values() if w.serving
        ]

    def _awaits_holders(
        self, record: PlacementRecord | None, dep: Deployment, live: dict[str, WorkerRecord], seen: dict[str, int]
    ) -> bool:
        """While resyncing, leave a version alone if it lost its placement but workers hold parts of it (others
        may hold the rest and not be back yet), or if its placement names a worker awaited back."""
        if record is None or not record.stages:
            return bool(held_plans(dep, live)) or self.resync.awaits_any(seen)
        return any(self.resync.awaits(r.worker_id, seen) for s in record.stages for r in s.replicas)

    async def _place(
        self, dep: Deployment, records: dict[Key, PlacementRecord], live: dict[str, WorkerRecord], floor: int
    ) -> None:
        current = records.get(dep.key)
        label = f"model '{dep.model}' {dep.version}"
        previous = previous_with_holders(current, held_plans(dep, live))
        plan = place(
            dep.sizes,
            self._capacities(live, records, dep.key),
            replicas=dep.replicas,
            num_stages=dep.num_stages,
            kv_reserve_tokens=self.config.kv_reserve_tokens,
            previous=previous,
            label=label,
        )
        record = self._record(dep, plan, current, live)
        if current is not None and (
            record.assignment() == current.assignment()
            and record.message == current.message
            and (record.state == UNPLACEABLE) == (current.state == UNPLACEABLE)
        ):
            return
        written = await self.state.write_placement(record, None if current is None else current.epoch, floor)
        if written is None:
            log.warning("%s changed under us (another scheduler?); placing it again next tick", label)
            return
        self.note_epoch(written.epoch)
        records[dep.key] = written
        self._log_change(current, written, live)

    @staticmethod
    def _record(
        dep: Deployment, plan: PlacementPlan, current: PlacementRecord | None, live: dict[str, WorkerRecord]
    ) -> PlacementRecord:
        """The record for a plan; a replica that stays where it was keeps its readiness."""
        record = PlacementRecord(dep.model, dep.version, message=plan.message)
        before = {(s.start, s.end): s for s in current.stages} if current is not None else {}
        if not plan.placed:
            # Keep the survivors where they are (their memory stays reserved), so that when room comes back
            # the same cut is completed instead of everything loading again elsewhere.
            record.state = UNPLACEABLE
            for s in before.values():
                kept = [r for r in s.replicas if r.worker_id in live and live[r.worker_id].serving]
                record.stages.append(PlacedStageRecord(s.start, s.end, kept, s.bytes))
            return record
        for sp in plan.stages:
            old = before.get((sp.start, sp.end))
            replicas = []
            for wid in sp.worker_ids:
                address = live[wid].address
                was = old.replica(wid) if old is not None else None
                replicas.append(ReplicaRecord(wid, address, bool(was and was.ready and was.address == address)))
            replicas += draining_copies(old, replicas, live)
            record.stages.append(PlacedStageRecord(sp.start, sp.end, replicas, sp.bytes))
        record.refresh_state()
        return record

    @staticmethod
    def _log_change(current: PlacementRecord | None, record: PlacementRecord, live: dict[str, WorkerRecord]) -> None:
        old = {(s.start, s.end): [r.worker_id for r in s.replicas] for s in current.stages} if current else {}
        parts = []
        for s in record.stages:
            ids = [r.worker_id for r in s.replicas]
            before = old.get((s.start, s.end))
            if before != ids:
                was = f" (was {', '.join(before) or 'nobody'})" if before is not None else ""
                parts.append(f"[{s.start}, {s.end}) on {', '.join(ids) or 'nobody'}{was}")
        lost = sorted({w for ids in old.values() for w in ids if w not in live or not live[w].serving})
        where = "; ".join(parts) or ("stages unchanged" if record.stages else "no stages")
        text = f"{record.label} placed at epoch {record.epoch} ({record.state}): {where}"
        if record.message:
            text += f" -- {record.message}"
        if lost:
            log.warning("re-placed after losing %s: %s", ", ".join(lost), text)
        elif record.state == UNPLACEABLE:
            log.warning(text)
        else:
            log.info(text)

    # -- loads and unloads ------------------------------------------------------------------------

    def note_state(self, worker_id: str, serving: bool) -> None:
        """A heartbeat's state: a worker starting to drain is handed over at once, not at the next tick."""
        if self._serving.get(worker_id, True) and not serving:
            log.info("worker %s is draining: placing its stages elsewhere", worker_id)
            self.wake.set()
        self._serving[worker_id] = serving

    async def _adopt(self, records: dict[Key, PlacementRecord], live: dict[str, WorkerRecord]) -> None:
        """Mark ready, without a LoadStage, the replicas whose worker already holds them (holdings.py)."""
        busy = self._loading | self._unloading
        margin_ms = int(self.config.heartbeat_interval_s * 1000)
        for record in records.values():
            found = adoptable(record, live, busy, self._unloaded, margin_ms) if record.state != UNPLACEABLE else []
            for replica in found:
                replica.ready = True
            if found:
                record.refresh_state()
                if await self.state.update_placement(record):
                    log.info("%s: adopted what workers already hold, no reload: %s", record.label,
                             ", ".join(r.worker_id for r in found))

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _start_loads(self, records: dict[Key, PlacementRecord], live: dict[str, WorkerRecord], epoch: int) -> None:
        now = time.monotonic()
        for record in records.values():
            if record.state == UNPLACEABLE:
                continue
            for stage in record.stages:
                for replica in stage.replicas:
                    job = (record.model, record.version, stage.start, stage.end, replica.worker_id)
                    if replica.ready or replica.worker_id not in live or job in self._loading:
                        continue
                    if self._backoff.get(job, (0, 0.0))[1] > now:
                        continue
                    self._loading.add(job)
                    self._spawn(self._load(job, replica.address, epoch))

    async def _load(self, job: Job, address: str, epoch: int) -> None:
        model, version, start, end, worker_id = job
        try:
            log.info(
                "telling %s to load model '%s' %s layers [%d, %d) (epoch %d)",
                worker_id, model, version, start, end, epoch,
            )
            try:
                await self.workers.load_stage(address, model, version, start, end, epoch, self.config.load_timeout_s)
            except ModelGridError as err:
                failures = self._backoff.get(job, (0, 0.0))[0] + 1
                delay = min(MAX_BACKOFF_S, self.config.reconcile_interval_s * 2 ** (failures - 1))
                self._backoff[job] = (failures, time.monotonic() + delay)
                log.warning(
                    "worker %s at %s failed to load model '%s' %s layers [%d, %d) (epoch %d): %s: %s; "
                    "retrying in %.0f s",
                    worker_id, address, model, version, start, end, epoch, err.code, err.message, delay,
                )
                if err.code == "ABORTED":
                    await self._after_refusal(job, epoch)
                return
            self._backoff.pop(job, None)
            self._refusals = 0
            await self._mark_ready(job, address)
        except ModelGridError as err:
            log.warning("could not record the load of %s on %s: %s", job, worker_id, err.message)
        finally:
            self._loading.discard(job)

    async def _mark_ready(self, job: Job, address: str) -> None:
        model, version, start, end, worker_id = job
        async with self.lock:
            record = await self.state.get_placement(model, version)
            stage = record.stage_on(worker_id, start, end) if record is not None else None
            replica = stage.replica(worker_id) if stage is not None else None
            if record is None or replica is None or replica.address != address:
                log.info(
                    "%s loaded model '%s' %s [%d, %d), which is no longer placed there",
                    worker_id, model, version, start, end,
                )
                return
            if replica.ready:
                return
            replica.ready = True
            record.refresh_state()
            if not await self.state.update_placement(record):
                log.info("placement of %s changed while %s loaded; the next tick decides", record.label, worker_id)
                return
        if any(self._serving.get(r.worker_id) is False for s in record.stages for r in s.replicas):
            self.wake.set()  # the draining copy this one replaces can leave the placement now
        log.info(
            "%s loaded %s layers [%d, %d): %d/%d stages ready (%s)",
            worker_id, record.label, start, end, record.stages_ready(), len(record.stages), record.state,
        )

    async def _after_refusal(self, job: Job, refused_epoch: int) -> None:
        """A worker fenced our instruction as stale. If the epoch moved on meanwhile, retry at once with the
        newer one; if not, the worker has seen epochs Redis lost (a flush while this process was down):
        raise the epoch past the refused one, further on each refusal in a row (1, 2, 4, ...)."""
        self._backoff.pop(job, None)
        if await self.current_epoch() <= refused_epoch:
            self._refusals += 1
            epoch = await self.state.raise_epoch(refused_epoch + 2 ** min(self._refusals - 1, 30))
            self.note_epoch(epoch)
            log.info("raised the epoch to %d after a worker refused epoch %d", epoch, refused_epoch)
        self.wake.set()

    def _start_unloads(self, records: dict[Key, PlacementRecord], live: dict[str, WorkerRecord], epoch: int) -> None:
        for worker in live.values():
            if not worker.serving:
                continue  # a draining worker keeps its stages for the sessions it is finishing
            for held in worker.stages:
                key = (held.model, held.version)
                record = records.get(key)
                if record is not None:
                    if record.stage_on(worker.worker_id, held.start, held.end) is not None:
                        continue
                elif self.deployments is None or key in self.deployments:
                    continue  # unknown yet (registry never answered, or placement failed to write): leave it
                job = (held.model, held.version, held.start, held.end, worker.worker_id)
                if job in self._unloading or job in self._loading:
                    continue
                self._unloading.add(job)
                self._spawn(self._unload(job, worker.address, epoch))

    async def _unload(self, job: Job, address: str, epoch: int) -> None:
        model, version, start, end, worker_id = job
        try:
            log.info(
                "telling %s to unload model '%s' %s layers [%d, %d) (epoch %d)",
                worker_id, model, version, start, end, epoch,
            )
            await self.workers.unload_stage(address, model, version, start, end, epoch, self.config.rpc_timeout_s)
            now = now_ms()
            self._unloaded = {j: t for j, t in self._unloaded.items() if t > now - 60_000}
            self._unloaded[job] = now
        except ModelGridError as err:
            log.warning(
                "worker %s failed to unload model '%s' %s [%d, %d): %s: %s",
                worker_id, model, version, start, end, err.code, err.message,
            )
            if err.code == "ABORTED":
                await self._after_refusal(job, epoch)
        finally:
            self._unloading.discard(job)

    async def forget_unheld(self, worker: WorkerRecord) -> None:
        """A (re)registering worker is the truth about what it holds: replicas marked ready that it does
        not report are loaded again (it restarted, or Redis kept state from before)."""
        async with self.lock:
            for record in (await self.state.placements()).values():
                changed = False
                for stage in record.stages:
                    replica = stage.replica(worker.worker_id)
                    held = worker.holds(record.model, record.version, stage.start, stage.end)
                    if replica is not None and replica.ready and not held:
                        replica.ready = False
                        changed = True
                if changed:
                    record.refresh_state()
                    await self.state.update_placement(record)
                    log.info("%s no longer holds its part of %s: loading it again", worker.worker_id, record.label)
            self._backoff = {job: b for job, b in self._backoff.items() if job[4] != worker.worker_id}
        self.wake.set()
