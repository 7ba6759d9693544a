"""`python -m services.scheduler`: parse config, log, metrics, serve until SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import sys

from services.common.logs import configure_logging
from services.common.metrics import start_metrics_server
from services.common.server import serve_forever
from services.common.settings import parse_settings
from services.scheduler.app import start_scheduler
from services.scheduler.config import SchedulerConfig

log = logging.getLogger("services.scheduler")


async def _serve(config: SchedulerConfig) -> None:
    running, controller = await start_scheduler(config)
    log.info(
        "scheduler serving on port %d (redis %s, registry %s, heartbeat %.1f s / ttl %.1f s)",
        running.port, config.redis_url, config.registry, config.heartbeat_interval_s, config.heartbeat_ttl_s,
    )
    try:
        await serve_forever(running, config.grace_s, on_stop=controller.stop)
    finally:
        await controller.close()


def main(argv: list[str] | None = None) -> int:
    config = parse_settings(SchedulerConfig, argv)
    configure_logging(config.log_level, "scheduler")
    port = start_metrics_server(config.metrics_port)
    if port >= 0:
        log.info("metrics on port %d", port)
    try:
        asyncio.run(_serve(config))
    except OSError as err:
        log.error("%s", err)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
