"""GatewayConfig: every setting of the gateway, from flags and environment (names fixed by the team brief)."""

from __future__ import annotations

from dataclasses import dataclass

from modelgrid.channel import CHUNK_BYTES, MAX_MESSAGE_BYTES
from services.common.settings import setting

MIN_REQUEST_BYTES = CHUNK_BYTES + 1024 * 1024  # an upload chunk and its envelope


def _check_address(flag: str, value: str) -> None:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"--{flag} must be host:port (e.g. 127.0.0.1:50052), got {value!r}")


@dataclass
class GatewayConfig:
    """ModelGrid gateway: the public gRPC API (generation, embeddings, admin proxies, KServe v2 inference) and
    the OpenAI-compatible HTTP API."""

    # host:port the gRPC server binds; port 0 picks a free port (tests)
    listen: str = setting("0.0.0.0:50051", "MODELGRID_GATEWAY_LISTEN", "gRPC listen address host:port")
    # Prometheus /metrics over HTTP; -1 disables it, 0 picks a free port
    metrics_port: int = setting(9091, "MODELGRID_GATEWAY_METRICS_PORT", "Prometheus metrics port (-1 disables)")
    # the OpenAI-compatible HTTP API (/v1/...), on the host of --listen; -1 disables it, 0 picks a free port
    http_port: int = setting(8000, "MODELGRID_GATEWAY_HTTP_PORT", "OpenAI-compatible HTTP API port (-1 disables)")
    # larger HTTP request bodies are refused with 413 before they are parsed
    http_max_body_bytes: int = setting(
        4 * 1024 * 1024, "MODELGRID_GATEWAY_HTTP_MAX_BODY_BYTES", "largest HTTP request body accepted, in bytes"
    )
    registry: str = setting("127.0.0.1:50052", "MODELGRID_REGISTRY_ADDR", "registry address host:port")
    scheduler: str = setting("127.0.0.1:50053", "MODELGRID_SCHEDULER_ADDR", "scheduler address host:port")
    # Redis for the per-key rate limits, shared by every gateway (services/gateway/limits.py)
    redis_url: str = setting("redis://127.0.0.1:6379/0", "MODELGRID_REDIS_URL", "Redis URL (rate limits)")
    # new tokens when a request does not say (clamped to what fits the model's context)
    default_max_tokens: int = setting(16, "MODELGRID_DEFAULT_MAX_TOKENS", "max_tokens of a request that sets none")
    # longest prompt accepted, in tokens
    max_prompt_tokens: int = setting(8192, "MODELGRID_MAX_PROMPT_TOKENS", "longest prompt accepted, in tokens")
    # largest max_tokens a request may ask for
    max_tokens_cap: int = setting(4096, "MODELGRID_MAX_TOKENS_CAP", "largest max_tokens a request may ask for")
    # a request (the whole generation stream) ends with DEADLINE_EXCEEDED after this long
    max_request_s: float = setting(600.0, "MODELGRID_MAX_REQUEST_S", "longest a request may run, in seconds")
    # how long a resolved version (alias -> version) is reused before asking the registry again
    version_cache_s: float = setting(2.0, "MODELGRID_GATEWAY_VERSION_CACHE_S", "seconds to cache resolved versions")
    # each request gets a fresh route; the last one stands in this long while the scheduler cannot answer
    route_cache_s: float = setting(
        30.0, "MODELGRID_GATEWAY_ROUTE_CACHE_S", "seconds the last route stands in while the scheduler is down"
    )
    # re-routes (with replay) a generation survives before it fails with UNAVAILABLE
    max_failovers: int = setting(3, "MODELGRID_GATEWAY_MAX_FAILOVERS", "re-routes a request may take on failures")
    # "required": every call but health needs an API key; "disabled": only behind another auth layer
    auth: str = setting("required", "MODELGRID_AUTH", "API keys: required | disabled (behind another auth layer)")
    # how long a key's verification is reused: a revoked key stops working within this time
    auth_cache_s: float = setting(2.0, "MODELGRID_GATEWAY_AUTH_CACHE_S", "seconds to cache an API key's check")
    # the window of the per-key limits ("per minute"); shorter only for tests and demos
    rate_window_s: float = setting(60.0, "MODELGRID_RATE_WINDOW_S", "window of per-key rate limits, in seconds")
    # generation streams this gateway serves at once; more get RESOURCE_EXHAUSTED (0 = unlimited)
    max_sessions: int = setting(256, "MODELGRID_GATEWAY_MAX_SESSIONS", "concurrent generation streams (0 = no cap)")
    # largest gRPC message a client may send (uploads arrive in chunks well below it)
    max_request_bytes: int = setting(
        MAX_MESSAGE_BYTES, "MODELGRID_GATEWAY_MAX_REQUEST_BYTES", "largest gRPC request message, in bytes"
    )
    # batch jobs (services/gateway/job_runner.py): tasks this gateway runs at once; 0 runs none here
    job_lanes: int = setting(8, "MODELGRID_GATEWAY_JOB_LANES", "batch-job tasks run at once (0: none here)")
    # one task's deadline (all its items), after which it fails and runs again elsewhere
    job_task_timeout_s: float = setting(
        600.0, "MODELGRID_GATEWAY_JOB_TASK_TIMEOUT_S", "deadline of one batch-job task, in seconds"
    )
    # generations of one generate task in flight at once (the workers batch them)
    job_generate_concurrency: int = setting(
        16, "MODELGRID_GATEWAY_JOB_GENERATE_CONCURRENCY", "generations of one batch-job task at once"
    )
    # the most items one job may have
    max_job_items: int = setting(1_000_000, "MODELGRID_GATEWAY_MAX_JOB_ITEMS", "most items one batch job may have")
    # seconds in-flight calls get to finish after SIGTERM
    grace_s: float = setting(30.0, "MODELGRID_GATEWAY_GRACE_S", "seconds to drain in-flight calls on SIGTERM")
    log_level: str = setting("INFO", "MODELGRID_LOG_LEVEL", "log level: DEBUG, INFO, WARNING, ERROR")

    def validate(self) -> None:
        """Raise ValueError saying what to pass instead, for any value the gateway cannot run with."""
        for flag in ("listen", "registry", "scheduler"):
            _check_address(flag, getattr(self, flag))
        if self.metrics_port < -1 or self.metrics_port > 65535:
            raise ValueError(f"--metrics-port must be -1 (off), 0 (any) or a port, got {self.metrics_port}")
        if self.http_port < -1 or self.http_port > 65535:
            raise ValueError(f"--http-port must be -1 (off), 0 (any) or a port, got {self.http_port}")
        if self.http_max_body_bytes < 1024:
            raise ValueError(f"--http-max-body-bytes must be >= 1024, got {self.http_max_body_bytes}")
        if self.max_tokens_cap < 1:
            raise ValueError(f"--max-tokens-cap must be >= 1, got {self.max_tokens_cap}")
        if not 1 <= self.default_max_tokens <= self.max_tokens_cap:
            raise ValueError(
                f"--default-max-tokens must be in [1, --max-tokens-cap={self.max_tokens_cap}], "
                f"got {self.default_max_tokens}"
            )
        if self.max_prompt_tokens < 1:
            raise ValueError(f"--max-prompt-tokens must be >= 1, got {self.max_prompt_tokens}")
        if self.max_request_s <= 0:
            raise ValueError(f"--max-request-s must be > 0, got {self.max_request_s}")
        if self.version_cache_s < 0 or self.route_cache_s < 0:
            raise ValueError("--version-cache-s and --route-cache-s must be >= 0 (0 disables the cache)")
        if self.max_failovers < 0:
            raise ValueError(f"--max-failovers must be >= 0, got {self.max_failovers}")
        if self.grace_s < 0:
            raise ValueError(f"--grace-s must be >= 0, got {self.grace_s}")
        if self.job_lanes < 0 or self.job_generate_concurrency < 1 or self.max_job_items < 1:
            raise ValueError("--job-lanes must be >= 0, --job-generate-concurrency and --max-job-items >= 1")
        if self.job_task_timeout_s <= 0:
            raise ValueError(f"--job-task-timeout-s must be > 0, got {self.job_task_timeout_s}")
        if self.auth not in ("required", "disabled"):
            raise ValueError(f"--auth must be 'required' or 'disabled', got {self.auth!r}")
        if self.auth_cache_s < 0 or self.rate_window_s <= 0:
            raise ValueError("--auth-cache-s must be >= 0 and --rate-window-s > 0")
        if self.max_sessions < 0:
            raise ValueError(f"--max-sessions must be >= 0 (0 = no cap), got {self.max_sessions}")
        if not MIN_REQUEST_BYTES <= self.max_request_bytes <= MAX_MESSAGE_BYTES:
            raise ValueError(
                f"--max-request-bytes must be in [{MIN_REQUEST_BYTES}, {MAX_MESSAGE_BYTES}] (uploads arrive in "
                f"{CHUNK_BYTES}-byte chunks; the services' own limit is {MAX_MESSAGE_BYTES}), "
                f"got {self.max_request_bytes}"
            )
