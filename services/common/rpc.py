"""Maps domain errors to gRPC status codes at the edge of every servicer method."""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
from typing import Any, AsyncIterator, Callable, NoReturn

import grpc

from modelgrid.errors import ModelGridError

log = logging.getLogger(__name__)


def _status(err: ModelGridError) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, err.code, grpc.StatusCode.INTERNAL)


def _trailers(err: ModelGridError) -> tuple[tuple[str, str], ...]:
    """Trailing metadata an error carries (e.g. `retry-after-s` of a rate limit)."""
    return tuple(getattr(err, "trailing_metadata", ()))


# A client-streaming call that fails reads what the client still sends, up to this long, before it answers.
CLIENT_STREAM_DRAIN_S = 30.0


async def drain(requests: AsyncIterator[object], seconds: float = CLIENT_STREAM_DRAIN_S) -> None:
    """Read the rest of a client stream, for at most `seconds`. When a server ends a client-streaming call
    while an asyncio client is still writing, grpc.aio may report INTERNAL "Internal error from Core" to that
    client instead of the server's status (grpc/grpc#36066): the gateway proxies uploads with such a client, and
    the SDK's AsyncClient uploads with one. Answering after the client's last message sidesteps it; the bound
    keeps a slow or endless client from holding the call."""

    async def read_all() -> None:
        async for _ in requests:
            pass

    try:
        await asyncio.wait_for(read_all(), seconds)
    except asyncio.TimeoutError:
        log.info("a refused client stream was still sending after %.0f s; answering it now", seconds)
    except grpc.aio.AioRpcError:
        pass  # the client went away: nobody to answer


def rpc(method: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate an async servicer method (unary or async-generator).

    A ModelGridError becomes its status code with its message (logged once at INFO, since it is the
    caller's problem or an expected condition); anything else is logged with its traceback and
    becomes INTERNAL. Aborts raised by the method itself pass through untouched. A client-streaming
    call is drained before it answers with an error (see drain).
    """
    name = method.__qualname__

    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream_wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                async for item in method(self, request, context):
                    yield item
            except ModelGridError as err:
                log.info("%s -> %s: %s", name, err.code, err.message)
                await context.abort(_status(err), err.message, _trailers(err))
            except (grpc.aio.AbortError, grpc.aio.UsageError):
                raise
            except Exception:
                log.exception("%s failed", name)
                await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {name}; see the service log")

        return stream_wrapper

    @functools.wraps(method)
    async def unary_wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await method(self, request, context)
        except ModelGridError as err:
            log.info("%s -> %s: %s", name, err.code, err.message)
            await _drain_stream(request)
            await context.abort(_status(err), err.message, _trailers(err))
        except (grpc.aio.AbortError, grpc.aio.UsageError):
            raise
        except Exception:
            log.exception("%s failed", name)
            await _drain_stream(request)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {name}; see the service log")

    return unary_wrapper


async def _drain_stream(request: Any) -> None:
    if hasattr(request, "__aiter__"):  # a client-streaming call
        await drain(request)


def raise_for_rpc_error(err: grpc.aio.AioRpcError) -> NoReturn:
    """Re-raise a failed downstream call as the matching ModelGridError (keeps its code and message)."""
    from modelgrid.errors import from_code

    raise from_code(err.code().name, err.details() or err.code().name) from err
