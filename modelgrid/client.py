"""Blocking Python client of the ModelGrid gateway.

    with modelgrid.Client("localhost:50051") as client:
        for chunk in client.generate("demo", prompt="hello", max_tokens=8):
            print(chunk.text, end="", flush=True)

Failed calls raise modelgrid.errors classes (NotFound, InvalidArgument, Unavailable, ...) carrying
the server's message; nothing grpc-specific leaks out.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import grpc

from modelgrid import admin, convert, jobs, types
from modelgrid.channel import CLIENT_OPTIONS, sync_channel
from modelgrid.upload import ProgressFn, iter_upload_chunks, plan_upload
from modelgrid.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, jobs_pb2

DEFAULT_ADDRESS = "localhost:50051"
ADDRESS_ENV = "MODELGRID_GATEWAY"


def resolve_address(address: str | None) -> str:
    """address, else $MODELGRID_GATEWAY, else localhost:50051."""
    return address or os.environ.get(ADDRESS_ENV) or DEFAULT_ADDRESS


class Client:
    """A persistent channel to one gateway. Thread-safe; close() it (or use `with`) when done.

    timeout is the deadline in seconds of every call (for generate: of the whole stream); None = no deadline.
    api_key (else $MODELGRID_API_KEY) goes with every call as `authorization: Bearer <key>`.
    """

    def __init__(self, address: str | None = None, timeout: float | None = None, api_key: str | None = None) -> None:
        self.address = resolve_address(address)
        self.timeout = timeout
        self._metadata = admin.auth_metadata(admin.resolve_api_key(api_key))
        self._channel = sync_channel(self.address, CLIENT_OPTIONS)
        self._stub = gateway_pb2_grpc.GatewayStub(self._channel)

    # -- lifecycle ---------------------------------------------------------------------------
    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"modelgrid.Client({self.address!r})"

    def _unary(self, method: Callable[..., Any], request: Any) -> Any:
        try:
            return method(request, timeout=self.timeout, metadata=self._metadata)
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
    ) -> Iterator[types.GenerateChunk]:
        """Stream generated tokens. Pass exactly one of prompt (text) or prompt_ids.

        Arguments are checked now; the call starts when iteration does. Leaving the loop early
        cancels the generation on the server.
        """
        request = convert.generate_request(
            model, prompt, prompt_ids, max_tokens, temperature, top_p, top_k, seed, stop, version
        )
        return self._stream(request)

    def _stream(self, request: gateway_pb2.GenerateRequest) -> Iterator[types.GenerateChunk]:
        call = self._stub.Generate(request, timeout=self.timeout, metadata=self._metadata)
        try:
            for message in call:
                yield convert.chunk_from_proto(message)
        except grpc.RpcError as err:
            raise convert.error_from_rpc(err, self.address) from err
        finally:
            call.cancel()

    def generate_text(self, model: str, prompt: str | None = None, **kwargs: Any) -> types.Completion:
        """generate(), collected into one Completion (text, token_ids, finish_reason, usage)."""
        builder = convert.CompletionBuilder()
        for chunk in self.generate(model, prompt, **kwargs):
            builder.add(chunk)
        return builder.build()

    def embed(self, model: str, texts: Sequence[str], version: str | None = None) -> list[list[float]]:
        """One normalised embedding per text, from an encoder model."""
        reply = self._unary(self._stub.Embed, convert.embed_request(model, texts, version))
        return convert.embeddings_from_proto(reply)

    # -- models ------------------------------------------------------------------------------
    def list_models(self) -> list[types.ModelInfo]:
        reply = self._unary(self._stub.ListModels, common_pb2.ListModelsRequest())
        return [convert.model_from_proto(m) for m in reply.models]

    def get_model(self, name: str) -> types.ModelInfo:
        return convert.model_from_proto(self._unary(self._stub.GetModel, common_pb2.GetModelRequest(name=name)))

    def register(
        self,
        directory: str | Path,
        name: str,
        aliases: Sequence[str] = (),
        replicas: int = 0,
        stages: int = 0,
        progress: ProgressFn | None = None,
    ) -> types.VersionInfo:
        """Upload a Hugging Face checkpoint directory as a new version of model `name` and place it.

        replicas / stages 0 keep the model's current values (1 replica, automatic stages for a new
        model). progress(sent_bytes, total_bytes) is called as the upload goes (from a gRPC thread).
        """
        convert.check_register_args(name, replicas, stages)
        plan = plan_upload(directory)
        failure: list[BaseException] = []

        def messages() -> Iterator[common_pb2.UploadVersionChunk]:
            # gRPC reads this in its own thread and swallows exceptions; keep them to re-raise here.
            try:
                yield from iter_upload_chunks(plan, name, aliases, replicas, stages, on_progress=progress)
            except BaseException as exc:
                failure.append(exc)
                raise

        try:
            reply = self._stub.RegisterModel(messages(), timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as err:
            if failure:
                raise failure[0] from err
            raise convert.error_from_rpc(err, self.address) from err
        return convert.version_from_proto(reply)

    def set_alias(self, name: str, alias: str, version: str) -> types.VersionInfo:
        """Point alias at version (or at what another alias points at)."""
        request = common_pb2.SetAliasRequest(model=name, alias=alias, version=version)
        return convert.version_from_proto(self._unary(self._stub.SetAlias, request))

    def set_replicas(self, name: str, replicas: int) -> types.ModelInfo:
        request = common_pb2.SetReplicasRequest(model=name, replicas=replicas)
        return convert.model_from_proto(self._unary(self._stub.SetReplicas, request))

    # -- cluster -----------------------------------------------------------------------------
    def placement(self, name: str, version: str | None = None) -> types.Placement:
        """Where the stages of a version (default: latest) run, and whether they are ready."""
        request = common_pb2.GetPlacementRequest(model=name, version=version or "")
        return convert.placement_from_proto(self._unary(self._stub.GetPlacement, request))

    def workers(self) -> list[types.WorkerInfo]:
        reply = self._unary(self._stub.ListWorkers, common_pb2.ListWorkersRequest())
        return [convert.worker_from_proto(w) for w in reply.workers]

    def placements(self) -> list[types.Placement]:
        """Every placement the scheduler holds (admin)."""
        reply = self._unary(self._stub.ListPlacements, common_pb2.ListPlacementsRequest())
        return [convert.placement_from_proto(p) for p in reply.placements]

    def stats(self) -> admin.GatewayStats:
        """This gateway's traffic of the last minute (admin)."""
        return admin.stats_from_proto(self._unary(self._stub.GetStats, gateway_pb2.GetStatsRequest()))

    # -- API keys (admin) --------------------------------------------------------------------
    def create_key(
        self, name: str, admin_key: bool = False, requests_per_minute: int = 0, tokens_per_minute: int = 0,
        max_streams: int = 0,
    ) -> admin.CreatedKey:
        """A new key; its secret is in the result only (the platform stores a hash). Limits: 0 = unlimited."""
        request = admin.create_key_request(name, admin_key, requests_per_minute, tokens_per_minute, max_streams)
        return admin.created_from_proto(self._unary(self._stub.CreateKey, request))

    def list_keys(self, include_revoked: bool = False) -> list[admin.ApiKeyInfo]:
        reply = self._unary(self._stub.ListKeys, common_pb2.ListKeysRequest(include_revoked=include_revoked))
        return [admin.key_from_proto(k) for k in reply.keys]

    def revoke_key(self, key: str) -> admin.ApiKeyInfo:
        """Revoke a key by name or key id; gateways stop accepting it within seconds."""
        return admin.key_from_proto(self._unary(self._stub.RevokeKey, common_pb2.RevokeKeyRequest(key=key)))

    # -- batch jobs --------------------------------------------------------------------------
    def submit_job(self, model: str, kind: str, items: jobs.Items | None = None,
                   jsonl: str | os.PathLike[str] | bytes | None = None, **params: Any) -> jobs.JobInfo:
        """Submit a batch job ("embed" or "generate") over items (texts/prompts or dicts) or a JSONL file.

        params: version, max_tokens, temperature (default 0), top_p, top_k, seed, stop, task_items. A bad item
        raises InvalidArgument naming its line (or index) before anything runs.
        """
        request = jobs.submit_request(model, kind, items, jsonl, **params)
        return jobs.job_from_proto(self._unary(self._stub.SubmitJob, request))

    def get_job(self, job_id: str) -> jobs.JobInfo:
        return jobs.job_from_proto(self._unary(self._stub.GetJob, jobs_pb2.GetJobRequest(job_id=job_id)))

    def watch_job(self, job_id: str, interval_s: float = 0.5) -> Iterator[jobs.JobInfo]:
        """The job now, then whenever its progress changes, until it ends."""
        request = jobs_pb2.WatchJobRequest(job_id=job_id, interval_s=interval_s)
        return (jobs.job_from_proto(m) for m in self._server_stream(self._stub.WatchJob, request))

    def cancel_job(self, job_id: str) -> jobs.JobInfo:
        """Stop handing out the job's tasks; the result says how many items finished."""
        return jobs.job_from_proto(self._unary(self._stub.CancelJob, jobs_pb2.CancelJobRequest(job_id=job_id)))

    def list_jobs(self, states: Sequence[str] = (), limit: int = 50) -> list[jobs.JobInfo]:
        reply = self._unary(self._stub.ListJobs, jobs_pb2.ListJobsRequest(states=list(states), limit=limit))
        return [jobs.job_from_proto(j) for j in reply.jobs]

    def job_results(self, job_id: str, start: int = 0) -> Iterator[jobs.JobResult]:
        """Finished items in input order, streamed."""
        request = jobs_pb2.GetJobResultsRequest(job_id=job_id, start=start)
        return (jobs.result_from_proto(m) for m in self._server_stream(self._stub.GetJobResults, request))

    def _server_stream(self, method: Callable[..., Any], request: Any) -> Iterator[Any]:
        call = method(request, timeout=self.timeout, metadata=self._metadata)
        try:
            yield from call
        except grpc.RpcError as err:
            raise convert.error_from_rpc(err, self.address) from err
        finally:
            call.cancel()
