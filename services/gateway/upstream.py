"""Our small classes over the Registry, Scheduler and Worker stubs.

One persistent channel per address. Failed calls become domain errors that keep the downstream status
code and message; a service that cannot be reached becomes UNAVAILABLE naming it. Resolved versions
are cached briefly; routes are fresh per request, the last one standing in while the scheduler cannot
answer (RouteCache). A worker channel that cannot connect is renewed, so a restarted worker is reachable
at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Sequence

import grpc
import numpy as np

from modelgrid.channel import aio_channel
from modelgrid.errors import DeadlineExceeded, ModelGridError, Unavailable, from_code
from modelgrid.v1 import (
    common_pb2,
    registry_pb2,
    registry_pb2_grpc,
    scheduler_pb2,
    scheduler_pb2_grpc,
    worker_pb2,
    worker_pb2_grpc,
)
from services.common.tracing import current_request_id, traced_channel
from services.gateway import convert
from services.gateway.auth import Principal
from services.gateway.coalesce import StepCoalescer
from services.gateway.domain import Hop, Route, Sampling, VersionInfo
from services.gateway.step_stream import StepStream, single_token

log = logging.getLogger(__name__)

# Substrings of grpc's details when the peer could not be reached at all (as opposed to a service
# that answered UNAVAILABLE itself, e.g. "model not placed yet").
_UNREACHABLE = (
    "failed to connect",
    "connection refused",
    "connect failed",
    "socket closed",
    "connection reset",
    "broken pipe",
    "dns resolution failed",
    "unavailable to connect",
    "no route to host",
    "endpoint closed",
)
DEFAULT_TIMEOUT_S = 30.0
RENEW_MIN_AGE_S = 0.5
# the peer was not reached at all: its channel may be waiting out a reconnect backoff
_CONNECT_FAILED = ("failed to connect", "connection refused", "connect failed")
ROUTE_TIMEOUT_S = 3.0  # GetRoute reads Redis only: a scheduler slower than this is treated as down
# How a batch of steps travels to a worker, newest first (Workers._send_steps); a worker older than the gateway
# gets the older transport it answered with for this long (it may be upgraded meanwhile).
_STREAM, _BATCH, _FORWARD = 0, 1, 2
_TRANSPORTS = ("ForwardStream", "ForwardBatch", "Forward")
OLDER_WORKER_RETRY_S = 60.0


def downstream_error(service: str, address: str, err: grpc.aio.AioRpcError) -> ModelGridError:
    """The domain error for a failed downstream call: same code and message, or UNAVAILABLE naming the service."""
    code = err.code()
    details = err.details() or code.name
    if code == grpc.StatusCode.UNAVAILABLE and any(m in details.lower() for m in _UNREACHABLE):
        return Unavailable(f"{service} at {address} is unavailable: {details}")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded(f"{service} at {address} did not answer before the request's deadline")
    if code == grpc.StatusCode.CANCELLED:
        # we did not cancel it (our own cancellation arrives as asyncio.CancelledError): the peer is going away
        return Unavailable(f"{service} at {address} cancelled the call: {details}")
    return from_code(code.name, details)


class Channels:
    """One persistent channel per address, created on first use: traced (it forwards the current request id
    on every call), or plain for the long-lived step streams (one call serves many requests, and a client
    interceptor on a stream puts every message through an extra queue and task)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._channels: dict[tuple[str, bool], grpc.aio.Channel] = {}
        self._created: dict[str, float] = {}
        self._clock = clock
        self._closing: set[asyncio.Task] = set()

    def get(self, address: str, traced: bool = True) -> grpc.aio.Channel:
        channel = self._channels.get((address, traced))
        if channel is None:
            channel = self._channels[address, traced] = traced_channel(address) if traced else aio_channel(address)
            self._created.setdefault(address, self._clock())
        return channel

    def renew(self, address: str, min_age_s: float = RENEW_MIN_AGE_S) -> None:
        """Replace the channels to an address that could not be connected to. A failed channel waits out
        gRPC's reconnect backoff (seconds, growing) before it tries again; a process restarted at the same
        address (a worker after a crash) must be reachable at once. At most once per min_age_s."""
        if address not in self._created or self._clock() - self._created[address] < min_age_s:
            return
        del self._created[address]
        for traced in (True, False):
            old = self._channels.pop((address, traced), None)
            if old is not None:
                task = asyncio.ensure_future(old.close(grace=1.0))
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        self._created.clear()
        for channel in channels:
            await channel.close()
        await asyncio.gather(*self._closing, return_exceptions=True)


class _Client:
    """Calls one service, turning AioRpcError into domain errors."""

    service = "service"

    def __init__(self, channels: Channels, address: str, stub_cls: Callable[[grpc.aio.Channel], Any]) -> None:
        self.address = address
        self._stub = stub_cls(channels.get(address))

    async def _unary(self, method: str, request: Any, timeout: float | None = DEFAULT_TIMEOUT_S) -> Any:
        try:
            return await getattr(self._stub, method)(request, timeout=timeout)
        except grpc.aio.AioRpcError as err:
            raise downstream_error(self.service, self.address, err) from None

    async def _stream(self, method: str, request: Any, timeout: float | None) -> AsyncIterator[Any]:
        """A server-streaming call's replies as they come."""
        try:
            async for reply in getattr(self._stub, method)(request, timeout=timeout):
                yield reply
        except grpc.aio.AioRpcError as err:
            raise downstream_error(self.service, self.address, err) from None


class RegistryClient(_Client):
    service = "registry"

    def __init__(self, channels: Channels, address: str) -> None:
        super().__init__(channels, address, registry_pb2_grpc.RegistryStub)

    async def resolve_version(self, model: str, version: str, timeout: float | None = DEFAULT_TIMEOUT_S) -> VersionInfo:
        reply = await self._unary(
            "ResolveVersion", registry_pb2.ResolveVersionRequest(model=model, version=version), timeout
        )
        return convert.version_from_proto(reply)

    async def fetch_file(self, model: str, version: str, path: str, timeout: float | None = DEFAULT_TIMEOUT_S) -> bytes:
        """A whole file of a version, reassembled from its chunks."""
        request = registry_pb2.FetchFileRequest(model=model, version=version, path=path)
        buf = bytearray()
        async for chunk in self._stream("FetchFile", request, timeout):
            end = chunk.offset + len(chunk.data)
            if len(buf) < end:
                buf.extend(b"\0" * (end - len(buf)))
            buf[chunk.offset : end] = chunk.data
        return bytes(buf)

    async def list_models(self, request: common_pb2.ListModelsRequest, timeout: float | None) -> Any:
        return await self._unary("ListModels", request, timeout)

    async def get_model(self, request: common_pb2.GetModelRequest, timeout: float | None) -> Any:
        return await self._unary("GetModel", request, timeout)

    async def set_alias(self, request: common_pb2.SetAliasRequest, timeout: float | None) -> Any:
        return await self._unary("SetAlias", request, timeout)

    async def set_replicas(self, request: common_pb2.SetReplicasRequest, timeout: float | None) -> Any:
        return await self._unary("SetReplicas", request, timeout)

    async def verify_key(self, secret: str, timeout: float | None = DEFAULT_TIMEOUT_S) -> Principal:
        """The key's Principal; Unauthenticated when the registry does not know it (or it is revoked)."""
        reply = await self._unary("VerifyKey", registry_pb2.VerifyKeyRequest(secret=secret), timeout)
        return convert.principal_from_proto(reply)

    async def create_key(self, request: common_pb2.CreateKeyRequest, timeout: float | None) -> Any:
        return await self._unary("CreateKey", request, timeout)

    async def list_keys(self, request: common_pb2.ListKeysRequest, timeout: float | None) -> Any:
        return await self._unary("ListKeys", request, timeout)

    async def revoke_key(self, request: common_pb2.RevokeKeyRequest, timeout: float | None) -> Any:
        return await self._unary("RevokeKey", request, timeout)

    async def upload_version(self, chunks: AsyncIterator[common_pb2.UploadVersionChunk], timeout: float | None) -> Any:
        """Streams the client's upload on to the registry as it arrives."""
        return await self._unary("UploadVersion", chunks, timeout)


class SchedulerClient(_Client):
    service = "scheduler"

    def __init__(self, channels: Channels, address: str) -> None:
        super().__init__(channels, address, scheduler_pb2_grpc.SchedulerStub)

    async def get_route(
        self, model: str, version: str, exclude: Sequence[str] = (), timeout: float | None = DEFAULT_TIMEOUT_S
    ) -> Route:
        request = scheduler_pb2.GetRouteRequest(model=model, version=version, exclude_workers=list(exclude))
        route = convert.route_from_proto(await self._unary("GetRoute", request, timeout))
        if not route.hops:
            raise Unavailable(f"the scheduler returned an empty route for {model} {version}")
        return route

    async def report_failure(self, worker_id: str, reason: str, timeout: float = 5.0) -> None:
        """Best effort: the scheduler checks the worker and re-places its stages if it is gone."""
        try:
            request = scheduler_pb2.ReportFailureRequest(worker_id=worker_id, reason=reason)
            await self._unary("ReportFailure", request, timeout)
        except ModelGridError as err:
            log.warning("could not report the failure of worker %s to the scheduler: %s", worker_id, err.message)

    async def reconcile(self, timeout: float | None) -> Any:
        return await self._unary("Reconcile", scheduler_pb2.ReconcileRequest(), timeout)

    async def list_workers(self, request: common_pb2.ListWorkersRequest, timeout: float | None) -> Any:
        return await self._unary("ListWorkers", request, timeout)

    async def get_placement(self, request: common_pb2.GetPlacementRequest, timeout: float | None) -> Any:
        return await self._unary("GetPlacement", request, timeout)

    async def list_placements(self, request: common_pb2.ListPlacementsRequest, timeout: float | None) -> Any:
        return await self._unary("ListPlacements", request, timeout)


@dataclass(frozen=True)
class HopOutput:
    """What one Forward returned: exactly one field is set."""

    hidden: Any = None  # opaque wire tensor for the next hop (common.Tensor); never decoded here
    token: tuple[int, float] | None = None  # last decoder stage: (token id, logprob)
    embeddings: np.ndarray | None = None  # last encoder stage: (B, hidden) float32


class Workers:
    """Forward and CloseSession on any worker, over one persistent channel per worker address."""

    def __init__(self, channels: Channels) -> None:
        self._channels = channels
        self._stubs: dict[str, tuple[grpc.aio.Channel, worker_pb2_grpc.WorkerStub]] = {}
        # concurrent sessions' steps to the same worker go together (a lone step too), see _send_steps
        self._coalescer = StepCoalescer(self._send_steps)
        self._streams: dict[str, tuple[grpc.aio.Channel, StepStream]] = {}
        # address -> (the transport it gets, loop.time() until which): a worker older than the gateway
        self._older: dict[str, tuple[int, float]] = {}
        self._stream_closes: set[asyncio.Task] = set()

    def _stub(self, address: str) -> worker_pb2_grpc.WorkerStub:
        """One stub per channel (a renewed channel gets a new stub), not one per hop per token."""
        channel = self._channels.get(address)
        cached = self._stubs.get(address)
        if cached is None or cached[0] is not channel:
            cached = self._stubs[address] = (channel, worker_pb2_grpc.WorkerStub(channel))
        return cached[1]

    async def forward_decoder(
        self,
        route: Route,
        hop: Hop,
        session_id: str,
        *,
        tokens: Sequence[int] | None,
        hidden: Any,
        position: int,
        reset: bool,
        sampling: Sampling,
        step: int,
        max_session_tokens: int,
        timeout: float,
    ) -> HopOutput:
        request = worker_pb2.ForwardRequest(
            session_id=session_id,
            model=route.model,
            version=route.version,
            start_layer=hop.start_layer,
            end_layer=hop.end_layer,
            epoch=route.epoch,
            position=position,
            reset=reset,
            step=step,
            max_session_tokens=max_session_tokens,
            num_stages=len(route.hops),
            request_id=current_request_id() or "",
            sampling=common_pb2.SamplingParams(
                temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p, seed=sampling.seed
            ),
        )
        if tokens is not None:
            request.tokens.ids.extend(tokens)
        else:
            request.hidden.CopyFrom(hidden)
        return self._output(hop, await self._coalescer.submit(hop, request, timeout))

    async def forward_encoder(
        self,
        route: Route,
        hop: Hop,
        *,
        tokens: np.ndarray | None,
        hidden: Any,
        attention_mask: np.ndarray,
        timeout: float,
    ) -> HopOutput:
        """tokens: (B, T) ids for the first hop; hidden: the previous hop's output for the others."""
        request = worker_pb2.ForwardRequest(
            model=route.model,
            version=route.version,
            start_layer=hop.start_layer,
            end_layer=hop.end_layer,
            epoch=route.epoch,
            attention_mask=convert.int_tensor(attention_mask),
        )
        if tokens is not None:
            request.tokens.ids.extend(tokens.reshape(-1).tolist())
            request.tokens_shape.extend(tokens.shape)
        else:
            request.hidden.CopyFrom(hidden)
        return await self._forward(hop, request, timeout)

    async def _forward(self, hop: Hop, request: worker_pb2.ForwardRequest, timeout: float) -> HopOutput:
        return self._output(hop, await self._call_forward(hop, request, timeout))

    async def _call_forward(self, hop: Hop, request: worker_pb2.ForwardRequest, timeout: float) -> Any:
        try:
            return await self._stub(hop.address).Forward(request, timeout=timeout)
        except grpc.aio.AioRpcError as err:
            raise self._hop_error(hop, err) from None

    async def _send_steps(
        self, hop: Hop, requests: Sequence[worker_pb2.ForwardRequest], timeout: float
    ) -> AsyncIterator[Any]:
        """A batch of steps to one worker; its results, one ForwardBatchResponse per pass, as they come. Decode
        steps go as one message on the worker's step stream, others as a ForwardBatch call. A worker older than
        the gateway (a rolling upgrade) answers the call UNIMPLEMENTED before any result: it gets the next
        transport down (ForwardStream -> ForwardBatch -> a plain Forward per step), for OLDER_WORKER_RETRY_S."""
        level = self._transport(hop.address)
        if level == _STREAM and not all(single_token(r) for r in requests):
            level = _BATCH
        while True:
            answered = False
            try:
                async for reply in self._send_as(level, hop, requests, timeout):
                    answered = True
                    yield reply
                return
            except ModelGridError as err:
                if err.code != "UNIMPLEMENTED" or answered or level == _FORWARD:
                    raise
                level = self._older_than(hop, level, err.message)

    def _transport(self, address: str) -> int:
        level, until = self._older.get(address, (_STREAM, 0.0))
        return level if until > asyncio.get_running_loop().time() else _STREAM

    def _older_than(self, hop: Hop, level: int, why: str) -> int:
        """The worker lacks the transport `level` names: the next one down, remembered for OLDER_WORKER_RETRY_S."""
        if self._transport(hop.address) <= level:  # not yet known (concurrent batches log it once)
            log.warning("worker %s at %s has no %s (%s): %s to it for %.0f s", hop.worker_id, hop.address,
                        _TRANSPORTS[level], why, _TRANSPORTS[level + 1], OLDER_WORKER_RETRY_S)
            self._older[hop.address] = (level + 1, asyncio.get_running_loop().time() + OLDER_WORKER_RETRY_S)
        return level + 1

    async def _send_as(
        self, level: int, hop: Hop, requests: Sequence[worker_pb2.ForwardRequest], timeout: float
    ) -> AsyncIterator[Any]:
        if level == _STREAM:
            async for replies in self._stream(hop).batch(requests, timeout):
                yield replies
        elif level == _BATCH:
            call = self._stub(hop.address).ForwardBatch(worker_pb2.ForwardBatchRequest(steps=requests), timeout=timeout)
            try:
                async for reply in call:
                    yield reply
            except grpc.aio.AioRpcError as err:
                raise self._hop_error(hop, err) from None
        else:  # one Forward per step, concurrently; each answer as a result of its own
            calls = {asyncio.ensure_future(self._call_forward(hop, r, timeout)): i for i, r in enumerate(requests)}
            pending = set(calls)
            try:
                while pending:
                    done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                    reply = worker_pb2.ForwardBatchResponse()
                    for call in done:
                        result = reply.results.add(index=calls[call])
                        error = call.exception()
                        if error is None:
                            result.response.CopyFrom(call.result())
                        elif isinstance(error, ModelGridError):
                            result.code, result.message = error.code, error.message
                        else:
                            raise error
                    yield reply
            finally:
                for call in pending:
                    call.cancel()

    def _stream(self, hop: Hop) -> StepStream:
        """The open step stream to the hop's worker (a new one if it has none, or its call ended, or the
        channel was renewed)."""
        address = hop.address
        channel = self._channels.get(address, traced=False)
        current = self._streams.get(address)
        if current is not None and current[0] is channel and current[1].ended is None:
            return current[1]
        call = worker_pb2_grpc.WorkerStub(channel).ForwardStream()
        stream = StepStream(call, lambda err: self._hop_error(hop, err), f"worker {hop.worker_id} at {address}")
        self._streams[address] = (channel, stream)
        if current is not None:
            self._closing(current[1])
        return stream

    def _closing(self, stream: StepStream) -> None:
        task = asyncio.ensure_future(stream.close())
        self._stream_closes.add(task)
        task.add_done_callback(self._stream_closes.discard)

    async def close(self) -> None:
        """Close the step streams (before the channels)."""
        streams, self._streams = [s for _, s in self._streams.values()], {}
        await asyncio.gather(*(s.close() for s in streams), *self._stream_closes, return_exceptions=True)

    def _hop_error(self, hop: Hop, err: grpc.aio.AioRpcError) -> ModelGridError:
        if err.code() == grpc.StatusCode.UNAVAILABLE and any(m in (err.details() or "").lower() for m in _CONNECT_FAILED):
            self._channels.renew(hop.address)
        return downstream_error(f"worker {hop.worker_id}", hop.address, err)

    def _output(self, hop: Hop, reply: worker_pb2.ForwardResponse) -> HopOutput:
        which = reply.WhichOneof("output")
        if which == "hidden":
            return HopOutput(hidden=reply.hidden)
        if which == "token":
            return HopOutput(token=(reply.token.token_id, reply.token.logprob))
        if which == "embeddings":
            return HopOutput(embeddings=convert.tensor_to_numpy(reply.embeddings, f"embeddings from {hop.worker_id}"))
        raise Unavailable(f"worker {hop.worker_id} at {hop.address} answered Forward with no output")

    async def close_session(self, address: str, session_id: str, timeout: float = 5.0) -> None:
        """Best effort (idempotent on the worker; a dead worker has freed it anyway)."""
        try:
            request = worker_pb2.CloseSessionRequest(session_id=session_id)
            await self._stub(address).CloseSession(request, timeout=timeout)
        except grpc.aio.AioRpcError as err:
            log.info("CloseSession %s on %s failed: %s %s", session_id, address, err.code().name, err.details())


class VersionCache:
    """(model, version-or-alias) -> VersionInfo for ttl_s seconds, so an alias moves within ttl_s."""

    def __init__(self, registry: RegistryClient, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._registry = registry
        self._ttl_s = ttl_s
        self._clock = clock
        self._entries: dict[tuple[str, str], tuple[float, VersionInfo]] = {}

    async def resolve(self, model: str, version: str, timeout: float | None = DEFAULT_TIMEOUT_S) -> VersionInfo:
        key = (model, version)
        entry = self._entries.get(key)
        now = self._clock()
        if entry is not None and entry[0] > now:
            return entry[1]
        info = await self._registry.resolve_version(model, version, timeout)
        if self._ttl_s > 0:
            if len(self._entries) > 1024:
                self._entries = {k: v for k, v in self._entries.items() if v[0] > now}
            self._entries[key] = (now + self._ttl_s, info)
        return info


class RouteCache:
    """Routes from the scheduler, and the last good one per version as a stand-in while it cannot answer.

    Every request asks the scheduler afresh (one call per request, never per token), so new sessions
    spread over the replicas with the fewest active sessions. When the scheduler cannot give a route
    (it is restarting, or its Redis was reset and the placement is being rebuilt) the last route of the
    version stands in for up to ttl_s seconds after it was last confirmed, unless it goes through an
    excluded worker or was dropped after a failure: streams and new requests go on through the workers,
    which never needed the scheduler to serve.
    """

    def __init__(self, scheduler: SchedulerClient, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._scheduler = scheduler
        self._ttl_s = ttl_s
        self._clock = clock
        self._routes: dict[tuple[str, str], tuple[float, Route]] = {}
        self._standing_in: set[tuple[str, str]] = set()  # versions served by a stand-in now (logged once)

    async def get(
        self, model: str, version: str, exclude: Sequence[str] = (), timeout: float | None = None,
        stand_in: bool = True,
    ) -> Route:
        """A route from the scheduler; else, if stand_in, the last one when it avoids `exclude`."""
        key = (model, version)
        timeout = ROUTE_TIMEOUT_S if timeout is None else min(timeout, ROUTE_TIMEOUT_S)
        try:
            route = await self._scheduler.get_route(model, version, exclude, timeout)
        except (Unavailable, DeadlineExceeded) as err:
            entry = self._routes.get(key)
            if not stand_in or entry is None or entry[0] <= self._clock() or set(exclude) & set(entry[1].worker_ids):
                raise
            if key not in self._standing_in:
                self._standing_in.add(key)
                log.warning("no route for %s %s from the scheduler (%s); using the last one (epoch %d) meanwhile",
                            model, version, err.message, entry[1].epoch)
            return entry[1]
        if key in self._standing_in:
            self._standing_in.discard(key)
            log.info("the scheduler gives routes for %s %s again", model, version)
        current = self._routes.get(key)
        if self._ttl_s > 0 and (current is None or route.epoch >= current[1].epoch or current[0] <= self._clock()):
            self._routes[key] = (self._clock() + self._ttl_s, route)
        return route

    def invalidate(self, route: Route) -> None:
        """Forget the cached route of route's version if it is this route (or an older epoch)."""
        key = (route.model, route.version)
        entry = self._routes.get(key)
        if entry is not None and (entry[1] == route or entry[1].epoch <= route.epoch):
            del self._routes[key]
