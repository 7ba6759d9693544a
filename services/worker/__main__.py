"""`python -m services.worker`: one worker process (flags/env in services/worker/config.py)."""

from __future__ import annotations

import asyncio
import logging
import sys

from services.common.logs import configure_logging
from services.common.metrics import start_metrics_server
from services.common.server import serve_forever
from services.common.settings import parse_settings
from services.worker.config import WorkerConfig

log = logging.getLogger("services.worker")


async def run(config: WorkerConfig) -> None:
    from services.worker.app import start_worker  # imports torch: after argument parsing

    running, app = await start_worker(config)
    try:
        await serve_forever(running, config.grace_s, on_stop=lambda: app.drain(config.grace_s))
    finally:
        await app.close()


def main(argv: list[str] | None = None) -> int:
    config = parse_settings(WorkerConfig, argv)
    configure_logging(config.log_level, "worker")
    try:
        port = start_metrics_server(config.metrics_port)
        if port > 0:
            log.info("metrics on :%d/metrics", port)
        asyncio.run(run(config))
    except (ValueError, OSError) as err:  # a bad --device, a port in use, ...
        log.error("worker cannot start: %s", err)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
