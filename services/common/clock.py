"""Wall-clock time as the services store it (Redis records, job rows): integer unix milliseconds."""

from __future__ import annotations

import time


def now_ms() -> int:
    return int(time.time() * 1000)
