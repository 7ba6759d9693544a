"""Request ids: one id per client request, carried to every service the request reaches and put on their log lines.

The id travels as the gRPC metadata `x-request-id`. A server interceptor (every service's, through
create_server) reads it into a context variable for the duration of the call; the gateway, the public
face, makes one when the client sent none and returns it in the initial metadata. A client interceptor
on the services' channels (`traced_channel`) copies the context's id onto every outgoing call, so the
registry, scheduler and workers see the id of the request that caused the call. A logging filter
(installed by configure_logging) adds " [<id>]" to every line logged while a request is handled.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from contextlib import asynccontextmanager, contextmanager
from contextvars import ContextVar
from typing import Any, AsyncIterator, Iterator, Sequence

import grpc

from modelgrid.channel import GRPC_OPTIONS
from services.common.interceptors import Around, AroundInterceptor

log = logging.getLogger(__name__)

HEADER = "x-request-id"
# what a request id may look like (anything else from a client is replaced: ids end up in log lines)
VALID_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
# calls not worth a log line even at DEBUG (probes)
QUIET_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")

_request_id: ContextVar[str | None] = ContextVar("modelgrid_request_id", default=None)


def current_request_id() -> str | None:
    """The id of the request being handled in this context, if any."""
    return _request_id.get()


@contextmanager
def request_id(rid: str | None) -> Iterator[None]:
    """Log lines inside carry `rid` (a step's own request, in a call that carries many requests' steps)."""
    if not rid or not VALID_ID.match(rid):
        yield
        return
    token = _request_id.set(rid)
    try:
        yield
    finally:
        _request_id.reset(token)


def new_request_id() -> str:
    return uuid.uuid4().hex[:16]


def request_id_from(metadata: Sequence[tuple[str, Any]] | None) -> str | None:
    """A valid x-request-id from gRPC metadata, else None."""
    for key, value in metadata or ():
        if key == HEADER and isinstance(value, str) and VALID_ID.match(value):
            return value
    return None


class RequestIdFilter(logging.Filter):
    """Adds `request_id` ("-" outside a request) and `request_tag` (" [<id>]" or "") to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        rid = _request_id.get()
        record.request_id = rid or "-"
        record.request_tag = f" [{rid}]" if rid else ""
        return True


class TracingInterceptor(AroundInterceptor):
    """Sets the request id of each call; make_ids: invent one when the client sent none and send it back."""

    def __init__(self, service: str, make_ids: bool = False) -> None:
        self.service = service
        self.make_ids = make_ids

    def around(self, details: grpc.HandlerCallDetails) -> Around | None:
        method = details.method
        incoming = request_id_from(details.invocation_metadata)
        if incoming is None and (not self.make_ids or method.startswith(QUIET_PREFIXES)):
            return None

        @asynccontextmanager
        async def traced(context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
            rid = incoming or new_request_id()
            token = _request_id.set(rid)
            if self.make_ids:
                await context.send_initial_metadata(((HEADER, rid),))
            start = time.perf_counter()
            failed: BaseException | None = None
            try:
                yield
            except BaseException as err:
                failed = err
                raise
            finally:
                if log.isEnabledFor(logging.DEBUG) and not method.startswith(QUIET_PREFIXES):
                    code = context.code() or ("OK" if failed is None else type(failed).__name__)
                    log.debug("%s %s -> %s in %.1f ms", self.service, method, getattr(code, "name", code),
                              (time.perf_counter() - start) * 1000)
                try:
                    _request_id.reset(token)
                except ValueError:  # a stream closed from another context: that context ends anyway
                    pass

        return traced


def _with_request_id(details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
    rid = _request_id.get()
    if rid is None:
        return details
    metadata = grpc.aio.Metadata(*(details.metadata or ()))
    if HEADER in metadata:
        return details
    metadata.add(HEADER, rid)
    return details._replace(metadata=metadata)


class _UnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_with_request_id(details), request)


class _UnaryStream(grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_with_request_id(details), request)


class _StreamUnary(grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return await continuation(_with_request_id(details), request_iterator)


class _StreamStream(grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return await continuation(_with_request_id(details), request_iterator)


def traced_channel(address: str, options: list[tuple[str, int]] = GRPC_OPTIONS) -> grpc.aio.Channel:
    """modelgrid.channel.aio_channel that also forwards the current request id on every call."""
    interceptors = [_UnaryUnary(), _UnaryStream(), _StreamUnary(), _StreamStream()]
    return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)
