"""asyncio client of the ModelGrid gateway: the twin of modelgrid.Client on grpc.aio.

    async with modelgrid.AsyncClient("localhost:50051") as client:
        async for chunk in client.generate("demo", prompt="hello", max_tokens=8):
            print(chunk.text, end="", flush=True)
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Sequence

import grpc

from modelgrid import admin, convert, jobs, types
from modelgrid.channel import CLIENT_OPTIONS, aio_channel
from modelgrid.client import resolve_address
from modelgrid.upload import ProgressFn, aiter_upload_chunks, plan_upload
from modelgrid.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, jobs_pb2


class AsyncClient:
    """A persistent grpc.aio channel to one gateway, opened on first use inside the running loop.

    Use it from one event loop; `await close()` (or `async with`) when done.
    """

    def __init__(self, address: str | None = None, timeout: float | None = None, api_key: str | None = None) -> None:
        self.address = resolve_address(address)
        self.timeout = timeout
        self._metadata = admin.auth_metadata(admin.resolve_api_key(api_key))
        self._channel: grpc.aio.Channel | None = None
        self._stub_instance: gateway_pb2_grpc.GatewayStub | None = None

    @property
    def _stub(self) -> gateway_pb2_grpc.GatewayStub:
        if self._stub_instance is None:
            self._channel = aio_channel(self.address, CLIENT_OPTIONS)
            self._stub_instance = gateway_pb2_grpc.GatewayStub(self._channel)
        return self._stub_instance

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
            self._stub_instance = None

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"modelgrid.AsyncClient({self.address!r})"

    async def _unary(self, method: Callable[..., Any], request: Any) -> Any:
        try:
            return await method(request, timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as err:
            raise convert.error_from_rpc(err, self.address) from err

    # -- inference ---------------------------------------------------------------------------
    def generate(
        self,
        model: str,
        prompt: str | None = None,
        prompt_ids: Sequence[int] | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        version: str | None = None,
    ) -> AsyncIterator[types.GenerateChunk]:
        """Stream generated tokens (`async for`). Arguments are checked now, before any network call;
        leaving the loop early cancels the generation on the server."""
        request = convert.generate_request(
            model, prompt, prompt_ids, max_tokens, temperature, top_p, top_k, seed, stop, version
        )
        return self._stream(request)

    async def _stream(self, request: gateway_pb2.GenerateRequest) -> AsyncIterator[types.GenerateChunk]:
        call = self._stub.Generate(request, timeout=self.timeout, metadata=self._metadata)
        try:
            async for message in call:
                yield convert.chunk_from_proto(message)
        except grpc.RpcError as err:
            raise convert.error_from_rpc(err, self.address) from err
        finally:
            call.cancel()

    async def generate_text(self, model: str, prompt: str | None = None, **kwargs: Any) -> types.Completion:
        """generate(), collected into one Completion (text, token_ids, finish_reason, usage)."""
        builder = convert.CompletionBuilder()
        async for chunk in self.generate(model, prompt, **kwargs):
            builder.add(chunk)
        return builder.build()

    async def embed(self, model: str, texts: Sequence[str], version: str | None = None) -> list[list[float]]:
        reply = await self._unary(self._stub.Embed, convert.embed_request(model, texts, version))
        return convert.embeddings_from_proto(reply)

    # -- models ------------------------------------------------------------------------------
    async def list_models(self) -> list[types.ModelInfo]:
        reply = await self._unary(self._stub.ListModels, common_pb2.ListModelsRequest())
        return [convert.model_from_proto(m) for m in reply.models]

    async def get_model(self, name: str) -> types.ModelInfo:
        reply = await self._unary(self._stub.GetModel, common_pb2.GetModelRequest(name=name))
        return convert.model_from_proto(reply)

    async def register(
        self,
        directory: str | Path,
        name: str,
        aliases: Sequence[str] = (),
        replicas: int = 0,
        stages: int = 0,
        progress: ProgressFn | None = None,
    ) -> types.VersionInfo:
        """Upload a checkpoint directory as a new version of `name`; see Client.register."""
        convert.check_register_args(name, replicas, stages)
        plan = await asyncio.to_thread(plan_upload, directory)  # hashing is slow: off the event loop
        failure: list[BaseException] = []

        async def messages() -> AsyncIterator[common_pb2.UploadVersionChunk]:
            try:
                async for message in aiter_upload_chunks(plan, name, aliases, replicas, stages,
                                                         on_progress=progress):
                    yield message
            except BaseException as exc:
                failure.append(exc)
                raise

        call = self._stub.RegisterModel(messages(), timeout=self.timeout, metadata=self._metadata)
        try:
            reply = await call
        except grpc.RpcError as err:
            if failure:
                raise failure[0] from err
            raise convert.error_from_rpc(err, self.address) from err
        if failure:
            raise failure[0]
        return convert.version_from_proto(reply)

    async def set_alias(self, name: str, alias: str, version: str) -> types.VersionInfo:
        request = common_pb2.SetAliasRequest(model=name, alias=alias, version=version)
        return convert.version_from_proto(await self._unary(self._stub.SetAlias, request))

    async def set_replicas(self, name: str, replicas: int) -> types.ModelInfo:
        request = common_pb2.SetReplicasRequest(model=name, replicas=replicas)
        return convert.model_from_proto(await self._unary(self._stub.SetReplicas, request))

    # -- cluster -----------------------------------------------------------------------------
    async def placement(self, name: str, version: str | None = None) -> types.Placement:
        request = common_pb2.GetPlacementRequest(model=name, version=version or "")
        return convert.placement_from_proto(await self._unary(self._stub.GetPlacement, request))

    async def workers(self) -> list[types.WorkerInfo]:
        reply = await self._unary(self._stub.ListWorkers, common_pb2.ListWorkersRequest())
        return [convert.worker_from_proto(w) for w in reply.workers]

    async def placements(self) -> list[types.Placement]:
        reply = await self._unary(self._stub.ListPlacements, common_pb2.ListPlacementsRequest())
        return [convert.placement_from_proto(p) for p in reply.placements]

    async def stats(self) -> admin.GatewayStats:
        return admin.stats_from_proto(await self._unary(self._stub.GetStats, gateway_pb2.GetStatsRequest()))

    # -- API keys (admin) --------------------------------------------------------------------
    async def create_key(
        self, name: str, admin_key: bool = False, requests_per_minute: int = 0, tokens_per_minute: int = 0,
        max_streams: int = 0,
    ) -> admin.CreatedKey:
        request = admin.create_key_request(name, admin_key, requests_per_minute, tokens_per_minute, max_streams)
        return admin.created_from_proto(await self._unary(self._stub.CreateKey, request))

    async def list_keys(self, include_revoked: bool = False) -> list[admin.ApiKeyInfo]:
        reply = await self._unary(self._stub.ListKeys, common_pb2.ListKeysRequest(include_revoked=include_revoked))
        return [admin.key_from_proto(k) for k in reply.keys]

    async def revoke_key(self, key: str) -> admin.ApiKeyInfo:
        return admin.key_from_proto(await self._unary(self._stub.RevokeKey, common_pb2.RevokeKeyRequest(key=key)))

    # -- batch jobs (see Client.submit_job) ---------------------------------------------------
    async def submit_job(self, model: str, kind: str, items: jobs.Items | None = None,
                         jsonl: str | os.PathLike[str] | bytes | None = None, **params: Any) -> jobs.JobInfo:
        request = await asyncio.to_thread(jobs.submit_request, model, kind, items, jsonl, **params)
        return jobs.job_from_proto(await self._unary(self._stub.SubmitJob, request))

    async def get_job(self, job_id: str) -> jobs.JobInfo:
        return jobs.job_from_proto(await self._unary(self._stub.GetJob, jobs_pb2.GetJobRequest(job_id=job_id)))

    async def watch_job(self, job_id: str, interval_s: float = 0.5) -> AsyncIterator[jobs.JobInfo]:
        request = jobs_pb2.WatchJobRequest(job_id=job_id, interval_s=interval_s)
        async for message in self._server_stream(self._stub.WatchJob, request):
            yield jobs.job_from_proto(message)

    async def cancel_job(self, job_id: str) -> jobs.JobInfo:
        request = jobs_pb2.CancelJobRequest(job_id=job_id)
        return jobs.job_from_proto(await self._unary(self._stub.CancelJob, request))

    async def list_jobs(self, states: Sequence[str] = (), limit: int = 50) -> list[jobs.JobInfo]:
        reply = await self._unary(self._stub.ListJobs, jobs_pb2.ListJobsRequest(states=list(states), limit=limit))
        return [jobs.job_from_proto(j) for j in reply.jobs]

    async def job_results(self, job_id: str, start: int = 0) -> AsyncIterator[jobs.JobResult]:
        request = jobs_pb2.GetJobResultsRequest(job_id=job_id, start=start)
        async for message in self._server_stream(self._stub.GetJobResults, request):
            yield jobs.result_from_proto(message)

    async def _server_stream(self, method: Callable[..., Any], request: Any) -> AsyncIterator[Any]:
        call = method(request, timeout=self.timeout, metadata=self._metadata)
        try:
            async for message in call:
                yield message
        except grpc.RpcError as err:
            raise convert.error_from_rpc(err, self.address) from err
        finally:
            call.cancel()
