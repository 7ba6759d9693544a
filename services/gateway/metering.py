"""What the gateway's generations and embeddings cost and how fast they go: Prometheus metrics, the
recent traffic per model (Gateway.GetStats, for `modelgrid status`), and the tokens charged to the
caller's key (services/gateway/limits.py).

Every front end (gRPC, HTTP) goes through GatewayApp.generate / GatewayApp.embed, which wrap their
work in `Meter.generation` / `Meter.embedding`, so all of them are measured the same way.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, Callable, TypeVar

from prometheus_client import Counter, Gauge, Histogram

from services.gateway.domain import Chunk
from services.gateway.limits import current_admission

T = TypeVar("T")

TTFT = Histogram(
    "modelgrid_gateway_time_to_first_token_seconds",
    "From admitting a Generate call to its first generated token (prefill included), by model",
    ["model"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
INTER_TOKEN = Histogram(
    "modelgrid_gateway_inter_token_seconds",
    "Time between consecutive generated tokens of one stream, by model",
    ["model"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
TOKENS = Counter(
    "modelgrid_gateway_tokens_total",
    "Tokens in (prompts, embedded texts) and out (generated), by model",
    ["model", "direction"],
)
ACTIVE_STREAMS = Gauge("modelgrid_gateway_active_streams", "Generation streams open now")
REJECTED = Counter(
    "modelgrid_gateway_rejected_total",
    "Calls refused before any work: unauthenticated, permission_denied, or the limit that refused them",
    ["reason"],
)

STATS_WINDOW_S = 60


@dataclass
class _Second:
    """One second of one model's traffic."""

    at: int  # whole seconds (monotonic)
    requests: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(frozen=True)
class ModelTraffic:
    model: str
    requests: int
    errors: int
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Traffic:
    """Per-model counts of the last window_s seconds, in one-second buckets."""

    window_s: int = STATS_WINDOW_S
    clock: Callable[[], float] = time.monotonic
    started: float = field(default_factory=time.monotonic)
    requests_total: int = 0
    _models: dict[str, deque[_Second]] = field(default_factory=dict)

    def record(self, model: str, ok: bool, prompt_tokens: int, completion_tokens: int) -> None:
        self.requests_total += 1
        now = int(self.clock())
        seconds = self._models.setdefault(model, deque())
        if not seconds or seconds[-1].at != now:
            seconds.append(_Second(now))
        self._trim(seconds, now)
        bucket = seconds[-1]
        bucket.requests += 1
        bucket.errors += 0 if ok else 1
        bucket.prompt_tokens += prompt_tokens
        bucket.completion_tokens += completion_tokens

    def snapshot(self) -> list[ModelTraffic]:
        now = int(self.clock())
        out = []
        for model in sorted(self._models):
            seconds = self._models[model]
            self._trim(seconds, now)
            if not seconds:
                del self._models[model]
                continue
            out.append(ModelTraffic(
                model,
                sum(s.requests for s in seconds),
                sum(s.errors for s in seconds),
                sum(s.prompt_tokens for s in seconds),
                sum(s.completion_tokens for s in seconds),
            ))
        return out

    def _trim(self, seconds: deque[_Second], now: int) -> None:
        while seconds and seconds[0].at <= now - self.window_s:
            seconds.popleft()


class Meter:
    """Measures generations and embeddings (see the module doc)."""

    def __init__(self, traffic: Traffic | None = None) -> None:
        self.traffic = traffic or Traffic()
        self.active_streams = 0

    async def generation(self, model: str, prompt_tokens: int, chunks: AsyncIterator[Chunk]) -> AsyncIterator[Chunk]:
        """Pass the chunks through, timing them and counting their tokens."""
        admission = current_admission()
        started = admission.started if admission is not None else time.monotonic()
        TOKENS.labels(model, "in").inc(prompt_tokens)
        if admission is not None:
            await admission.charge(prompt_tokens)
        ttft, gaps, out = TTFT.labels(model), INTER_TOKEN.labels(model), TOKENS.labels(model, "out")
        generated, ok, last = 0, False, started
        self.active_streams += 1
        ACTIVE_STREAMS.inc()
        try:
            async for chunk in chunks:
                now = time.monotonic()
                (ttft if generated == 0 else gaps).observe(now - last)
                last = now
                generated += 1
                out.inc()
                if admission is not None:
                    await admission.charge(1)
                yield chunk
            ok = True
        except (asyncio.CancelledError, GeneratorExit):
            ok = True  # the client went away: not a failure of ours
            raise
        finally:
            self.active_streams -= 1
            ACTIVE_STREAMS.dec()
            self.traffic.record(model, ok, prompt_tokens, generated)

    async def embedding(self, model: str, work: Awaitable[T], tokens: Callable[[T], int]) -> T:
        """Await work (an embedding call), counting its tokens (tokens(result)) in."""
        admission = current_admission()
        try:
            result = await work
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except BaseException:
            self.traffic.record(model, False, 0, 0)
            raise
        n = tokens(result)
        TOKENS.labels(model, "in").inc(n)
        self.traffic.record(model, True, n, 0)
        if admission is not None:
            await admission.charge(n)
        return result
