"""GatewayApp: the gateway's collaborators wired together, and what each public call does with them.

`start_gateway(config)` starts a real gateway in the current event loop (port 0 works), for
`python -m services.gateway` and for in-process tests alike.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from typing import Any, AsyncIterator, Awaitable

import grpc

from modelgrid.errors import FailedPrecondition, ModelGridError
from modelgrid.v1 import gateway_pb2_grpc
from services.common.server import RunningServer, create_server
from services.gateway import pipeline
from services.gateway.auth import Authenticator
from services.gateway.config import GatewayConfig
from services.gateway.domain import Chunk, Embeddings, Sampling, VersionInfo
from services.gateway.guard import GuardInterceptor
from services.gateway.job_clients import JobQueueClient, JobStoreClient
from services.gateway.job_runner import JobRunner
from services.gateway.jobs import JobsApi
from services.gateway.limits import RateLimiter
from services.gateway.metering import Meter
from services.gateway.pipeline import Plan, RetryPolicy, Router
from services.gateway.tokenizers import ModelTokenizer, TokenizerCache
from services.gateway.upstream import (
    DEFAULT_TIMEOUT_S,
    Channels,
    RegistryClient,
    RouteCache,
    SchedulerClient,
    VersionCache,
    Workers,
)
from services.gateway.validation import EmbedParams, GenerateParams, Limits, check_token_ids, plan_max_tokens

log = logging.getLogger(__name__)

SERVICE_NAME = "modelgrid.v1.Gateway"
RECONCILE_TIMEOUT_S = 120.0


class GatewayApp:
    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.channels = Channels()
        self.registry = RegistryClient(self.channels, config.registry)
        self.scheduler = SchedulerClient(self.channels, config.scheduler)
        self.workers = Workers(self.channels)
        self.versions = VersionCache(self.registry, config.version_cache_s)
        self.routes = RouteCache(self.scheduler, config.route_cache_s)
        self.tokenizers = TokenizerCache(self.registry.fetch_file)
        self.router = Router(self.routes, self.scheduler, self.workers, RetryPolicy(max_failovers=config.max_failovers))
        self.limits = Limits(config.default_max_tokens, config.max_tokens_cap, config.max_prompt_tokens)
        # who may call (auth.py), how much (limits.py), and what it cost (metering.py): see guard.py
        self.auth = Authenticator(self.registry.verify_key, config.auth, ttl_s=config.auth_cache_s)
        self.limiter = RateLimiter(
            config.redis_url, config.rate_window_s, config.max_sessions, lease_s=config.max_request_s + 10.0
        )
        self.meter = Meter()
        # batch jobs: the public calls (jobs.py) and the executor running tasks here (job_runner.py)
        job_store = JobStoreClient(self.channels, config.registry)
        job_queue = JobQueueClient(self.channels, config.scheduler)
        self.jobs = JobsApi(job_store, job_queue, self.versions, self.limits)
        self.job_runner = JobRunner(self, job_store, job_queue, config.job_lanes, config.job_task_timeout_s,
                                    config.job_generate_concurrency)
        self.http: Any = None  # the OpenAI-compatible HTTP API (http_api.HttpServer) when --http-port != -1
        self._background: set[asyncio.Task] = set()

    def deadline(self, time_remaining: float | None) -> float:
        """time.monotonic() by which a request must end: the client's deadline, capped by max_request_s."""
        budget = self.config.max_request_s
        if time_remaining is not None:
            budget = min(budget, max(time_remaining, 0.0))
        return time.monotonic() + budget

    async def _resolve(self, model: str, version: str, deadline: float) -> VersionInfo:
        timeout = min(DEFAULT_TIMEOUT_S, pipeline.remaining(deadline, f"resolving {model} {version or 'latest'}"))
        return await self.versions.resolve(model, version, timeout)

    # ---- generation -------------------------------------------------------------------------

    async def plan_generation(self, params: GenerateParams, deadline: float) -> tuple[Plan, ModelTokenizer]:
        """Resolve the version, tokenize the prompt and check it against the model."""
        version = await self._resolve(params.model, params.version, deadline)
        if version.kind != "decoder":
            raise FailedPrecondition(
                f"{version.label} is an encoder ({version.architecture}) and cannot generate text: use Embed"
            )
        tokenizer = await self.tokenizers.get(version)
        if params.text is not None:
            prompt = tuple(tokenizer.encode(params.text))
        else:
            prompt = params.token_ids or ()
            check_token_ids(prompt, version.vocab_size, version.label)
        max_tokens = plan_max_tokens(len(prompt), params.max_tokens, version.max_context, self.limits)
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        plan = Plan(
            version=version,
            prompt_ids=prompt,
            max_tokens=max_tokens,
            sampling=Sampling(params.temperature, params.top_k, params.top_p, seed),
            stop=params.stop,
            deadline=deadline,
        )
        return plan, tokenizer

    def generate(self, plan: Plan, tokenizer: ModelTokenizer) -> AsyncIterator[Chunk]:
        chunks = pipeline.generate(self.router, plan, tokenizer)
        return self.meter.generation(plan.version.model, len(plan.prompt_ids), chunks)

    # ---- embeddings -------------------------------------------------------------------------

    async def embed(self, params: EmbedParams, deadline: float) -> tuple[VersionInfo, Embeddings]:
        version = await self._resolve(params.model, params.version, deadline)
        if version.kind != "encoder":
            raise FailedPrecondition(
                f"{version.label} is a decoder ({version.architecture}) and produces no embeddings: use Generate"
            )
        tokenizer = await self.tokenizers.get(version)
        work = pipeline.embed(self.router, version, tokenizer, params.texts, deadline)
        return version, await self.meter.embedding(version.model, work, lambda result: result.prompt_tokens)

    # ---- admin ------------------------------------------------------------------------------

    async def register(self, chunks: AsyncIterator[Any], timeout: float | None) -> Any:
        """Proxy an upload to the registry, then ask the scheduler to place the new version."""
        version = await self.registry.upload_version(chunks, timeout)
        self.reconcile_soon(f"registered {version.model} {version.version}")
        return version

    def reconcile_soon(self, why: str) -> None:
        """Ask the scheduler to place what changed now rather than at its next tick (best effort)."""

        async def reconcile() -> None:
            try:
                await self.scheduler.reconcile(RECONCILE_TIMEOUT_S)
                log.info("scheduler reconciled after: %s", why)
            except ModelGridError as err:
                log.warning(
                    "Scheduler.Reconcile after %s failed (it will place at its next tick): %s", why, err.message
                )

        task = asyncio.create_task(reconcile(), name="reconcile")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def stop_http(self, grace_s: float | None = None) -> Awaitable[None]:
        """Start draining the HTTP API, if served (for grace_s, default --grace-s); await the result for it
        to be stopped."""
        if self.http is not None:
            return self.http.stop(grace_s)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    async def close(self) -> None:
        await self.job_runner.stop()
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await self.limiter.close()
        await self.workers.close()
        await self.channels.close()


async def start_gateway(config: GatewayConfig) -> tuple[RunningServer, GatewayApp]:
    """Start the gateway's gRPC server on config.listen; stop it with `await stop_gateway(running, app)`."""
    from services.gateway import kserve
    from services.gateway.servicer import GatewayServicer

    app = GatewayApp(config)
    servicer = GatewayServicer(app)

    def add(server: grpc.aio.Server) -> None:
        gateway_pb2_grpc.add_GatewayServicer_to_server(servicer, server)
        kserve.add_kserve_servicer(app, server)  # the KServe Open Inference Protocol v2, same port

    if config.http_port != -1:  # first: health says SERVING once the gRPC server starts, with HTTP up
        from services.gateway.http_api import start_http_api

        try:
            app.http = await start_http_api(app)
        except BaseException:
            await app.close()
            raise
    try:
        running = await create_server(
            config.listen, add, [SERVICE_NAME, kserve.SERVICE_NAME], "gateway",
            interceptors=[GuardInterceptor(app.auth, app.limiter)], make_request_ids=True,
            options=[("grpc.max_receive_message_length", config.max_request_bytes)],
        )
    except BaseException:
        await app.stop_http(0)
        await app.close()
        raise
    app.job_runner.start()
    log.info("gateway serving on port %d (registry %s, scheduler %s, auth %s)", running.port, config.registry,
             config.scheduler, config.auth)
    if not app.auth.enabled:
        log.warning("auth is disabled: every caller is an admin without limits; only run so behind another auth layer")
    return running, app


async def stop_gateway(running: RunningServer, app: GatewayApp, grace_s: float = 0.0) -> None:
    """NOT_SERVING, drain in-flight calls (gRPC and HTTP) for grace_s, stop; then close the downstream channels."""
    await asyncio.gather(running.stop(grace_s), app.stop_http(grace_s))
    await app.close()
