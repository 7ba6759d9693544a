"""GatewayConfig: every setting of the gateway, from flags and environment (names fixed by the team brief)."""

from __future__ import annotations

from dataclasses import dataclass

from services.common.settings import setting


def _check_address(flag: str, value: str) -> None:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"--{flag} must be host:port (e.g. 127.0.0.1:50052), got {value!r}")


@dataclass
class GatewayConfig:
    """ModelGrid gateway: the public gRPC API (generation, embeddings, admin proxies)."""

    # host:port the gRPC server binds; port 0 picks a free port (tests)
    listen: str = setting("0.0.0.0:50051", "MODELGRID_GATEWAY_LISTEN", "gRPC listen address host:port")
    # Prometheus /metrics over HTTP; -1 disables it, 0 picks a free port
    metrics_port: int = setting(9091, "MODELGRID_GATEWAY_METRICS_PORT", "Prometheus metrics port (-1 disables)")
    registry: str = setting("127.0.0.1:50052", "MODELGRID_REGISTRY_ADDR", "registry address host:port")
    scheduler: str = setting("127.0.0.1:50053", "MODELGRID_SCHEDULER_ADDR", "scheduler address host:port")
    # Redis for rate limits (not used by the gateway yet; kept so every deployment passes the same flags)
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
    # how long a route is reused (it is dropped at once on a failure or an epoch change)
    route_cache_s: float = setting(5.0, "MODELGRID_GATEWAY_ROUTE_CACHE_S", "seconds to cache a route")
    # re-routes (with replay) a generation survives before it fails with UNAVAILABLE
    max_failovers: int = setting(3, "MODELGRID_GATEWAY_MAX_FAILOVERS", "re-routes a request may take on failures")
    # seconds in-flight calls get to finish after SIGTERM
    grace_s: float = setting(30.0, "MODELGRID_GATEWAY_GRACE_S", "seconds to drain in-flight calls on SIGTERM")
    log_level: str = setting("INFO", "MODELGRID_LOG_LEVEL", "log level: DEBUG, INFO, WARNING, ERROR")

    def validate(self) -> None:
        """Raise ValueError saying what to pass instead, for any value the gateway cannot run with."""
        for flag in ("listen", "registry", "scheduler"):
            _check_address(flag, getattr(self, flag))
        if self.metrics_port < -1 or self.metrics_port > 65535:
            raise ValueError(f"--metrics-port must be -1 (off), 0 (any) or a port, got {self.metrics_port}")
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
