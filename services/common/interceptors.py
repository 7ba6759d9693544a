"""Run code around every call of a grpc.aio server, whatever the method's kind (unary or streaming).

`wrap_handler(handler, around)` returns a handler whose behaviour runs inside `around(context)`, an
async context manager: code before its `yield` runs before the method, code after it once the
method (for streams: the whole stream) has ended, and it sees the exception that ended it.
`AroundInterceptor` is a server interceptor built on it: the metrics and request-id interceptors of
services/common and the gateway's auth (services/gateway/guard.py) subclass it.
"""

from __future__ import annotations

from typing import Any, AsyncContextManager, Awaitable, Callable

import grpc

Around = Callable[[grpc.aio.ServicerContext], AsyncContextManager[None]]


def _unary(behavior: Callable[..., Any], around: Around) -> Callable[..., Any]:
    async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
        async with around(context):
            return await behavior(request, context)

    return wrapped


def _stream(behavior: Callable[..., Any], around: Around) -> Callable[..., Any]:
    async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
        async with around(context):
            async for item in behavior(request, context):
                yield item

    return wrapped


def wrap_handler(handler: grpc.RpcMethodHandler, around: Around) -> grpc.RpcMethodHandler:
    """The same method with its behaviour run inside around(context)."""
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(
            _unary(handler.unary_unary, around), handler.request_deserializer, handler.response_serializer
        )
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(
            _stream(handler.unary_stream, around), handler.request_deserializer, handler.response_serializer
        )
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(
            _unary(handler.stream_unary, around), handler.request_deserializer, handler.response_serializer
        )
    return grpc.stream_stream_rpc_method_handler(
        _stream(handler.stream_stream, around), handler.request_deserializer, handler.response_serializer
    )


class AroundInterceptor(grpc.aio.ServerInterceptor):
    """A server interceptor that runs each call inside what `around(details)` returns (None: the call as is)."""

    def around(self, details: grpc.HandlerCallDetails) -> Around | None:
        raise NotImplementedError

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        around = self.around(details) if handler is not None else None
        return handler if around is None else wrap_handler(handler, around)
