"""RegistryConfig: every setting of the registry service, from flags and environment variables."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from modelgrid.errors import InvalidArgument
from services.common.settings import setting

GIB = 1024**3


@dataclass
class RegistryConfig:
    """ModelGrid registry: models, versions, aliases and their artifacts."""

    # host:port of the gRPC server; port 0 picks a free port (tests)
    listen: str = setting("0.0.0.0:50052", "MODELGRID_REGISTRY_LISTEN", "gRPC listen address host:port")
    # Prometheus /metrics over HTTP; -1 disables it, 0 picks a free port
    metrics_port: int = setting(9092, "MODELGRID_REGISTRY_METRICS_PORT", "Prometheus metrics port (-1 disables)")
    # SQLAlchemy URL; empty = a SQLite file <data-dir>/registry.db
    db_url: str = setting(
        "", "MODELGRID_DB_URL", "database URL, e.g. postgresql+psycopg://user@host/db (empty: SQLite in --data-dir)"
    )
    # root of the registry's files: artifacts under <data-dir>/artifacts/<model>/<version>/
    data_dir: str = setting("./modelgrid-data", "MODELGRID_DATA_DIR", "directory for artifacts (and the SQLite file)")
    # the largest upload accepted, all files together
    max_upload_bytes: int = setting(
        64 * GIB, "MODELGRID_REGISTRY_MAX_UPLOAD_BYTES", "largest accepted upload in bytes, all files together"
    )
    # the most files one upload may carry
    max_upload_files: int = setting(256, "MODELGRID_REGISTRY_MAX_UPLOAD_FILES", "most files one upload may carry")
    # the first admin API key: stored (hashed) when no active admin key exists (services/registry/keys.py)
    bootstrap_api_key: str = setting(
        "", "MODELGRID_BOOTSTRAP_API_KEY", "first admin API key, added when no admin key exists (prefer the env)"
    )
    # seconds in-flight calls get to finish after SIGTERM
    grace_s: float = setting(10.0, "MODELGRID_REGISTRY_GRACE_S", "seconds to drain in-flight calls on SIGTERM")
    log_level: str = setting("INFO", "MODELGRID_LOG_LEVEL", "log level: DEBUG, INFO, WARNING, ERROR")

    def validate(self) -> None:
        """Reject values the service cannot run with, saying what to pass instead."""
        host, sep, port = self.listen.rpartition(":")
        if not sep or not host or not port.isdigit() or int(port) > 65535:
            raise ValueError(f"--listen must be host:port (e.g. 0.0.0.0:50052), got {self.listen!r}")
        if self.metrics_port < -1 or self.metrics_port > 65535:
            raise ValueError(f"--metrics-port must be -1 (off), 0 (any) or a port, got {self.metrics_port}")
        if not self.data_dir:
            raise ValueError("--data-dir must not be empty")
        if self.max_upload_bytes < 1:
            raise ValueError(f"--max-upload-bytes must be >= 1, got {self.max_upload_bytes}")
        if self.max_upload_files < 1:
            raise ValueError(f"--max-upload-files must be >= 1, got {self.max_upload_files}")
        if self.grace_s < 0:
            raise ValueError(f"--grace-s must be >= 0, got {self.grace_s}")
        if self.bootstrap_api_key:
            from services.registry.keys import check_secret

            try:
                check_secret(self.bootstrap_api_key, "--bootstrap-api-key / MODELGRID_BOOTSTRAP_API_KEY")
            except InvalidArgument as err:
                raise ValueError(err.message) from None
        if self.db_url and "://" not in self.db_url:
            raise ValueError(
                f"--db-url must be a SQLAlchemy URL such as sqlite:////path/registry.db or "
                f"postgresql+psycopg://user@host:5432/db, got {self.db_url!r}"
            )

    @property
    def artifacts_dir(self) -> Path:
        return Path(self.data_dir) / "artifacts"

    def database_url(self) -> str:
        """The configured URL, or a SQLite file in the data dir."""
        if self.db_url:
            return self.db_url
        return f"sqlite:///{(Path(self.data_dir) / 'registry.db').resolve()}"
