"""Worker gauges for Prometheus, read from the runtime at scrape time."""

from __future__ import annotations

from prometheus_client import Gauge

from services.worker.runtime import WorkerRuntime

ACTIVE_SESSIONS = Gauge("modelgrid_worker_active_sessions", "Sessions holding a KV cache on this worker")
KV_CACHE_BYTES = Gauge("modelgrid_worker_kv_cache_bytes", "Bytes allocated for KV caches")
FREE_MEMORY = Gauge("modelgrid_worker_free_memory_bytes", "Memory offered for weights and KV caches still free")
LOADED_STAGES = Gauge("modelgrid_worker_loaded_stages", "Stages loaded on this worker")
CACHE_EVENTS = Gauge("modelgrid_worker_stage_cache_events", "Local stage cache events since start", ["event"])


def bind(runtime: WorkerRuntime) -> None:
    """Point the gauges at a runtime (the last one bound wins when tests run several in one process)."""
    ACTIVE_SESSIONS.set_function(runtime.sessions.active_sessions)
    KV_CACHE_BYTES.set_function(runtime.sessions.kv_bytes)
    FREE_MEMORY.set_function(runtime.free_memory)
    LOADED_STAGES.set_function(lambda: len(runtime.stages))
    stats = runtime.cache.stats
    CACHE_EVENTS.labels("hit").set_function(lambda: stats.hits)
    CACHE_EVENTS.labels("fill").set_function(lambda: stats.fills)
    CACHE_EVENTS.labels("corrupt").set_function(lambda: stats.corrupt)
