"""`python -m services.registry`: the registry service."""

from __future__ import annotations

import asyncio
import sys

from services.common.logs import configure_logging
from services.common.metrics import start_metrics_server
from services.common.server import serve_forever
from services.common.settings import parse_settings
from services.registry.app import start_registry
from services.registry.config import RegistryConfig


async def _serve(config: RegistryConfig) -> None:
    running = await start_registry(config)
    try:
        await serve_forever(running, config.grace_s)
    finally:
        if running.registry is not None:
            running.registry.db.close()


def main(argv: list[str] | None = None) -> int:
    config = parse_settings(RegistryConfig, argv)
    configure_logging(config.log_level, "registry")
    start_metrics_server(config.metrics_port)
    asyncio.run(_serve(config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
