"""Logging set-up, called once from each service's main()."""

from __future__ import annotations

import logging


def configure_logging(level: str = "INFO", service: str = "") -> None:
    """Plain one-line logs on stderr: time, level, service, logger, message."""
    prefix = f"{service} " if service else ""
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format=f"%(asctime)s %(levelname)s {prefix}%(name)s: %(message)s",
    )
    logging.getLogger("asyncio").setLevel(logging.WARNING)
