"""WorkerRuntime: the stages loaded on this worker's device, placement epochs, memory, and Forward.

All forward passes run in ONE dedicated torch thread under torch.inference_mode, off the event loop,
so heartbeats, health checks and CloseSession stay responsive while a pass runs; and since there is
one thread, steps never race on a cache. Loading a stage's weights has a thread of its own, so it
does not stall the passes of the stages already loaded. The event loop does the I/O: it parses
requests, admits new sessions' KV caches (admission.py, which may wait) and queues their steps per
stage; the torch thread runs one pass of a stage's queued steps at a time (batching.py: continuous
batching with chunked prefill), so the steps of many sessions share each pass and passes of different
stages on this worker take turns.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Protocol, Sequence, TypeVar

import torch

from modelgrid.errors import (
    Aborted, FailedPrecondition, InvalidArgument, ModelGridError, ResourceExhausted, Unavailable,
)
from modelgrid.model.checkpoint import meta_stage, stage_tensor_names
from modelgrid.model.errors import ModelFormatError
from modelgrid.model.spec import ModelSpec
from modelgrid.model.stage import load_stage
from services.worker.admission import KVAdmission
from services.worker.batching import BatchLimits, BatchStats, Pending, fair_share, heads, pipeline_depth
from services.worker.device import device_free_memory
from services.worker.sessions import SessionStore, StageKey
from services.worker.shard_cache import CONFIG_FILE, DataLoss, ShardCache, VersionInfo, check_names
from services.worker.steps import (
    DecoderStep, EncoderStep, StepContext, StepResult, run_encoder_step, run_pass, session_kv_bytes, session_tokens,
)

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class Stage:
    """A stage held in memory."""

    key: StageKey
    module: Any  # modelgrid.model.DecoderStage | EncoderStage
    spec: ModelSpec
    param_bytes: int
    epoch: int

    def status(self) -> "StageStatus":
        k = self.key
        return StageStatus(k.model, k.version, k.start, k.end, self.param_bytes, self.epoch)


@dataclass(frozen=True)
class StageStatus:
    model: str
    version: str
    start: int
    end: int
    param_bytes: int
    epoch: int


@dataclass(frozen=True)
class WorkerStatus:
    worker_id: str
    address: str
    device: str
    total_memory: int
    free_memory: int
    stages: tuple[StageStatus, ...]
    state: str  # "serving" | "draining"
    active_sessions: int
    kv_cache_bytes: int


class VersionSource(Protocol):
    """What LoadStage needs from the registry besides tensors (services.worker.clients.RegistryClient)."""

    async def resolve(self, model: str, version: str) -> VersionInfo: ...


class WorkerRuntime:
    def __init__(
        self,
        device: torch.device,
        total_memory: int,
        cache: ShardCache,
        registry: VersionSource,
        sessions: SessionStore | None = None,
        *,
        kv_budget: int = 0,
        admission_timeout_s: float = 5.0,
        limits: BatchLimits = BatchLimits(),
    ) -> None:
        self.device = device
        self.total_memory = total_memory
        self.cache = cache
        self.registry = registry
        self.sessions = sessions or SessionStore()
        self.kv_budget = kv_budget  # bytes; 0 = what the weights leave of total_memory
        self.admission = KVAdmission(self.sessions, self.kv_limit, admission_timeout_s, lambda: self.worker_id)
        self.sessions.on_release = self.admission.wake
        self.limits = limits
        self.worker_id = "worker"
        self.address = ""
        self.draining = False
        self.stages: dict[StageKey, Stage] = {}
        self.newest_epoch = 0  # across all models: fences LoadStage / UnloadStage
        self.model_epochs: dict[str, int] = {}  # per model, from instructions: fences Forward
        self._loading: dict[StageKey, asyncio.Lock] = {}
        self._reserved = 0  # bytes of stages being loaded right now
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="worker-torch")
        # reading a new stage's weights (disk, host-to-device copies) must not stall the passes of the others
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="worker-load")
        # decoder steps waiting for (or part-way through) the passes of their stage, in arrival order; a stage
        # is a key here exactly while a pass of it is submitted to the torch thread (the pass removes it)
        self._queues: dict[StageKey, list[Pending]] = {}
        self._depths: dict[StageKey, int] = {}  # stages in the routes through each stage, as the gateway said
        self._queue_lock = threading.Lock()
        self._admitting: dict[str, set[asyncio.Task]] = {}  # per session: ForwardBatch steps waiting for KV
        self._arrived = threading.Condition(self._queue_lock)  # notified when a step is queued
        self.stats = BatchStats()

    # ---- epochs -----------------------------------------------------------------------------

    def observe_epoch(self, epoch: int, model: str | None = None) -> None:
        """Remember the newest placement epoch seen (from the scheduler's replies or an instruction)."""
        self.newest_epoch = max(self.newest_epoch, int(epoch))
        if model is not None:
            self.model_epochs[model] = max(self.model_epochs.get(model, 0), int(epoch))

    def _fence(self, key: StageKey, epoch: int, what: str) -> None:
        if epoch < self.newest_epoch:
            raise Aborted(
                f"{what} {key} carries epoch {epoch}, older than epoch {self.newest_epoch} this worker has seen; "
                "the placement changed since"
            )
        self.observe_epoch(epoch, key.model)

    # ---- memory -----------------------------------------------------------------------------

    def weight_bytes(self) -> int:
        """Weights loaded, and being loaded."""
        return sum(s.param_bytes for s in self.stages.values()) + self._reserved

    def used_memory(self) -> int:
        return self.weight_bytes() + self.sessions.kv_bytes()

    def free_memory(self) -> int:
        free = max(0, self.total_memory - self.used_memory())
        device_free = device_free_memory(self.device)
        return free if device_free is None else min(free, device_free)

    def kv_limit(self) -> int:
        """The KV budget now: --kv-budget-bytes, never more than what the weights leave of the offered memory."""
        room = max(0, self.total_memory - self.weight_bytes())
        return min(self.kv_budget, room) if self.kv_budget else room

    # ---- loading ----------------------------------------------------------------------------

    async def load_stage(self, key: StageKey, epoch: int) -> Stage:
        """Load (or find) a stage: cache hit or fetch, then weights onto the device. Idempotent."""
        check_names(key.model, key.version)
        if key.start < 0 or key.end <= key.start:
            raise InvalidArgument(f"layer range [{key.start}, {key.end}) is empty or negative; need 0 <= start < end")
        self._fence(key, epoch, "LoadStage")
        lock = self._loading.setdefault(key, asyncio.Lock())
        async with lock:
            stage = self.stages.get(key)
            if stage is not None:
                stage.epoch = max(stage.epoch, epoch)
                return stage
            path = await self.cache.lookup(*key)
            if path is None:
                path = await self._fetch(key)
            spec = _spec_from(path)
            need = self._check_fits(key, spec)
            self._reserved += need
            try:
                module = await self.run(load_stage, path, key.start, key.end, self.device, executor=self._loader)
            except ModelFormatError as err:
                raise FailedPrecondition(f"{key} cannot be loaded: {err}") from None
            except torch.OutOfMemoryError:
                raise ResourceExhausted(f"{key} does not fit on {self.device}: out of device memory") from None
            finally:
                self._reserved -= need
            stage = Stage(key, module, spec, int(module.param_bytes()), epoch)
            self.stages[key] = stage
            log.info("loaded %s (%d param bytes) at epoch %d from %s", key, stage.param_bytes, epoch, path)
            return stage

    async def _fetch(self, key: StageKey) -> Path:
        info = await self.registry.resolve(key.model, key.version)
        if info.version != key.version:
            raise InvalidArgument(
                f"LoadStage needs a concrete version, got {key.version!r} (an alias of {info.version!r})"
            )
        try:
            spec = ModelSpec.from_hf_config(json.loads(info.config_json))
        except (ValueError, ModelFormatError) as err:
            raise FailedPrecondition(f"{key.model} {key.version} has an unusable config.json: {err}") from None
        self._check_range(key, spec)
        self._check_fits(key, spec)
        names = stage_tensor_names(spec, key.start, key.end)
        try:
            return await self.cache.fill(info, key.start, key.end, names)
        except DataLoss as err:
            log.warning("fetching %s failed (%s); fetching once more", key, err.message)
        return await self.cache.fill(info, key.start, key.end, names)

    def _check_range(self, key: StageKey, spec: ModelSpec) -> None:
        if not 0 <= key.start < key.end <= spec.num_layers:
            raise InvalidArgument(
                f"layer range [{key.start}, {key.end}) is out of bounds for {key.model} {key.version} with "
                f"{spec.num_layers} layers; need 0 <= start < end <= {spec.num_layers}"
            )

    def _check_fits(self, key: StageKey, spec: ModelSpec) -> int:
        """The stage's weight bytes at the load dtype; RESOURCE_EXHAUSTED when they exceed free memory."""
        self._check_range(key, spec)
        dtype = spec.dtype_default(self.device)
        numel = sum(p.numel() for p in meta_stage(spec, key.start, key.end).parameters())
        need = numel * dtype.itemsize
        free = self.free_memory()
        if need > free:
            raise ResourceExhausted(
                f"{key} needs {need} bytes of weights ({dtype}) but worker {self.worker_id} has {free} of "
                f"{self.total_memory} bytes free"
            )
        return need

    async def unload_stage(self, key: StageKey, epoch: int) -> bool:
        """Free a stage and its sessions; False when it was not loaded (idempotent)."""
        self._fence(key, epoch, "UnloadStage")
        stage = self.stages.pop(key, None)
        dropped = self.sessions.drop_stage(key)
        if stage is None:
            return False
        del stage
        await self.run(_release_memory, self.device)
        self.admission.wake()  # the weights' memory may now hold KV caches
        log.info("unloaded %s (%d sessions dropped)", key, dropped)
        return True

    # ---- forward ----------------------------------------------------------------------------

    def stage_for(self, key: StageKey, epoch: int) -> Stage:
        """The loaded stage a Forward names; FAILED_PRECONDITION if absent, ABORTED for a stale route."""
        stage = self.stages.get(key)
        if stage is None:
            raise FailedPrecondition(f"{key} is not loaded on worker {self.worker_id}")
        newest = self.model_epochs.get(key.model, 0)
        if epoch < newest:
            raise Aborted(
                f"route epoch {epoch} for {key.model} is older than epoch {newest} this worker has seen; "
                "refresh the route"
            )
        return stage

    def _context(self) -> StepContext:
        return StepContext(self.sessions, self.kv_limit, lambda: self.draining, self.worker_id)

    async def decoder_step(self, stage: Stage, req: DecoderStep) -> StepResult:
        """Admit the step's session if it is new here, then queue the step for the stage's next passes.
        stage: from stage_for (the caller looked it up to parse the request)."""
        need = self._check(stage, req)
        if need is not None:
            await self.admission.admit(req.session_id, stage.key, *need)
        (item,) = self._enqueue([(stage.key, req)])
        return await item.future

    async def decoder_steps(
        self, steps: Sequence[tuple[StageKey, int, DecoderStep] | ModelGridError]
    ) -> AsyncIterator[list[tuple[int, StepResult | ModelGridError]]]:
        """Many sessions' steps at once (a ForwardBatch). Yields (index in `steps`, result) of the steps
        that ended together: first those refused before queueing (an error in `steps`, a step that did not
        parse, is passed through), then the steps of each pass as it ends. Each step succeeds or fails alone.

        The steps admitted at once (running sessions, new ones whose KV bytes fit now) are queued together,
        so that the stage's passes take them together; a step whose session must wait for KV memory waits
        in a task of its own and is queued when admitted, so the others (which may be the sessions that
        will free that memory) never wait for it."""
        refused: list[tuple[int, StepResult | ModelGridError]] = []
        ready: list[tuple[int, StageKey, DecoderStep]] = []
        admitting: dict[asyncio.Future, int] = {}
        for index, s in enumerate(steps):
            if isinstance(s, ModelGridError):
                refused.append((index, s))
                continue
            key, epoch, req = s
            try:
                need = self._check(self.stage_for(key, epoch), req)
                if need is None or self.admission.try_admit(req.session_id, key, *need):
                    ready.append((index, key, req))
                else:
                    admitting[self._admit_later(key, req, need)] = index
            except Exception as err:  # noqa: BLE001 - this step fails alone
                refused.append((index, _step_error(err, req.session_id)))
        items = self._enqueue([(key, req) for _, key, req in ready])
        waiting: dict[asyncio.Future, int] = {item.future: index for (index, _, _), item in zip(ready, items)}
        waiting.update(admitting)
        try:
            if refused:
                yield refused
            while waiting:
                done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                ended: list[tuple[int, StepResult | ModelGridError]] = []
                for future in done:
                    index = waiting.pop(future)
                    session_id = steps[index][2].session_id  # type: ignore[index]
                    if future in admitting and not future.cancelled() and future.exception() is None:
                        waiting[future.result().future] = index  # admitted and queued: wait for its passes
                    else:
                        ended.append((index, _outcome(future, session_id)))
                if ended:
                    yield sorted(ended, key=lambda pair: pair[0])
        finally:
            for future in waiting:  # the call went away: its steps waiting or left in the queue are abandoned
                future.cancel()

    def _admit_later(self, key: StageKey, req: DecoderStep, need: tuple[int, int]) -> asyncio.Task:
        """A task that waits for the session's KV admission, then queues the step; close_session cancels it."""

        async def admit() -> Pending:
            await self.admission.admit(req.session_id, key, *need)
            (item,) = self._enqueue([(key, req)])
            return item

        task = asyncio.ensure_future(admit())
        tasks = self._admitting.setdefault(req.session_id, set())
        tasks.add(task)

        def forget(_: asyncio.Future) -> None:
            tasks.discard(task)
            if not tasks and self._admitting.get(req.session_id) is tasks:
                del self._admitting[req.session_id]

        task.add_done_callback(forget)
        return task

    def _check(self, stage: Stage, req: DecoderStep) -> tuple[int, int] | None:
        """Check a step against the stage; the (KV bytes, tokens) its session must be admitted for
        when it starts (or replays from 0) on the stage, else None (a running session, or a replay within
        what the session holds; a wrong position is the step's to refuse in its pass)."""
        key = stage.key
        if stage.spec.kind != "decoder":
            raise InvalidArgument(f"{key} is an encoder: send tokens_shape and attention_mask, no session")
        if req.num_stages:
            self._depths[key] = req.num_stages
        session = self.sessions.peek(req.session_id, key)
        if req.position != 0 or (session is not None and not req.reset):
            return None
        tokens = session_tokens(req, stage.spec)
        if self.draining and not self.sessions.known(req.session_id):
            raise Unavailable(f"worker draining: {self.worker_id} accepts no new sessions")
        need = session_kv_bytes(stage.module, key, tokens)
        if session is not None and session.reserved >= need:
            return None
        return need, tokens

    def _enqueue(self, steps: Sequence[tuple[StageKey, DecoderStep]]) -> list[Pending]:
        """Queue checked steps for their stages' passes (under one lock, so a pass sees them all)."""
        loop = asyncio.get_running_loop()
        items = [Pending(req, loop.create_future()) for _, req in steps]
        submit = []
        with self._queue_lock:
            for (key, _), item in zip(steps, items):
                if key not in self._queues:
                    self._queues[key] = []
                    submit.append(key)
                self._queues[key].append(item)
            self._arrived.notify_all()
        for key in submit:
            self._submit_pass(key, loop)
        return items

    def _submit_pass(self, key: StageKey, loop: asyncio.AbstractEventLoop) -> None:
        try:
            self._executor.submit(_inference, self._run_pass, key, loop)
        except RuntimeError:  # shut down: the worker is stopping
            log.debug("torch thread gone; %s not run", key)

    def _run_pass(self, key: StageKey, loop: asyncio.AbstractEventLoop) -> None:
        """In the torch thread: one pass over the steps queued for the stage; submit the next if any remain."""
        with self._queue_lock:
            share = self._gather(key)
            queue = list(self._queues.get(key, ()))
        started = time.perf_counter()
        stage = self.stages.get(key)  # it may have been unloaded while the steps waited
        limits = self.limits
        if 0 < share < limits.max_sessions:
            limits = dataclasses.replace(limits, max_sessions=share)
        try:
            if stage is None:
                raise FailedPrecondition(f"{key} is not loaded on worker {self.worker_id}")
            ended = run_pass(stage.module, key, queue, self._context(), limits, self.stats)
        except ModelGridError as err:
            ended = [(item, err) for item in queue]
        except Exception as err:  # noqa: BLE001 - a bug or a torch error: each step fails alone, logged once
            log.exception("pass of %s over %d steps failed", key, len(queue))
            failed = ModelGridError(f"a pass of {key} failed on worker {self.worker_id}: {type(err).__name__}: {err}")
            ended = [(item, failed) for item in queue]
        with self._queue_lock:
            for item in queue:  # closed while this pass ran: drop what its prepare may have opened again
                if item.closed and self.sessions.peek(item.session_id, key) is not None:
                    self.sessions.drop(item.session_id, key)
            gone = {id(item) for item, _ in ended}
            rest = [item for item in self._queues.get(key, ()) if id(item) not in gone]
            if rest:
                self._queues[key] = rest
            else:
                self._queues.pop(key, None)
        results = [(item.future, result) for item, result in ended if result is not None]
        if results:  # one hand-off to the event loop per pass, not one per step
            _call_soon(loop, _deliver_all, results)
        self.stats.busy_s += time.perf_counter() - started
        if rest:
            self._submit_pass(key, loop)

    async def encoder_step(self, stage: Stage, req: EncoderStep) -> StepResult:
        """stage: an encoder's, from stage_for (the caller looked it up to parse the request)."""
        return await self.run(run_encoder_step, stage.module, stage.key, req, self._context())

    def _gather(self, key: StageKey) -> int:
        """With the queue lock held: the stage's fair share of its open sessions' steps (fair_share: with
        S stages, S groups keep all S busy at once; S is what the route's steps said, else a guess from the
        stage's share of the layers), after waiting up to limits.wait_s until that many are queued; not
        while another stage of this worker has steps waiting for the thread. The lock is released
        while waiting. The pass then takes at most that many sessions: the rest join the next group,
        so that groups of uneven size (sessions that started at different times) even out instead of
        a small group leaving the stages idle while it waits for sessions that are in the big one."""
        stage = self.stages.get(key)
        if stage is None:
            return 0
        depth = self._depths.get(key) or pipeline_depth(stage.spec.num_layers, key.start, key.end)
        share = fair_share(self.sessions.count(key), depth)
        deadline = time.perf_counter() + self.limits.wait_s
        while len(heads(self._queues.get(key, ()))) < share:
            left = deadline - time.perf_counter()
            if left <= 0 or any(queue for other, queue in self._queues.items() if other != key):
                break
            self._arrived.wait(left)
            share = fair_share(self.sessions.count(key), depth)
        return share

    def queued_steps(self) -> int:
        with self._queue_lock:
            return sum(len(q) for q in self._queues.values())

    def close_session(self, session_id: str) -> int:
        """Drop the session and fail its steps still waiting here (for KV admission or in a stage's queue)
        with FAILED_PRECONDITION; a pass running one of them right now drops what it opened when it ends.
        Otherwise a step whose caller gave up (a coalesced step is not cancelled on the worker) would open
        the session again after the close: an orphan holding KV memory until idle eviction."""
        for task in self._admitting.pop(session_id, ()):
            task.cancel()
        closed = FailedPrecondition(f"session {session_id} was closed on worker {self.worker_id}")
        with self._queue_lock:
            for key, queue in list(self._queues.items()):
                mine = [item for item in queue if item.session_id == session_id]
                for item in mine:
                    item.closed = True
                    _deliver(item.future, closed)
                # left as a key even when empty: its pass is still scheduled, finds nothing and removes it
                self._queues[key] = [item for item in queue if item.session_id != session_id]
        return self.sessions.drop(session_id)

    def evict_idle(self, idle_s: float) -> int:
        evicted = self.sessions.evict_idle(idle_s)
        for s in evicted:
            log.info("evicted session %s on %s after %.0f s idle", s.session_id, s.stage, idle_s)
        return len(evicted)

    # ---- status & plumbing ------------------------------------------------------------------

    def status(self) -> WorkerStatus:
        stages = tuple(s.status() for _, s in sorted(self.stages.items()))
        return WorkerStatus(
            worker_id=self.worker_id,
            address=self.address,
            device=str(self.device),
            total_memory=self.total_memory,
            free_memory=self.free_memory(),
            stages=stages,
            state="draining" if self.draining else "serving",
            active_sessions=self.sessions.active_sessions(),
            kv_cache_bytes=self.sessions.kv_bytes(),
        )

    async def run(self, fn: Callable[..., T], *args: Any, executor: ThreadPoolExecutor | None = None) -> T:
        """Run fn(*args) in the torch thread (or `executor`) under inference_mode."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(executor or self._executor, functools.partial(_inference, fn, *args))

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._loader.shutdown(wait=False, cancel_futures=True)


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], *args: Any) -> None:
    """Hand a callback to the event loop from the torch thread (nothing to do once it is closed)."""
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:
        log.debug("event loop closed; dropping %s", getattr(fn, "__name__", fn))


def _outcome(future: asyncio.Future, session_id: str) -> StepResult | ModelGridError:
    """What a ForwardBatch step's future ended with, as the step's result."""
    if future.cancelled():  # its admission was cancelled by close_session
        return FailedPrecondition(f"session {session_id} was closed while its step waited for KV memory")
    err = future.exception()
    return future.result() if err is None else _step_error(err, session_id)


def _step_error(err: BaseException, session_id: str) -> ModelGridError:
    """A step's error as its result: a ModelGridError as it is, anything else (a bug) INTERNAL, logged here."""
    if isinstance(err, ModelGridError):
        return err
    log.error("step of session %s failed", session_id, exc_info=err)
    return ModelGridError(f"step of session {session_id} failed: {type(err).__name__}: {err}")


def _deliver_all(results: list[tuple[asyncio.Future, Any]]) -> None:
    for future, result in results:
        _deliver(future, result)


def _deliver(future: asyncio.Future, result: Any) -> None:
    if future.done():  # the caller went away (cancelled RPC)
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)


def _inference(fn: Callable[..., T], *args: Any) -> T:
    with torch.inference_mode():
        return fn(*args)


def _release_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _spec_from(path: Path) -> ModelSpec:
    try:
        return ModelSpec.from_hf_config(json.loads((path / CONFIG_FILE).read_text()))
    except (ValueError, OSError) as err:
        raise FailedPrecondition(f"cached config {path / CONFIG_FILE} is unusable: {err}") from None
