"""Prometheus metrics shared by every service: request counts and latency by method and status code."""

from __future__ import annotations

import time
from typing import Any, Awaitable, Callable

import grpc
from prometheus_client import Counter, Histogram, start_http_server

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


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts every RPC by method and final status code, and times it."""

    def __init__(self, service: str) -> None:
        self.service = service

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler
        method = details.method.rsplit("/", 1)[-1]
        labels = (self.service, method)

        def record(context: grpc.aio.ServicerContext, start: float, failed: BaseException | None) -> None:
            LATENCY.labels(*labels).observe(time.perf_counter() - start)
            REQUESTS.labels(*labels, _code(context, failed)).inc()

        def wrap_unary(behavior: Callable[..., Any]) -> Callable[..., Any]:
            async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
                start, failed = time.perf_counter(), None
                try:
                    return await behavior(request, context)
                except BaseException as err:
                    failed = err
                    raise
                finally:
                    record(context, start, failed)

            return wrapped

        def wrap_stream(behavior: Callable[..., Any]) -> Callable[..., Any]:
            async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
                start, failed = time.perf_counter(), None
                try:
                    async for item in behavior(request, context):
                        yield item
                except BaseException as err:
                    failed = err
                    raise
                finally:
                    record(context, start, failed)

            return wrapped

        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                wrap_unary(handler.unary_unary), handler.request_deserializer, handler.response_serializer
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                wrap_stream(handler.unary_stream), handler.request_deserializer, handler.response_serializer
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                wrap_unary(handler.stream_unary), handler.request_deserializer, handler.response_serializer
            )
        return grpc.stream_stream_rpc_method_handler(
            wrap_stream(handler.stream_stream), handler.request_deserializer, handler.response_serializer
        )
