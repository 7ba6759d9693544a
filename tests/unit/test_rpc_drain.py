"""services.common.rpc: a client-streaming call that fails is drained, within a bound, before it answers."""

from __future__ import annotations

import asyncio
import time
from typing import AsyncIterator

from services.common.rpc import drain


async def test_drain_reads_what_the_client_still_sends() -> None:
    read: list[int] = []

    async def chunks() -> AsyncIterator[int]:
        for i in range(5):
            read.append(i)
            yield i

    await drain(chunks(), seconds=5)
    assert read == [0, 1, 2, 3, 4]


async def test_drain_gives_up_on_a_client_that_never_ends() -> None:
    async def endless() -> AsyncIterator[int]:
        while True:
            await asyncio.sleep(0.01)
            yield 0

    started = time.monotonic()
    await drain(endless(), seconds=0.2)
    assert time.monotonic() - started < 5
