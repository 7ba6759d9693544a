"""Maps domain errors to gRPC status codes at the edge of every servicer method."""

from __future__ import annotations

import functools
import inspect
import logging
from typing import Any, Callable, NoReturn

import grpc

from modelgrid.errors import ModelGridError

log = logging.getLogger(__name__)


def _status(err: ModelGridError) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, err.code, grpc.StatusCode.INTERNAL)


def _trailers(err: ModelGridError) -> tuple[tuple[str, str], ...]:
    """Trailing metadata an error carries (e.g. `retry-after-s` of a rate limit)."""
    return tuple(getattr(err, "trailing_metadata", ()))


def rpc(method: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate an async servicer method (unary or async-generator).

    A ModelGridError becomes its status code with its message (logged once at INFO, since it is the
    caller's problem or an expected condition); anything else is logged with its traceback and
    becomes INTERNAL. Aborts raised by the method itself pass through untouched.
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
            await context.abort(_status(err), err.message, _trailers(err))
        except (grpc.aio.AbortError, grpc.aio.UsageError):
            raise
        except Exception:
            log.exception("%s failed", name)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {name}; see the service log")

    return unary_wrapper


def raise_for_rpc_error(err: grpc.aio.AioRpcError) -> NoReturn:
    """Re-raise a failed downstream call as the matching ModelGridError (keeps its code and message)."""
    from modelgrid.errors import from_code

    raise from_code(err.code().name, err.details() or err.code().name) from err
