"""Prometheus metrics shared by every service: request counts and latency by method and status code."""

from __future__ import annotations

import time
from contextlib import asynccontextmanager
from typing import AsyncIterator

import grpc
from prometheus_client import Counter, Histogram, start_http_server

from services.common.interceptors import Around, AroundInterceptor

REQUESTS = Counter(
    "modelgrid_grpc_requests_total", "gRPC requests handled, by method and status code", ["service", "method", "code"]
)
LATENCY = Histogram(
    "modelgrid_grpc_request_seconds",
    "gRPC request latency (for streams: until the stream ends), by method",
    ["service", "method"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)


def start_metrics_server(port: int, host: str = "0.0.0.0") -> int:
    """Serve /metrics over HTTP on port (0 picks a free one); returns the port. A negative port disables it."""
    if port < 0:
        return -1
    server, _thread = start_http_server(port, addr=host)
    return int(server.server_address[1])


def _code(context: grpc.aio.ServicerContext, failed: BaseException | None) -> str:
    code = context.code()
    if code is None:
        if failed is None:
            return "OK"
        if isinstance(failed, Exception) and not isinstance(failed, grpc.aio.AbortError):
            return "UNKNOWN"
        return "CANCELLED"
    return code.name if isinstance(code, grpc.StatusCode) else str(code)


class MetricsInterceptor(AroundInterceptor):
    """Counts every RPC by method and final status code, and times it."""

    def __init__(self, service: str) -> None:
        self.service = service

    def around(self, details: grpc.HandlerCallDetails) -> Around:
        labels = (self.service, details.method.rsplit("/", 1)[-1])

        @asynccontextmanager
        async def measure(context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
            start, failed = time.perf_counter(), None
            try:
                yield
            except BaseException as err:
                failed = err
                raise
            finally:
                LATENCY.labels(*labels).observe(time.perf_counter() - start)
                REQUESTS.labels(*labels, _code(context, failed)).inc()

        return measure
