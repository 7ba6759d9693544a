"""Logging set-up, called once from each service's main()."""

from __future__ import annotations

import faulthandler
import logging
import signal
import sys

from services.common.tracing import RequestIdFilter


def configure_logging(level: str = "INFO", service: str = "") -> None:
    """Plain one-line logs on stderr: time, level, service, logger, [request id,] message."""
    prefix = f"{service} " if service else ""
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format=f"%(asctime)s %(levelname)s {prefix}%(name)s%(request_tag)s: %(message)s",
    )
    for handler in logging.getLogger().handlers:  # " [<request id>]" on the lines of a request
        handler.addFilter(RequestIdFilter())
    logging.getLogger("asyncio").setLevel(logging.WARNING)
    logging.getLogger("grpc._cython").setLevel(logging.INFO)  # a DEBUG line per call about its event loop
    # `kill -USR1 <pid>` prints every thread's stack to stderr: for a process that hangs.
    faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)
