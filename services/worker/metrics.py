"""Worker metrics for Prometheus, read from the runtime at scrape time."""

from __future__ import annotations

from typing import Callable, Iterator

from prometheus_client import REGISTRY, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from services.worker.runtime import WorkerRuntime

ACTIVE_SESSIONS = Gauge("modelgrid_worker_active_sessions", "Sessions holding a KV cache on this worker")
KV_CACHE_BYTES = Gauge("modelgrid_worker_kv_cache_bytes", "KV-cache bytes in use (reserved by admitted sessions)")
FREE_MEMORY = Gauge("modelgrid_worker_free_memory_bytes", "Memory offered for weights and KV caches still free")
LOADED_STAGES = Gauge("modelgrid_worker_loaded_stages", "Stages loaded on this worker")
CACHE_EVENTS = Gauge("modelgrid_worker_stage_cache_events", "Local stage cache events since start", ["event"])


# (kind, name, help, value read from the runtime) of the KV budget, admission and batching figures
_FIGURES: list[tuple[str, str, str, Callable[[WorkerRuntime], float]]] = [
    ("gauge", "kv_budget_bytes", "KV-cache budget now (the setting, or what the weights leave)",
     lambda rt: rt.kv_limit()),
    ("gauge", "kv_admissions_queued", "New sessions waiting for KV memory", lambda rt: rt.admission.queued),
    ("counter", "kv_admissions", "Sessions admitted", lambda rt: rt.admission.stats.admitted),
    ("counter", "kv_admission_waits", "Admissions that had to wait for memory", lambda rt: rt.admission.stats.waited),
    ("counter", "kv_admission_refusals", "Sessions refused with RESOURCE_EXHAUSTED for lack of KV memory",
     lambda rt: rt.admission.stats.refused),
    ("gauge", "queued_steps", "Forward steps queued or part-way through their passes", lambda rt: rt.queued_steps()),
    ("counter", "forward_passes", "Forward passes run (each over the steps of one or more sessions)",
     lambda rt: rt.stats.passes),
    ("counter", "forward_steps", "Session-steps run in passes", lambda rt: rt.stats.steps),
    ("counter", "forward_tokens", "Tokens run in passes", lambda rt: rt.stats.tokens),
    ("counter", "batched_passes", "Passes that ran more than one session", lambda rt: rt.stats.batched_passes),
    ("counter", "batched_steps", "Session-steps run in passes with more than one session",
     lambda rt: rt.stats.batched_steps),
    ("counter", "prefill_chunks", "Passes that ran part of a prompt, leaving the rest for later",
     lambda rt: rt.stats.prefill_chunks),
    ("counter", "busy_seconds", "Time the torch thread spent in forward passes", lambda rt: rt.stats.busy_s),
]


class _RuntimeCollector:
    """_FIGURES of the bound runtime, read at scrape time (counters are exposed as *_total)."""

    def __init__(self) -> None:
        self.runtime: WorkerRuntime | None = None

    def describe(self) -> Iterator[Metric]:
        return self._families(None)

    def collect(self) -> Iterator[Metric]:
        return self._families(self.runtime)

    @staticmethod
    def _families(rt: WorkerRuntime | None) -> Iterator[Metric]:
        for kind, name, doc, value in _FIGURES:
            family = GaugeMetricFamily if kind == "gauge" else CounterMetricFamily
            yield family(f"modelgrid_worker_{name}", doc, value=value(rt) if rt is not None else 0)


_COLLECTOR = _RuntimeCollector()
REGISTRY.register(_COLLECTOR)


def bind(runtime: WorkerRuntime) -> None:
    """Point the metrics at a runtime (the last one bound wins when tests run several in one process)."""
    _COLLECTOR.runtime = runtime
    ACTIVE_SESSIONS.set_function(runtime.sessions.active_sessions)
    KV_CACHE_BYTES.set_function(runtime.sessions.kv_bytes)
    FREE_MEMORY.set_function(runtime.free_memory)
    LOADED_STAGES.set_function(lambda: len(runtime.stages))
    stats = runtime.cache.stats
    CACHE_EVENTS.labels("hit").set_function(lambda: stats.hits)
    CACHE_EVENTS.labels("fill").set_function(lambda: stats.fills)
    CACHE_EVENTS.labels("corrupt").set_function(lambda: stats.corrupt)
