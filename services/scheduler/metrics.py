"""Scheduler metrics computed at scrape time: how long ago each live worker sent its last heartbeat.

The gauges of the reconcile tick (workers, placements by state, epoch) live in controller.py.
"""

from __future__ import annotations

from typing import Iterable, Iterator

from prometheus_client import REGISTRY
from prometheus_client.core import GaugeMetricFamily, Metric

from services.common.clock import now_ms
from services.scheduler.records import WorkerRecord


class HeartbeatAges:
    """modelgrid_scheduler_heartbeat_age_seconds{worker}: fed by heartbeats and by each tick's live workers."""

    def __init__(self) -> None:
        self._last_ms: dict[str, int] = {}  # worker id -> unix ms of its last heartbeat (registration included)

    def seen(self, worker_id: str, last_seen_ms: int) -> None:
        self._last_ms[worker_id] = max(last_seen_ms, self._last_ms.get(worker_id, 0))

    def live(self, workers: Iterable[WorkerRecord]) -> None:
        """Keep exactly these workers (an expired or removed worker leaves the metric)."""
        self._last_ms = {w.worker_id: max(w.last_seen_ms, self._last_ms.get(w.worker_id, 0)) for w in workers}

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "modelgrid_scheduler_heartbeat_age_seconds", "Seconds since each live worker's last heartbeat",
            labels=["worker"],
        )
        now = now_ms()
        for worker_id, last in sorted(self._last_ms.items()):
            family.add_metric([worker_id], max(0, now - last) / 1000.0)
        yield family


HEARTBEAT_AGES = HeartbeatAges()
REGISTRY.register(HEARTBEAT_AGES)
