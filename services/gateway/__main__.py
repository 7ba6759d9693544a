"""`python -m services.gateway`: the public gateway (flags/env in services/gateway/config.py)."""

from __future__ import annotations

import asyncio
import logging
import sys

from services.common.logs import configure_logging
from services.common.metrics import start_metrics_server
from services.common.server import serve_forever
from services.common.settings import parse_settings
from services.gateway.app import GatewayApp, start_gateway, stop_gateway
from services.gateway.config import GatewayConfig

__all__ = ["GatewayApp", "main", "start_gateway", "stop_gateway"]

log = logging.getLogger("services.gateway")


async def run(config: GatewayConfig) -> None:
    running, app = await start_gateway(config)

    async def drain_http() -> None:  # the HTTP API drains alongside the gRPC server
        app.stop_http()

    try:
        # in-flight generations drain first; the downstream channels close after
        await serve_forever(running, config.grace_s, on_stop=drain_http)
    finally:
        await app.stop_http()
        await app.close()


def main(argv: list[str] | None = None) -> int:
    config = parse_settings(GatewayConfig, argv)
    configure_logging(config.log_level, "gateway")
    try:
        port = start_metrics_server(config.metrics_port)
        if port > 0:
            log.info("metrics on :%d/metrics", port)
        asyncio.run(run(config))
    except OSError as err:  # a port in use, ...
        log.error("gateway cannot start: %s", err)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
