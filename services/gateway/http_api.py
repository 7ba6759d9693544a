"""The OpenAI-compatible HTTP API: FastAPI routes under /v1, served by uvicorn in the gateway's event loop.

GET /v1/models, GET /v1/models/{model}, POST /v1/completions, POST /v1/chat/completions,
POST /v1/embeddings; /openapi.json describes them. Every error has OpenAI's shape
{"error": {"message", "type", "param", "code"}} and its HTTP status (openai_errors.py): request bodies
that do not validate get 400 (never FastAPI's 422), bodies over --http-max-body-bytes 413.
What each call does is in openai_service.py; this module is the HTTP edge only.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from contextlib import AsyncExitStack
from typing import Any, Awaitable, Callable

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import modelgrid
from modelgrid.errors import ModelGridError
from services.gateway import openai_schema as schema
from services.gateway.app import GatewayApp
from services.gateway.auth import Authenticator, Principal, set_current_principal
from services.gateway.limits import RateLimited, RateLimiter
from services.gateway.metering import REJECTED
from services.gateway.openai_errors import error_body, from_domain, from_status
from services.gateway.openai_service import EventStream, OpenAIService

log = logging.getLogger(__name__)

# a body over the limit is read and dropped up to this many times the limit before the 413 is sent
# (clients that are still sending when the server answers and closes see a broken pipe instead)
DRAIN_FACTOR = 16
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": schema.ErrorResponse, "description": what}
    for status, what in [(400, "invalid request"), (401, "missing or invalid API key"), (403, "not allowed"),
                         (404, "unknown model or version"), (413, "request body too large"),
                         (429, "rate limit or quota exceeded"), (503, "model not placed or no worker reachable")]
}


def _json_error(status: int, body: dict[str, Any]) -> JSONResponse:
    return JSONResponse(body, status_code=status)


class BodyLimit:
    """Refuse request bodies over max_bytes with 413, before anything parses them."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                await _json_error(400, from_status(400, "invalid Content-Length header"))(scope, receive, send)
                return
            if int(declared) <= self.max_bytes:
                await self.app(scope, receive, send)
                return
        body, too_large = await self._read(receive)
        if body is None:
            return  # the client went away
        if too_large:
            message = f"the request body is larger than the limit of {self.max_bytes} bytes"
            await _json_error(413, from_status(413, message))(scope, receive, send)
            return
        await self.app(scope, _replay(body, receive), send)

    async def _read(self, receive: Receive) -> tuple[bytes | None, bool]:
        """(body, False); (b"", True) past the limit (read and dropped up to DRAIN_FACTOR x the limit); (None,
        False) when the client went away."""
        parts: list[bytes] = []
        total = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None, False
            chunk = message.get("body", b"")
            total += len(chunk)
            if total <= self.max_bytes:
                parts.append(chunk)
            else:
                parts = []
            if not message.get("more_body", False) or total > DRAIN_FACTOR * self.max_bytes:
                break
        if total > self.max_bytes:
            return b"", True
        return b"".join(parts), False


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


# the union-member tags pydantic puts in an error's location ("str", "list[int]", ...)
def _is_union_tag(part: Any) -> bool:
    return isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool"))


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """The first problem as one sentence, and the request field it is about."""
    errors = exc.errors()
    if not errors:
        return "the request body is invalid", None
    err = errors[0]
    kind = err.get("type")
    if kind == "json_invalid":
        detail = (err.get("ctx") or {}).get("error", "")
        return f"the request body is not valid JSON: {detail}".rstrip(": "), None
    param = ".".join(str(p) for p in err.get("loc", ()) if p != "body" and not _is_union_tag(p)) or None
    if param is None:
        if kind == "missing":
            return "the request body is missing: send a JSON object", None
        if kind in ("model_attributes_type", "dict_type"):
            return "the request body must be a JSON object", None
        return str(err.get("msg", "invalid request")).removeprefix("Value error, "), None
    if kind == "missing":
        return f"'{param}' is required", param
    return f"invalid value for '{param}': {err.get('msg', 'invalid value')}", param


class Guard:
    """API keys (`Authorization: Bearer <key>`) and per-key limits: the Authenticator and RateLimiter that
    guard the gRPC API (guard.py), so a key has one quota whichever protocol it uses."""

    def __init__(self, auth: Authenticator, limiter: RateLimiter) -> None:
        self._auth = auth
        self._limiter = limiter

    async def principal(self, request: Request) -> Principal:
        """The caller (a FastAPI dependency of every /v1 route): 401 without a valid key."""
        try:
            principal = await self._auth.authenticate(request.headers)
        except ModelGridError as err:
            REJECTED.labels(err.code.lower()).inc()
            raise
        set_current_principal(principal)
        return principal

    async def run(
        self, principal: Principal, work: Callable[[], Awaitable[Any]], stream: bool = False, tokens: bool = False
    ) -> Any:
        """Admit the call (429 over a limit), run it, and hold the admission until a streamed body ends."""
        stack = AsyncExitStack()
        try:
            await stack.enter_async_context(self._limiter.admit(principal, stream=stream, tokens=tokens))
        except RateLimited as err:
            REJECTED.labels(err.limit).inc()
            raise
        try:
            result = await work()
        except BaseException:
            await stack.aclose()
            raise
        if isinstance(result, EventStream):
            return _EventResponse(result, stack)
        await stack.aclose()
        return result


class _EventResponse(StreamingResponse):
    """Server-sent events; however the response ends (done, client gone, server stopping), the sessions
    end and the admission is released."""

    def __init__(self, events: EventStream, admission: AsyncExitStack) -> None:
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._events = events
        self._admission = admission

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                await self._events.aclose()
            finally:
                await self._admission.aclose()


def build_api(service: OpenAIService, guard: Guard, max_body_bytes: int) -> FastAPI:
    api = FastAPI(
        title="ModelGrid OpenAI-compatible API",
        version=getattr(modelgrid, "__version__", "0"),
        description="OpenAI-compatible completions, chat completions and embeddings served by ModelGrid. "
        "Models are named 'name' (its latest version), 'name:version' or 'name:alias'. "
        "Send the API key as `Authorization: Bearer <key>`.",
        redoc_url=None,
    )
    api.add_middleware(BodyLimit, max_bytes=max_body_bytes)

    @api.exception_handler(ModelGridError)
    async def domain_error(request: Request, exc: ModelGridError) -> JSONResponse:
        status, body = from_domain(exc)
        log.info("%s %s -> %d %s: %s", request.method, request.url.path, status, exc.code, exc.message)
        response = _json_error(status, body)
        if isinstance(exc, RateLimited):
            response.headers["Retry-After"] = str(exc.retry_after_s)
        return response

    @api.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        log.info("%s %s -> 400: %s", request.method, request.url.path, message)
        return _json_error(400, error_body(message, "invalid_request_error", param))

    @api.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if exc.status_code == 404:
            message = f"no such endpoint: {request.method} {request.url.path}"
        return _json_error(exc.status_code, from_status(exc.status_code, message))

    @api.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return _json_error(500, error_body("internal error; see the gateway log", "server_error"))

    v1 = APIRouter(prefix="/v1", responses=ERROR_RESPONSES)
    caller = Depends(guard.principal)

    @v1.get("/models", response_model=schema.ModelList)
    async def list_models(principal: Principal = caller) -> Any:
        return await guard.run(principal, service.list_models)

    @v1.get("/models/{model}", response_model=schema.ModelCard)
    async def get_model(model: str, principal: Principal = caller) -> Any:
        return await guard.run(principal, lambda: service.get_model(model))

    @v1.post("/completions", response_model=schema.Completion, responses={200: {"content": {"text/event-stream": {}}}})
    async def completions(body: schema.CompletionRequest, principal: Principal = caller) -> Any:
        return await guard.run(principal, lambda: service.completion(body), stream=True, tokens=True)

    @v1.post("/chat/completions", response_model=schema.ChatCompletion,
             responses={200: {"content": {"text/event-stream": {}}}})
    async def chat_completions(body: schema.ChatCompletionRequest, principal: Principal = caller) -> Any:
        return await guard.run(principal, lambda: service.chat(body), stream=True, tokens=True)

    @v1.post("/embeddings", response_model=schema.EmbeddingList)
    async def embeddings(body: schema.EmbeddingRequest, principal: Principal = caller) -> Any:
        return await guard.run(principal, lambda: service.embeddings(body), tokens=True)

    api.include_router(v1)
    return api


class HttpServer:
    """uvicorn serving an ASGI app on a socket bound here, inside the running event loop.

    uvicorn's own `serve()` would install signal handlers; the gateway's serve_forever owns those, so
    this drives uvicorn's startup / main loop / shutdown steps itself.
    """

    def __init__(self, server: uvicorn.Server, sock: socket.socket, main_loop: asyncio.Task) -> None:
        self._server = server
        self._sock = sock
        self._main_loop = main_loop
        self._stopping: asyncio.Future[None] | None = None
        self.port: int = sock.getsockname()[1]

    @classmethod
    async def start(cls, asgi_app: ASGIApp, host: str, port: int, grace_s: float) -> "HttpServer":
        sock = _bind(host, port)
        config = uvicorn.Config(asgi_app, lifespan="off", log_config=None, access_log=False,
                                timeout_graceful_shutdown=_grace(grace_s), server_header=False)
        server = uvicorn.Server(config)
        config.load()
        server.lifespan = config.lifespan_class(config)
        try:
            await server.startup(sockets=[sock])
        except BaseException:
            sock.close()
            raise
        return cls(server, sock, asyncio.create_task(server.main_loop(), name="http-main-loop"))

    def stop(self, grace_s: float | None = None) -> asyncio.Future[None]:
        """Stop accepting, let in-flight requests finish for grace_s (default: the one it started with), close.
        Starts at the first call; every call returns the same future, done when the server is stopped."""
        if self._stopping is None:
            if grace_s is not None:
                self._server.config.timeout_graceful_shutdown = _grace(grace_s)
            self._stopping = asyncio.ensure_future(self._stop())
        return self._stopping

    async def _stop(self) -> None:
        self._server.should_exit = True
        await self._main_loop
        await self._server.shutdown(sockets=[self._sock])


def _grace(grace_s: float) -> float:
    # uvicorn waits for its connections with asyncio.wait_for: a zero timeout expires (and logs an error)
    # even when none are open
    return max(grace_s, 0.1)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise OSError(f"could not bind the HTTP API to {host}:{port} ({err.strerror}): is the port in use?") from err
    sock.listen(2048)
    sock.setblocking(False)
    return sock


async def start_http_api(app: GatewayApp) -> HttpServer:
    """Serve the OpenAI-compatible API on the host of --listen and --http-port (0 = a free port)."""
    config = app.config
    host = config.listen.rpartition(":")[0].strip("[]") or "0.0.0.0"
    api = build_api(OpenAIService(app), Guard(app.auth, app.limiter), config.http_max_body_bytes)
    server = await HttpServer.start(api, host, config.http_port, config.grace_s)
    log.info("OpenAI-compatible HTTP API on http://%s:%d/v1", host, server.port)
    return server
