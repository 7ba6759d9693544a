"""WorkerConfig: every setting of a worker, from flags and environment (names fixed by the team brief)."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path

from services.common.settings import setting


@dataclass
class WorkerConfig:
    """A ModelGrid worker: one device, the stages it is told to load, per-session KV caches."""

    # host:port the gRPC server binds (port 0 picks a free port, for tests)
    listen: str = setting("0.0.0.0:50061", "MODELGRID_WORKER_LISTEN", "address the gRPC server listens on")
    # Prometheus /metrics port; -1 disables it, 0 picks a free port
    metrics_port: int = setting(9094, "MODELGRID_WORKER_METRICS_PORT", "Prometheus metrics port (-1 disables)")
    # address the scheduler and gateways dial; "" = 127.0.0.1:<bound port>
    advertise: str = setting("", "MODELGRID_WORKER_ADVERTISE", "address others dial (default 127.0.0.1:<port>)")
    # stable identity of this worker in the scheduler; "" = <hostname>-<bound port>
    worker_id: str = setting("", "MODELGRID_WORKER_ID", "worker id (default <hostname>-<port>)")
    scheduler: str = setting("127.0.0.1:50053", "MODELGRID_SCHEDULER_ADDR", "scheduler address host:port")
    registry: str = setting("127.0.0.1:50052", "MODELGRID_REGISTRY_ADDR", "registry address host:port")
    # "auto" (cuda if available else cpu), "cpu", "cuda", "cuda:1", ...
    device: str = setting("auto", "MODELGRID_DEVICE", "torch device: auto, cpu, cuda, cuda:N")
    # bytes offered for weights + KV caches; 0 = the device's total memory (on CPU: half the RAM)
    memory_bytes: int = setting(0, "MODELGRID_WORKER_MEMORY_BYTES", "memory offered for weights and KV caches")
    # local shard cache; "" = ~/.cache/modelgrid
    cache_dir: str = setting("", "MODELGRID_WORKER_CACHE_DIR", "directory of the local stage cache")
    # a session unused this long is evicted with its KV caches
    session_idle_timeout_s: float = setting(
        300.0, "MODELGRID_SESSION_IDLE_TIMEOUT_S", "evict sessions idle for this many seconds"
    )
    # KV-cache memory for all sessions; 0 = what the loaded weights leave of memory_bytes
    kv_budget_bytes: int = setting(
        0, "MODELGRID_WORKER_KV_BUDGET_BYTES", "KV-cache budget in bytes (0 = offered memory left after weights)"
    )
    # a new session whose KV cache does not fit waits this long for others to free memory, then
    # gets RESOURCE_EXHAUSTED (0 = refuse at once)
    kv_admission_timeout_s: float = setting(
        5.0, "MODELGRID_WORKER_KV_ADMISSION_TIMEOUT_S", "seconds a new session waits for KV memory before refusal"
    )
    # tokens of all sessions in one forward pass; longer prompts are prefilled in chunks between decode steps
    max_batch_tokens: int = setting(
        512, "MODELGRID_WORKER_MAX_BATCH_TOKENS", "tokens per forward pass (prompts are chunked to fit)"
    )
    # a pass waits up to this long for its fair share of the stage's open sessions (open sessions / number
    # of pipeline stages), so that every stage works on a different group of sessions at once
    batch_wait_ms: float = setting(
        10.0, "MODELGRID_WORKER_BATCH_WAIT_MS", "ms a pass may wait to batch its share of open sessions (0 = none)"
    )
    # torch's CPU threads; 0 = torch's default (one per core). Set it when several workers share a CPU
    torch_threads: int = setting(0, "MODELGRID_WORKER_TORCH_THREADS", "torch CPU threads (0 = torch's default)")
    # on SIGTERM: how long running sessions may continue before the worker exits
    grace_s: float = setting(30.0, "MODELGRID_WORKER_GRACE_S", "seconds to drain sessions on SIGTERM")
    log_level: str = setting("INFO", "MODELGRID_LOG_LEVEL", "log level: DEBUG, INFO, WARNING, ERROR")

    def validate(self) -> None:
        """Raise ValueError with what to change for any value the worker cannot run with."""
        for name in ("listen", "scheduler", "registry"):
            value = getattr(self, name)
            if ":" not in value or not value.rsplit(":", 1)[1].isdigit():
                raise ValueError(f"--{name} must be host:port (e.g. 127.0.0.1:50061), got {value!r}")
        if self.advertise and (":" not in self.advertise or not self.advertise.rsplit(":", 1)[1].isdigit()):
            raise ValueError(f"--advertise must be host:port or empty, got {self.advertise!r}")
        if self.metrics_port < -1 or self.metrics_port > 65535:
            raise ValueError(f"--metrics-port must be -1 (off), 0 (any) or a port, got {self.metrics_port}")
        if self.memory_bytes < 0:
            raise ValueError(f"--memory-bytes must be >= 0 (0 = the device's memory), got {self.memory_bytes}")
        if self.session_idle_timeout_s <= 0:
            raise ValueError(f"--session-idle-timeout-s must be > 0, got {self.session_idle_timeout_s}")
        if self.grace_s < 0:
            raise ValueError(f"--grace-s must be >= 0, got {self.grace_s}")
        if self.kv_budget_bytes < 0:
            raise ValueError(f"--kv-budget-bytes must be >= 0 (0 = what the weights leave), got {self.kv_budget_bytes}")
        if self.memory_bytes and self.kv_budget_bytes > self.memory_bytes:
            raise ValueError(
                f"--kv-budget-bytes {self.kv_budget_bytes} exceeds --memory-bytes {self.memory_bytes}; "
                "lower it, or raise --memory-bytes"
            )
        if self.kv_admission_timeout_s < 0:
            raise ValueError(f"--kv-admission-timeout-s must be >= 0, got {self.kv_admission_timeout_s}")
        if self.max_batch_tokens < 1:
            raise ValueError(f"--max-batch-tokens must be >= 1, got {self.max_batch_tokens}")
        if not 0 <= self.batch_wait_ms <= 1000:
            raise ValueError(f"--batch-wait-ms must be in [0, 1000], got {self.batch_wait_ms}")
        if self.torch_threads < 0:
            raise ValueError(f"--torch-threads must be >= 0 (0 = torch's default), got {self.torch_threads}")
        dev = self.device
        if dev not in ("auto", "cpu", "cuda", "mps") and not (dev.startswith("cuda:") and dev[5:].isdigit()):
            raise ValueError(f"--device must be auto, cpu, cuda, cuda:N or mps, got {dev!r}")

    def cache_path(self) -> Path:
        return Path(self.cache_dir).expanduser() if self.cache_dir else Path.home() / ".cache" / "modelgrid"

    def identity(self, port: int) -> tuple[str, str]:
        """(worker id, advertised address) once the server's port is known."""
        address = self.advertise or f"127.0.0.1:{port}"
        worker_id = self.worker_id or f"{socket.gethostname()}-{port}"
        return worker_id, address
