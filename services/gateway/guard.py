"""The gateway's gRPC server interceptor: every call is authenticated, authorised and admitted here.

What each method needs is one table, POLICY (full method name -> Access). A method not in it needs a
valid key of any kind and counts against the key's requests per minute, so a service added to the
gateway's server later is protected by default; give it an entry to make it admin-only or to have it
hold a stream or spend tokens. Only the health probes (grpc.health.v1, KServe ServerLive/ServerReady)
are public.

Inside a call, `current_principal()` (services/gateway/auth.py) is the caller and `current_admission()`
(services/gateway/limits.py) the admission that tokens are charged to.
"""

from __future__ import annotations

import logging
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import AsyncIterator, Mapping

import grpc

from modelgrid.errors import ModelGridError
from services.common.interceptors import Around, AroundInterceptor
from services.gateway.auth import Authenticator, set_current_principal
from services.gateway.limits import RateLimited, RateLimiter
from services.gateway.metering import REJECTED

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Access:
    public: bool = False  # no key needed
    admin: bool = False  # PERMISSION_DENIED for a key that is not an admin key
    stream: bool = False  # holds a generation stream (per-key max_streams, the gateway's max_sessions)
    tokens: bool = False  # spends tokens (checked against the key's tokens per minute)


KEYED = Access()
_GATEWAY = "/modelgrid.v1.Gateway/"
ADMIN_METHODS = (
    "RegisterModel", "SetAlias", "SetReplicas", "ListWorkers", "ListPlacements",
    "CreateKey", "ListKeys", "RevokeKey", "GetStats",
)
JOB_METHODS = ("SubmitJob", "GetJob", "WatchJob", "CancelJob", "ListJobs", "GetJobResults")
POLICY: dict[str, Access] = {
    "/grpc.health.v1.Health/Check": Access(public=True),
    "/grpc.health.v1.Health/Watch": Access(public=True),
    _GATEWAY + "Generate": Access(stream=True, tokens=True),
    _GATEWAY + "Embed": Access(tokens=True),
    **{_GATEWAY + m: Access(admin=True) for m in ADMIN_METHODS},
    # batch jobs: any key, each call one request; a job's items are not charged as tokens (services/gateway/jobs.py
    # limits every call to the caller's own jobs unless the key is an admin key)
    **{_GATEWAY + m: KEYED for m in JOB_METHODS},
    # the KServe Open Inference Protocol on the same server (services/gateway/kserve.py)
    "/inference.GRPCInferenceService/ServerLive": Access(public=True),
    "/inference.GRPCInferenceService/ServerReady": Access(public=True),
    "/inference.GRPCInferenceService/ModelInfer": Access(stream=True, tokens=True),
}


def _status(err: ModelGridError) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, err.code, grpc.StatusCode.INTERNAL)


class GuardInterceptor(AroundInterceptor):
    def __init__(self, auth: Authenticator, limiter: RateLimiter, policy: Mapping[str, Access] | None = None) -> None:
        self.auth = auth
        self.limiter = limiter
        self.policy = POLICY if policy is None else policy

    def around(self, details: grpc.HandlerCallDetails) -> Around | None:
        access = self.policy.get(details.method, KEYED)
        if access.public:
            return None
        method = details.method.rsplit("/", 1)[-1]

        @asynccontextmanager
        async def guarded(context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
            async with AsyncExitStack() as stack:
                try:
                    principal = await self.auth.authenticate(context.invocation_metadata())
                    if access.admin:
                        self.auth.require_admin(principal, method)
                    await stack.enter_async_context(
                        self.limiter.admit(principal, stream=access.stream, tokens=access.tokens)
                    )
                except ModelGridError as err:
                    reason = err.limit if isinstance(err, RateLimited) else err.code.lower()
                    REJECTED.labels(reason).inc()
                    log.info("%s refused: %s: %s", method, err.code, err.message)
                    await context.abort(_status(err), err.message, getattr(err, "trailing_metadata", ()))
                set_current_principal(principal)
                yield

        return guarded
