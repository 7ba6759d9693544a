"""Protobuf <-> SDK conversions shared by Client and AsyncClient (the only SDK module that builds requests)."""

from __future__ import annotations

from typing import Sequence

import grpc

from modelgrid import types
from modelgrid.errors import InvalidArgument, ModelGridError, from_code
from modelgrid.v1 import common_pb2, gateway_pb2

MAX_STOP_SEQUENCES = 4


def error_from_rpc(err: grpc.RpcError, address: str) -> ModelGridError:
    """The modelgrid.errors class of a failed call, with the server's message.

    A gateway that cannot be reached gets a hint, since that is the first thing a new user meets.
    """
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = (err.details() if hasattr(err, "details") else None) or code.name
    if code == grpc.StatusCode.UNAVAILABLE and ("connect" in details.lower() or "connection" in details.lower()):
        details = f"cannot reach the ModelGrid gateway at {address} ({details}); is it running? (`modelgrid up`)"
    return from_code(code.name, details)


def generate_request(
    model: str,
    prompt: str | None,
    prompt_ids: Sequence[int] | None,
    max_tokens: int | None,
    temperature: float | None,
    top_p: float | None,
    top_k: int | None,
    seed: int | None,
    stop: str | Sequence[str] | None,
    version: str | None,
) -> gateway_pb2.GenerateRequest:
    """Build a GenerateRequest; InvalidArgument for what can be caught before the network."""
    if not model:
        raise InvalidArgument("model is required")
    if (prompt is None) == (prompt_ids is None):
        raise InvalidArgument("pass exactly one of prompt (text) or prompt_ids (token ids)")
    if isinstance(stop, str):
        stop = [stop]
    request = gateway_pb2.GenerateRequest(model=model, version=version or "", stop=list(stop or ()))
    if prompt is not None:
        request.text = prompt
    else:
        ids = list(prompt_ids or ())
        if not ids:
            raise InvalidArgument("prompt_ids is empty; pass at least one token id")
        if any(not isinstance(i, int) or isinstance(i, bool) or i < 0 or i >= 2**31 for i in ids):
            raise InvalidArgument("prompt_ids must be non-negative integers below 2**31")
        request.token_ids.ids.extend(ids)
    if max_tokens is not None:
        request.max_tokens = max_tokens
    if temperature is not None:
        request.temperature = temperature
    if top_p is not None:
        request.top_p = top_p
    if top_k is not None:
        request.top_k = top_k
    if seed is not None:
        if seed < 0 or seed >= 2**64:
            raise InvalidArgument(f"seed must be in [0, 2**64), got {seed}")
        request.seed = seed
    return request


def chunk_from_proto(msg: gateway_pb2.GenerateChunk) -> types.GenerateChunk:
    return types.GenerateChunk(
        text=msg.text,
        token_id=msg.token_id,
        logprob=msg.logprob,
        index=msg.index,
        version=msg.version,
        finish_reason=msg.finish_reason or None,
        usage=usage_from_proto(msg.usage) if msg.HasField("usage") else None,
    )


def usage_from_proto(msg: gateway_pb2.Usage) -> types.Usage:
    return types.Usage(msg.prompt_tokens, msg.completion_tokens, msg.total_tokens)


class CompletionBuilder:
    """Collects streamed chunks into a Completion."""

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.token_ids: list[int] = []
        self.logprobs: list[float] = []
        self.finish_reason = ""
        self.usage: types.Usage | None = None
        self.version = ""

    def add(self, chunk: types.GenerateChunk) -> None:
        self.texts.append(chunk.text)
        self.token_ids.append(chunk.token_id)
        self.logprobs.append(chunk.logprob)
        self.version = chunk.version or self.version
        if chunk.finish_reason:
            self.finish_reason = chunk.finish_reason
        if chunk.usage is not None:
            self.usage = chunk.usage

    def build(self) -> types.Completion:
        usage = self.usage or types.Usage(0, len(self.token_ids), len(self.token_ids))
        return types.Completion(
            text="".join(self.texts),
            token_ids=self.token_ids,
            finish_reason=self.finish_reason,
            usage=usage,
            version=self.version,
            logprobs=self.logprobs,
        )


def embed_request(model: str, texts: Sequence[str], version: str | None) -> gateway_pb2.EmbedRequest:
    if isinstance(texts, str):
        raise InvalidArgument("texts must be a list of strings, not one string")
    if not texts:
        raise InvalidArgument("texts is empty; pass at least one text")
    return gateway_pb2.EmbedRequest(model=model, version=version or "", texts=list(texts))


def embeddings_from_proto(msg: gateway_pb2.EmbedResponse) -> list[list[float]]:
    return [list(e.values) for e in msg.embeddings]


def version_from_proto(msg: common_pb2.ModelVersion) -> types.VersionInfo:
    return types.VersionInfo(
        model=msg.model,
        version=msg.version,
        architecture=msg.architecture,
        kind=msg.kind,
        num_layers=msg.num_layers,
        vocab_size=msg.vocab_size,
        max_context=msg.max_context,
        aliases=list(msg.aliases),
        files=[types.FileInfo(f.path, f.size, f.sha256) for f in msg.files],
        layer_bytes=list(msg.layer_bytes),
        embed_bytes=msg.embed_bytes,
        head_bytes=msg.head_bytes,
        kv_bytes_per_token_per_layer=msg.kv_bytes_per_token_per_layer,
        created_unix_ms=msg.created_unix_ms,
    )


def model_from_proto(msg: common_pb2.Model) -> types.ModelInfo:
    return types.ModelInfo(
        name=msg.name,
        versions=[version_from_proto(v) for v in msg.versions],
        aliases=dict(sorted(msg.aliases.items())),
        replicas=msg.replicas,
        num_stages=msg.num_stages,
    )


def worker_from_proto(msg: common_pb2.WorkerInfo) -> types.WorkerInfo:
    return types.WorkerInfo(
        worker_id=msg.worker_id,
        address=msg.address,
        device=msg.device,
        total_memory=msg.total_memory,
        free_memory=msg.free_memory,
        stages=[
            types.LoadedStage(s.model, s.version, s.start_layer, s.end_layer, s.param_bytes, s.epoch)
            for s in msg.stages
        ],
        heartbeat_age_s=msg.heartbeat_age_s,
        state=msg.state,
        active_sessions=msg.active_sessions,
        kv_cache_bytes=msg.kv_cache_bytes,
    )


def placement_from_proto(msg: common_pb2.Placement) -> types.Placement:
    return types.Placement(
        model=msg.model,
        version=msg.version,
        epoch=msg.epoch,
        stages=[
            types.PlacedStage(
                start_layer=s.start_layer,
                end_layer=s.end_layer,
                replicas=[types.Replica(r.worker_id, r.address, r.ready) for r in s.replicas],
            )
            for s in msg.stages
        ],
        state=msg.state,
        message=msg.message,
    )


def check_register_args(name: str, replicas: int, stages: int) -> None:
    if not name:
        raise InvalidArgument("a model name is required")
    if replicas < 0:
        raise InvalidArgument(f"replicas must be >= 0 (0 keeps the current value), got {replicas}")
    if stages < 0:
        raise InvalidArgument(f"stages must be >= 0 (0 lets the scheduler choose), got {stages}")
