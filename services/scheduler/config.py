"""Scheduler configuration: one dataclass, built once in main() from flags and environment variables."""

from __future__ import annotations

from dataclasses import dataclass

from services.common.settings import setting


@dataclass
class SchedulerConfig:
    """ModelGrid scheduler: worker membership, placement of stages on workers, routes."""

    # host:port the gRPC server binds (port 0 picks a free one).
    listen: str = setting("0.0.0.0:50053", "MODELGRID_SCHEDULER_LISTEN", "host:port to serve gRPC on")
    # Prometheus /metrics port; -1 disables, 0 picks a free one.
    metrics_port: int = setting(9093, "MODELGRID_SCHEDULER_METRICS_PORT", "Prometheus metrics port (-1 disables)")
    # Where membership, placements and the epoch live.
    redis_url: str = setting("redis://127.0.0.1:6379/0", "MODELGRID_REDIS_URL", "Redis URL for the scheduler's state")
    # The registry, which says what should run (ListDeployments) and resolves aliases.
    registry: str = setting("127.0.0.1:50052", "MODELGRID_REGISTRY_ADDR", "registry host:port")
    # Seconds between worker heartbeats (told to workers when they register).
    heartbeat_interval_s: float = setting(1.0, "MODELGRID_HEARTBEAT_INTERVAL_S", "seconds between worker heartbeats")
    # A worker not heard from for this long is gone; its stages are re-placed.
    heartbeat_ttl_s: float = setting(
        3.0, "MODELGRID_HEARTBEAT_TTL_S", "seconds without a heartbeat before a worker is gone"
    )
    # Seconds between reconcile ticks (also run on Reconcile() and on membership changes).
    reconcile_interval_s: float = setting(2.0, "MODELGRID_RECONCILE_INTERVAL_S", "seconds between reconcile ticks")
    # Tokens of KV cache reserved per stage copy, on top of its weights.
    kv_reserve_tokens: int = setting(2048, "MODELGRID_KV_RESERVE_TOKENS", "KV-cache tokens reserved per stage copy")
    # Deadline of one Worker.LoadStage (fetching and loading weights can take minutes).
    load_timeout_s: float = setting(
        600.0, "MODELGRID_SCHEDULER_LOAD_TIMEOUT_S", "deadline of one Worker.LoadStage call (s)"
    )
    # Deadline of registry calls and of the health probe after ReportFailure.
    rpc_timeout_s: float = setting(5.0, "MODELGRID_SCHEDULER_RPC_TIMEOUT_S", "deadline of registry calls (s)")
    probe_timeout_s: float = setting(
        1.0, "MODELGRID_SCHEDULER_PROBE_TIMEOUT_S", "deadline of the worker health probe (s)"
    )
    # Batch jobs (services/scheduler/jobs.py): items per task, unless the job says otherwise.
    job_task_items: int = setting(128, "MODELGRID_JOB_TASK_ITEMS", "items per batch-job task")
    # Runs of one task (each on other workers if it can) before its job fails.
    job_max_attempts: int = setting(4, "MODELGRID_JOB_MAX_ATTEMPTS", "runs of a batch-job task before the job fails")
    # A task whose executor has not extended its lease for this long runs again elsewhere.
    job_lease_s: float = setting(60.0, "MODELGRID_JOB_LEASE_S", "seconds a batch-job task lease lasts unextended")
    # Tasks one worker takes part in at once (2 lets one task's hops overlap the next one's).
    job_tasks_per_worker: int = setting(2, "MODELGRID_JOB_TASKS_PER_WORKER", "batch-job tasks per worker at once")
    # Seconds between re-queuing expired leases (and, every 5th time, comparing Redis with the registry).
    job_sync_interval_s: float = setting(
        1.0, "MODELGRID_JOB_SYNC_INTERVAL_S", "seconds between batch-job bookkeeping ticks"
    )
    log_level: str = setting("INFO", "MODELGRID_LOG_LEVEL", "DEBUG, INFO, WARNING or ERROR")
    # Seconds to drain in-flight calls after SIGTERM.
    grace_s: float = setting(5.0, "MODELGRID_SCHEDULER_GRACE_S", "seconds to drain calls on SIGTERM")

    def validate(self) -> None:
        if ":" not in self.listen:
            raise ValueError(f"--listen must be host:port, got {self.listen!r}")
        if ":" not in self.registry:
            raise ValueError(f"--registry must be host:port, got {self.registry!r}")
        if not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"--redis-url must start with redis://, rediss:// or unix://, got {self.redis_url!r}")
        for name in (
            "heartbeat_interval_s", "reconcile_interval_s", "load_timeout_s", "rpc_timeout_s", "probe_timeout_s",
            "job_lease_s", "job_sync_interval_s",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        if self.heartbeat_ttl_s <= self.heartbeat_interval_s:
            raise ValueError(
                f"--heartbeat-ttl-s ({self.heartbeat_ttl_s}) must exceed --heartbeat-interval-s "
                f"({self.heartbeat_interval_s}); 3 intervals is a good value"
            )
        for name in ("job_task_items", "job_max_attempts", "job_tasks_per_worker"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.kv_reserve_tokens < 0:
            raise ValueError(f"--kv-reserve-tokens must be >= 0, got {self.kv_reserve_tokens}")
        if self.grace_s < 0:
            raise ValueError(f"--grace-s must be >= 0, got {self.grace_s}")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ValueError(f"--log-level must be DEBUG, INFO, WARNING or ERROR, got {self.log_level!r}")
