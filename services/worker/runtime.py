"""WorkerRuntime: the stages loaded on this worker's device, placement epochs, memory, and Forward.

All torch work (loading weights, forward steps) runs in ONE dedicated thread under
torch.inference_mode, off the event loop, so heartbeats, health checks and CloseSession stay
responsive while a long prefill runs; and since there is one thread, steps never race on a cache.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import json
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, TypeVar

import torch

from modelgrid.errors import Aborted, FailedPrecondition, InvalidArgument, ResourceExhausted
from modelgrid.model.checkpoint import meta_stage, stage_tensor_names
from modelgrid.model.errors import ModelFormatError
from modelgrid.model.spec import ModelSpec
from modelgrid.model.stage import load_stage
from services.worker.device import device_free_memory
from services.worker.sessions import SessionStore, StageKey
from services.worker.shard_cache import CONFIG_FILE, DataLoss, ShardCache, VersionInfo, check_names
from services.worker.steps import (
    DecoderStep, EncoderStep, StepContext, StepResult, run_decoder_batch, run_encoder_step,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_BATCH_STEPS = 64  # decoder steps of one stage run together in one forward pass, at most


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
    ) -> None:
        self.device = device
        self.total_memory = total_memory
        self.cache = cache
        self.registry = registry
        self.sessions = sessions or SessionStore()
        self.worker_id = "worker"
        self.address = ""
        self.draining = False
        self.stages: dict[StageKey, Stage] = {}
        self.newest_epoch = 0  # across all models: fences LoadStage / UnloadStage
        self.model_epochs: dict[str, int] = {}  # per model, from instructions: fences Forward
        self._loading: dict[StageKey, asyncio.Lock] = {}
        self._reserved = 0  # bytes of stages being loaded right now
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="worker-torch")
        # decoder steps waiting for the torch thread, per stage: (request, caller's future)
        self._queues: dict[StageKey, list[tuple[DecoderStep, asyncio.Future]]] = {}
        self._queue_lock = threading.Lock()
        self.batch_sizes: collections.deque[int] = collections.deque(maxlen=1000)  # recent batches, for tests/metrics

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

    def used_memory(self) -> int:
        return sum(s.param_bytes for s in self.stages.values()) + self.sessions.kv_bytes() + self._reserved

    def free_memory(self) -> int:
        free = max(0, self.total_memory - self.used_memory())
        device_free = device_free_memory(self.device)
        return free if device_free is None else min(free, device_free)

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
                module = await self.run(load_stage, path, key.start, key.end, self.device)
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
        need = numel * torch.empty((), dtype=dtype).element_size()
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
        return StepContext(self.sessions, self.free_memory, lambda: self.draining, self.worker_id)

    async def decoder_step(self, key: StageKey, epoch: int, req: DecoderStep) -> StepResult:
        """Queue the step for the stage; steps queued while the torch thread is busy run as one batch."""
        stage = self.stage_for(key, epoch)
        if stage.spec.kind != "decoder":
            raise InvalidArgument(f"{key} is an encoder: send tokens_shape and attention_mask, no session")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[StepResult] = loop.create_future()
        with self._queue_lock:
            queue = self._queues.setdefault(key, [])
            queue.append((req, future))
            start_job = len(queue) == 1  # else a job for this stage is queued and will take this step too
        if start_job:
            self._schedule_queue(key, loop)
        return await future

    def _schedule_queue(self, key: StageKey, loop: asyncio.AbstractEventLoop) -> None:
        loop.run_in_executor(self._executor, functools.partial(_inference, self._run_queue, key, loop))

    def _run_queue(self, key: StageKey, loop: asyncio.AbstractEventLoop) -> None:
        """In the torch thread: take the steps queued for the stage (up to MAX_BATCH_STEPS) and run them."""
        with self._queue_lock:
            queue = self._queues.get(key, [])
            items, rest = queue[:MAX_BATCH_STEPS], queue[MAX_BATCH_STEPS:]
            if rest:
                self._queues[key] = rest
                _call_soon(loop, self._schedule_queue, key, loop)
            else:
                self._queues.pop(key, None)
        stage = self.stages.get(key)  # it may have been unloaded while the steps waited
        try:
            if stage is None:
                raise FailedPrecondition(f"{key} is not loaded on worker {self.worker_id}")
            results: list = run_decoder_batch(stage.module, key, [req for req, _ in items], self._context())
        except BaseException as err:  # noqa: BLE001 - delivered to every caller; the rpc edge logs it
            results = [err] * len(items)
        self.batch_sizes.append(len(items))
        for (_, future), result in zip(items, results):
            _call_soon(loop, _deliver, future, result)

    async def encoder_step(self, key: StageKey, epoch: int, req: EncoderStep) -> StepResult:
        stage = self.stage_for(key, epoch)
        if stage.spec.kind != "encoder":
            raise InvalidArgument(f"{key} is a decoder: send a session id and position, no tokens_shape")
        return await self.run(run_encoder_step, stage.module, key, req, self._context())

    def close_session(self, session_id: str) -> int:
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

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run fn(*args) in the torch thread under inference_mode."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(_inference, fn, *args))

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], *args: Any) -> None:
    """Hand a callback to the event loop from the torch thread (nothing to do once it is closed)."""
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:
        log.debug("event loop closed; dropping %s", getattr(fn, "__name__", fn))


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
