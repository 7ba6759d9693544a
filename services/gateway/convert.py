"""Protobuf <-> the gateway's plain data (domain.py, validation.py), and tensors on the wire <-> numpy.

The servicer (public API) and upstream.py (downstream stubs) call these; the modules in between
(validation, tokenizers, stops, pipeline) never see a *_pb2 type, except hidden states, which pass
from one hop to the next untouched.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from modelgrid.errors import Unavailable
from modelgrid.v1 import common_pb2, gateway_pb2, jobs_pb2
from services.gateway.auth import KeyLimits, Principal
from services.gateway.domain import Chunk, Embeddings, Hop, ItemOutput, JobSettings, Route, TaskLease, VersionInfo
from services.gateway.job_inputs import JobInput, JobSubmission, check_items, parse_jsonl
from services.gateway.metering import Traffic
from services.gateway.validation import EmbedParams, GenerateParams, Limits, parse_embed, parse_generate


def version_from_proto(v: common_pb2.ModelVersion) -> VersionInfo:
    return VersionInfo(
        model=v.model,
        version=v.version,
        architecture=v.architecture,
        kind=v.kind,
        vocab_size=v.vocab_size,
        max_context=v.max_context,
        config=VersionInfo.parse_config(v.config_json),
        files=tuple(f.path for f in v.files),
    )


def route_from_proto(r: common_pb2.Route) -> Route:
    return Route(
        model=r.model,
        version=r.version,
        epoch=r.epoch,
        hops=tuple(Hop(h.start_layer, h.end_layer, h.worker_id, h.address) for h in r.hops),
    )


def principal_from_proto(k: common_pb2.ApiKey) -> Principal:
    limits = KeyLimits(k.limits.requests_per_minute, k.limits.tokens_per_minute, k.limits.max_streams)
    return Principal(key_id=k.key_id, name=k.name, admin=k.admin, limits=limits)


def without_addresses(placement: common_pb2.Placement) -> common_pb2.Placement:
    """A placement as a non-admin key sees it: stages and readiness, not where the workers listen."""
    out = common_pb2.Placement()
    out.CopyFrom(placement)
    for stage in out.stages:
        for replica in stage.replicas:
            replica.address = ""
    return out


def stats_to_proto(traffic: Traffic, active_streams: int) -> gateway_pb2.GatewayStats:
    return gateway_pb2.GatewayStats(
        uptime_s=traffic.clock() - traffic.started,
        window_s=traffic.window_s,
        active_streams=active_streams,
        requests_total=traffic.requests_total,
        models=[
            gateway_pb2.ModelStats(model=m.model, requests=m.requests, errors=m.errors, prompt_tokens=m.prompt_tokens,
                                   completion_tokens=m.completion_tokens)
            for m in traffic.snapshot()
        ],
    )


def _optional(message: Any, name: str) -> Any:
    """An optional (proto3 `optional`) field's value, None when unset."""
    return getattr(message, name) if message.HasField(name) else None


def generate_params(req: gateway_pb2.GenerateRequest, limits: Limits) -> GenerateParams:
    """Checks the request's own fields; unset optional fields become None (the defaults)."""
    which = req.WhichOneof("prompt")
    return parse_generate(
        model=req.model,
        version=req.version,
        text=req.text if which == "text" else None,
        token_ids=list(req.token_ids.ids) if which == "token_ids" else None,
        max_tokens=_optional(req, "max_tokens"),
        temperature=_optional(req, "temperature"),
        top_p=_optional(req, "top_p"),
        top_k=_optional(req, "top_k"),
        seed=_optional(req, "seed"),
        stop=list(req.stop),
        limits=limits,
    )


def embed_params(req: gateway_pb2.EmbedRequest) -> EmbedParams:
    return parse_embed(model=req.model, version=req.version, texts=list(req.texts))


def chunk_to_proto(chunk: Chunk, version: str) -> gateway_pb2.GenerateChunk:
    out = gateway_pb2.GenerateChunk(
        text=chunk.text, token_id=chunk.token_id, logprob=chunk.logprob, index=chunk.index, version=version
    )
    if chunk.finish_reason:
        out.finish_reason = chunk.finish_reason
        out.usage.CopyFrom(usage(chunk.prompt_tokens, chunk.completion_tokens))
    return out


def usage(prompt_tokens: int, completion_tokens: int) -> gateway_pb2.Usage:
    return gateway_pb2.Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )


def embed_response(result: Embeddings, version: str) -> gateway_pb2.EmbedResponse:
    return gateway_pb2.EmbedResponse(
        embeddings=[gateway_pb2.Embedding(values=row.tolist()) for row in result.vectors],
        version=version,
        usage=usage(result.prompt_tokens, 0),
    )


# ---- batch jobs ----------------------------------------------------------------------------------

def job_settings_from_proto(p: jobs_pb2.JobParams) -> JobSettings:
    return JobSettings(
        max_tokens=_optional(p, "max_tokens"), temperature=_optional(p, "temperature"), top_p=_optional(p, "top_p"),
        top_k=_optional(p, "top_k"), seed=_optional(p, "seed"), stop=tuple(p.stop), task_items=p.task_items,
    )


def job_settings_to_proto(s: JobSettings) -> jobs_pb2.JobParams:
    fields = {k: v for k, v in (("max_tokens", s.max_tokens), ("temperature", s.temperature), ("top_p", s.top_p),
                                ("top_k", s.top_k), ("seed", s.seed)) if v is not None}
    return jobs_pb2.JobParams(stop=list(s.stop), task_items=s.task_items, **fields)


def submission_from_proto(req: jobs_pb2.SubmitJobRequest, max_items: int, max_tokens_cap: int) -> JobSubmission:
    """Checks every item (INVALID_ARGUMENT naming the bad line or item)."""
    which = req.WhichOneof("inputs")
    if which == "jsonl":
        items = parse_jsonl(req.jsonl, req.kind, max_items, max_tokens_cap)
    else:
        fields = [{f.name: v for f, v in item.ListFields()} for item in req.items.items]
        items = check_items(fields, req.kind, max_items, max_tokens_cap)
    return JobSubmission(req.model, req.version, req.kind, tuple(items), job_settings_from_proto(req.params))


def job_items_to_proto(items: Sequence[JobInput]) -> list[jobs_pb2.JobItem]:
    return [jobs_pb2.JobItem(id=i.item_id, text=i.text, prompt=i.prompt, max_tokens=i.max_tokens) for i in items]


def job_items_from_proto(reply: jobs_pb2.FetchJobItemsResponse) -> list[tuple[int, JobInput]]:
    return [(x.index, JobInput(x.item.id, x.item.text, x.item.prompt, x.item.max_tokens)) for x in reply.items]


def lease_from_proto(lease: jobs_pb2.TaskLease) -> TaskLease:
    return TaskLease(
        job_id=lease.job_id, task=lease.task, lease_id=lease.lease_id, start=lease.start, end=lease.end,
        kind=lease.kind, settings=job_settings_from_proto(lease.params), route=route_from_proto(lease.route),
        attempt=lease.attempt, lease_s=lease.lease_s,
    )


def outputs_to_proto(outputs: Sequence[ItemOutput]) -> list[jobs_pb2.JobResult]:
    out = []
    for o in outputs:
        result = jobs_pb2.JobResult(index=o.index, text=o.text, token_ids=o.token_ids, finish_reason=o.finish_reason,
                                    error=o.error)
        if o.embedding is not None:
            result.embedding.extend(o.embedding.tolist())
        out.append(result)
    return out


# ---- tensors on the wire (numpy only: the gateway does not import torch) ----------------------

def int_tensor(values: np.ndarray) -> common_pb2.Tensor:
    """An int64 tensor (e.g. an attention mask)."""
    arr = np.ascontiguousarray(values, dtype="<i8")
    return common_pb2.Tensor(data=arr.tobytes(), dtype="int64", shape=list(arr.shape))


def tensor_to_numpy(t: common_pb2.Tensor, what: str) -> np.ndarray:
    """A float tensor from a worker as float32 numpy (bfloat16 widened by bit shifting)."""
    shape = tuple(int(d) for d in t.shape)
    if t.dtype == "float32":
        arr = np.frombuffer(t.data, dtype="<f4")
    elif t.dtype == "float16":
        arr = np.frombuffer(t.data, dtype="<f2").astype(np.float32)
    elif t.dtype == "bfloat16":
        arr = (np.frombuffer(t.data, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
    else:
        raise Unavailable(f"{what} came back with dtype {t.dtype!r}; expected float32, float16 or bfloat16")
    if arr.size != int(np.prod(shape, dtype=np.int64)):
        raise Unavailable(f"{what} came back with {arr.size} values for shape {list(shape)}")
    return arr.reshape(shape)

