"""Per-key limits in a real Redis, shared by two gateways, and the gateway's own limits.

The rate window is a few seconds instead of a minute (--rate-window-s), so "after the window" is a short wait.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import grpc
import pytest

from modelgrid.channel import CHUNK_BYTES
from modelgrid.v1 import common_pb2, gateway_pb2
from services.gateway.auth import ANONYMOUS, KeyLimits, Principal
from services.gateway.limits import RateLimited, RateLimiter
from tests.integration.test_auth import BOOT, bearer, code_of, create_key, platform
from tests.support import free_port

pytestmark = pytest.mark.timeout(120)

WINDOW_S = 3.0


async def test_requests_per_minute_are_shared_by_two_gateways(tmp_path: Path, redis_url: str) -> None:
    async with platform(tmp_path, gateways=2, redis_url=redis_url, rate_window_s=WINDOW_S) as plat:
        key = await create_key(plat.stub(), "limited", limits=common_pb2.KeyLimits(requests_per_minute=3))
        request, md = common_pb2.ListModelsRequest(), bearer(key.secret)

        async def call(gateway: int):
            return plat.stub(gateway).ListModels(request, metadata=md, timeout=10)

        started = time.monotonic()
        for gateway in (0, 1, 0):  # the quota is the key's, wherever the requests land
            await (await call(gateway))
        refused = await call(1)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await refused
        err = info.value
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "API key 'limited' is over its limit of 3 requests per minute; retry in 1 s" in err.details()
        assert dict(err.trailing_metadata())["retry-after-s"] == "1"  # the bucket refills one per WINDOW_S / 3
        assert time.monotonic() - started < WINDOW_S / 3, "too slow a machine for this test's window"
        code, _ = await code_of(await call(0))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED

        await plat.stub(0).ListModels(request, metadata=bearer(BOOT))  # other keys are not affected
        await asyncio.sleep(WINDOW_S + 0.2)  # after the window the whole quota is back
        for gateway in (1, 0, 1):
            await (await call(gateway))
        code, details = await code_of(await call(0))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details


def principal(**limits: int) -> Principal:
    return Principal("key_test", "test", admin=False, limits=KeyLimits(**limits))


async def test_concurrent_streams_are_counted_across_gateways(redis_url: str) -> None:
    a, b = RateLimiter(redis_url, WINDOW_S), RateLimiter(redis_url, WINDOW_S)
    key = principal(max_streams=1)
    try:
        async with a.admit(key, stream=True):
            async with b.admit(key):  # not a stream: not counted
                pass
            with pytest.raises(RateLimited, match="over its limit of 1 concurrent streams") as info:
                async with b.admit(key, stream=True):
                    pass
            assert info.value.limit == "streams" and info.value.retry_after_s == 1
        async with b.admit(key, stream=True):  # released when the first stream ended
            pass
    finally:
        await a.close()
        await b.close()


async def test_tokens_per_minute_go_into_debt_and_wait_it_out(redis_url: str) -> None:
    limiter = RateLimiter(redis_url, window_s=2.0)
    key = principal(tokens_per_minute=10)
    try:
        async with limiter.admit(key, tokens=True) as admission:
            await admission.charge(15)  # allowed to finish: the bucket goes 5 tokens into debt
        async with limiter.admit(key):  # a call that spends no tokens is not held back
            pass
        with pytest.raises(RateLimited, match="over its limit of 10 tokens per minute") as info:
            async with limiter.admit(key, tokens=True):
                pass
        assert info.value.retry_after_s == 2  # (1 + 5 tokens) at 10 per 2 s: 1.2 s
        await asyncio.sleep(1.3)
        async with limiter.admit(key, tokens=True):
            pass
    finally:
        await limiter.close()


async def test_the_gateway_caps_its_sessions() -> None:
    limiter = RateLimiter("redis://127.0.0.1:1/0", max_sessions=1)  # no per-key limits: Redis is never asked
    async with limiter.admit(ANONYMOUS, stream=True):
        async with limiter.admit(ANONYMOUS):  # unary calls hold no session
            pass
        with pytest.raises(RateLimited, match="maximum of 1 generation sessions"):
            async with limiter.admit(ANONYMOUS, stream=True):
                pass
    assert limiter.sessions == 0
    async with limiter.admit(ANONYMOUS, stream=True):
        assert limiter.sessions == 1


async def test_limits_are_not_enforced_while_redis_is_down(caplog: pytest.LogCaptureFixture) -> None:
    limiter = RateLimiter(f"redis://127.0.0.1:{free_port()}/0")
    key = principal(requests_per_minute=1, max_streams=1)
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            async with limiter.admit(key, stream=True):
                pass
    assert "rate limits are not enforced" in caplog.text
    await limiter.close()


async def test_oversized_requests_are_refused(tmp_path: Path) -> None:
    limit = CHUNK_BYTES + 1024 * 1024
    async with platform(tmp_path, max_request_bytes=limit) as plat:
        request = gateway_pb2.EmbedRequest(model="m", texts=["x" * (limit + 1)])
        code, details = await code_of(plat.stub().Embed(request, metadata=bearer(BOOT), timeout=10))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "message larger than max" in details
