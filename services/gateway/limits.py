"""Limits on callers: per-key quotas shared by every gateway through Redis, and this gateway's session cap.

    async with limiter.admit(principal, stream=True, tokens=True) as admission:   # RESOURCE_EXHAUSTED
        ...
        await admission.charge(n_tokens)     # or current_admission().charge(...) deeper down

Per key (limits from the registry; 0 = unlimited), atomically in one Lua script per call:
  requests per window  a token bucket of `requests_per_minute` requests refilled evenly over the window
                       (a minute; --rate-window-s), so a key can burst its whole quota, then one request
                       every window/quota seconds;
  tokens per window    a bucket of `tokens_per_minute` tokens: a call that spends tokens is admitted while
                       the bucket holds at least one, and its prompt and generated tokens are charged as
                       they come (the bucket may go into debt, which later calls wait out);
  streams              a sorted set of open generation streams, each with a lease of the longest a
                       request may run (so the streams of a crashed gateway expire).
Per gateway: at most max_sessions generation streams at once.

Refusals raise RateLimited (RESOURCE_EXHAUSTED) saying which limit and when to retry; its
`trailing_metadata` carries `retry-after-s` (whole seconds). Time is Redis's own clock, so gateways
with skewed clocks agree. When Redis is unreachable the per-key limits are not enforced (logged):
serving beats refusing everyone.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from contextlib import asynccontextmanager
from contextvars import ContextVar
from typing import Any, AsyncIterator

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from modelgrid.errors import ResourceExhausted
from services.gateway.auth import Principal

log = logging.getLogger(__name__)

RETRY_HEADER = "retry-after-s"
PREFIX = "modelgrid:limits"
FLUSH_TOKENS = 256  # charge Redis at least every this many tokens of a long stream
REDIS_TIMEOUT_S = 2.0
WARN_EVERY_S = 30.0

# KEYS: requests bucket, tokens bucket, streams set.
# ARGV: requests limit, tokens limit (0 = not checked), streams limit, window ms, stream id ("" = none), lease ms.
# Returns {1} when admitted, else {0, the limit that refuses, milliseconds to wait}.
_ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[4])
local function level(key, limit)
  local v = redis.call('HMGET', key, 'level', 'at')
  if not v[1] then return limit end
  return math.min(limit, tonumber(v[1]) + (now - tonumber(v[2])) * limit / window)
end
local rpm, tpm, streams, lease = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[6])
local requests = 0
if rpm > 0 then
  requests = level(KEYS[1], rpm)
  if requests < 1 then return {0, 'requests', math.ceil((1 - requests) * window / rpm)} end
end
if tpm > 0 then
  local tokens = level(KEYS[2], tpm)
  if tokens < 1 then return {0, 'tokens', math.ceil((1 - tokens) * window / tpm)} end
end
if streams > 0 and ARGV[5] ~= '' then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
  if redis.call('ZCARD', KEYS[3]) >= streams then
    local first = redis.call('ZRANGE', KEYS[3], 0, 0, 'WITHSCORES')
    return {0, 'streams', math.min(1000, tonumber(first[2]) - now)}
  end
  redis.call('ZADD', KEYS[3], now + lease, ARGV[5])
  redis.call('PEXPIRE', KEYS[3], lease)
end
if rpm > 0 then
  redis.call('HSET', KEYS[1], 'level', tostring(requests - 1), 'at', now)
  redis.call('PEXPIRE', KEYS[1], window)
end
return {1}
"""

# KEYS: tokens bucket. ARGV: tokens limit, window ms, tokens spent.
_CHARGE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local limit, window, spent = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local v = redis.call('HMGET', KEYS[1], 'level', 'at')
local level = limit
if v[1] then level = math.min(limit, tonumber(v[1]) + (now - tonumber(v[2])) * limit / window) end
level = level - spent
redis.call('HSET', KEYS[1], 'level', tostring(level), 'at', now)
redis.call('PEXPIRE', KEYS[1], math.ceil((limit - level) * window / limit) + 1000)
return 1
"""

WHAT = {"requests": "requests per minute", "tokens": "tokens per minute", "streams": "concurrent streams"}


class RateLimited(ResourceExhausted):
    """A limit refused the call; retry_after_s says when a retry can succeed."""

    def __init__(self, message: str, retry_after_s: float, limit: str) -> None:
        self.retry_after_s = max(1, math.ceil(retry_after_s))
        self.limit = limit  # "requests" | "tokens" | "streams" | "sessions"
        super().__init__(f"{message}; retry in {self.retry_after_s} s")

    @property
    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return ((RETRY_HEADER, str(self.retry_after_s)),)


class Admission:
    """One admitted call: the tokens it spends and the slots it holds, released by RateLimiter.admit."""

    def __init__(self, limiter: RateLimiter, principal: Principal, stream_id: str | None, session: bool) -> None:
        self.principal = principal
        self.started = time.monotonic()  # when the call was admitted (for time to first token)
        self._limiter = limiter
        self._stream_id = stream_id  # our member of the key's streams set, if we hold one
        self._session = session  # we hold one of the gateway's session slots
        self._pending = 0  # tokens spent and not yet charged to the key

    async def charge(self, tokens: int) -> None:
        """Count tokens against the key's tokens per window (sent to Redis in batches)."""
        if tokens <= 0 or not self.principal.limits.tokens_per_minute:
            return
        self._pending += tokens
        if self._pending >= FLUSH_TOKENS:
            await self.flush()

    async def flush(self) -> None:
        pending, self._pending = self._pending, 0
        if pending:
            await self._limiter.charge(self.principal, pending)

    async def close(self) -> None:
        try:
            await self.flush()
        finally:
            if self._session:
                self._session = False
                self._limiter.sessions -= 1
            if self._stream_id is not None:
                stream_id, self._stream_id = self._stream_id, None
                await self._limiter.release_stream(self.principal, stream_id)


_admission: ContextVar[Admission | None] = ContextVar("modelgrid_admission", default=None)


def current_admission() -> Admission | None:
    """The admission of the call handled in this context (None outside RateLimiter.admit)."""
    return _admission.get()


class RateLimiter:
    """Per-key limits in Redis plus this gateway's session cap (see the module doc)."""

    def __init__(self, redis_url: str, window_s: float = 60.0, max_sessions: int = 0, lease_s: float = 600.0) -> None:
        self.window_ms = max(1, int(window_s * 1000))
        self.max_sessions = max_sessions  # 0 = unlimited
        self.lease_ms = max(1000, int(lease_s * 1000))
        self.sessions = 0  # generation streams open on this gateway
        self._url = redis_url
        self._redis: aioredis.Redis | None = None
        self._scripts: dict[str, Any] = {}
        self._warned = -math.inf

    def _client(self) -> aioredis.Redis:
        if self._redis is None:
            self._redis = aioredis.Redis.from_url(
                self._url, socket_timeout=REDIS_TIMEOUT_S, socket_connect_timeout=REDIS_TIMEOUT_S
            )
            self._scripts = {"admit": self._redis.register_script(_ADMIT),
                             "charge": self._redis.register_script(_CHARGE)}
        return self._redis

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None

    @staticmethod
    def _keys(principal: Principal) -> list[str]:
        tag = f"{PREFIX}:{{{principal.key_id}}}"  # one hash tag: a script's keys share a Redis Cluster slot
        return [f"{tag}:requests", f"{tag}:tokens", f"{tag}:streams"]

    @asynccontextmanager
    async def admit(self, principal: Principal, stream: bool = False, tokens: bool = False) -> AsyncIterator[Admission]:
        """Admit one call or raise RateLimited. stream: the call holds a generation stream until the block
        ends; tokens: it spends tokens (checked against the key's tokens per window)."""
        admission = await self._enter(principal, stream, tokens)
        reset = _admission.set(admission)
        try:
            yield admission
        finally:
            try:
                _admission.reset(reset)
            except ValueError:  # closed from another context
                pass
            await asyncio.shield(admission.close())

    async def _enter(self, principal: Principal, stream: bool, tokens: bool) -> Admission:
        if stream and self.max_sessions and self.sessions >= self.max_sessions:
            raise RateLimited(
                f"this gateway is serving its maximum of {self.max_sessions} generation sessions", 1.0, "sessions"
            )
        limits = principal.limits
        stream_id = uuid.uuid4().hex if stream and limits.max_streams else None
        tpm = limits.tokens_per_minute if tokens else 0
        if principal.key_id and (limits.requests_per_minute or tpm or stream_id):
            verdict = await self._check(principal, tpm, stream_id)
            if verdict is None:  # Redis failed: nothing was recorded there
                stream_id = None
            elif verdict[0] != "ok":
                which, wait_ms = verdict
                limit = {"requests": limits.requests_per_minute, "tokens": tpm, "streams": limits.max_streams}[which]
                raise RateLimited(
                    f"API key {principal.name!r} is over its limit of {limit} {WHAT[which]}", wait_ms / 1000, which
                )
        if stream:
            self.sessions += 1
        return Admission(self, principal, stream_id, session=stream)

    async def _check(self, principal: Principal, tpm: int, stream_id: str | None) -> tuple[str, int] | None:
        """("ok", 0), (the limit that refuses, ms to wait), or None when Redis cannot be asked."""
        limits = principal.limits
        args = [limits.requests_per_minute, tpm, limits.max_streams, self.window_ms, stream_id or "", self.lease_ms]
        try:
            self._client()
            reply = await self._scripts["admit"](keys=self._keys(principal), args=args)
        except (RedisError, OSError) as err:
            self._redis_failed(err)
            return None
        if int(reply[0]) == 1:
            return "ok", 0
        which = reply[1].decode() if isinstance(reply[1], bytes) else str(reply[1])
        return which, int(reply[2])

    async def charge(self, principal: Principal, tokens: int) -> None:
        args = [principal.limits.tokens_per_minute, self.window_ms, tokens]
        try:
            self._client()
            await self._scripts["charge"](keys=self._keys(principal)[1:2], args=args)
        except (RedisError, OSError) as err:
            self._redis_failed(err)

    async def release_stream(self, principal: Principal, stream_id: str) -> None:
        try:
            await self._client().zrem(self._keys(principal)[2], stream_id)
        except (RedisError, OSError) as err:
            self._redis_failed(err)

    def _redis_failed(self, err: Exception) -> None:
        now = time.monotonic()
        if now - self._warned >= WARN_EVERY_S:
            self._warned = now
            log.warning("rate limits are not enforced: Redis at %s fails (%s: %s)", self._url, type(err).__name__, err)
        client, self._redis = self._redis, None  # a fresh connection on the next call
        if client is not None:
            asyncio.ensure_future(client.aclose())
