"""Protobuf <-> registry records: the only registry module besides the servicer that sees *_pb2."""

from __future__ import annotations

from typing import Any, AsyncIterator

import numpy as np
from google.protobuf import json_format

from modelgrid.errors import InvalidArgument
from modelgrid.v1 import common_pb2, jobs_pb2, registry_pb2
from services.registry.job_records import ItemInput, ItemResult, JobRecord, progress
from services.registry.keys import ApiKeyRecord, KeyLimits
from services.registry.records import (
    Deployment,
    FileEntry,
    FilePart,
    ModelRecord,
    TensorPiece,
    UploadHeader,
    VersionRecord,
)


async def upload_parts(
    requests: AsyncIterator[common_pb2.UploadVersionChunk],
) -> AsyncIterator[UploadHeader | FilePart]:
    async for message in requests:
        kind = message.WhichOneof("part")
        if kind == "header":
            h = message.header
            yield UploadHeader(
                model=h.model,
                aliases=list(h.aliases),
                replicas=h.replicas,
                num_stages=h.num_stages,
                files=[FileEntry(f.path, f.size, f.sha256) for f in h.files],
            )
        elif kind == "chunk":
            yield FilePart(message.chunk.path, message.chunk.offset, message.chunk.data)
        else:
            raise InvalidArgument("an UploadVersionChunk must carry a header or a chunk")


def file_info(f: FileEntry) -> common_pb2.FileInfo:
    return common_pb2.FileInfo(path=f.path, size=f.size, sha256=f.sha256)


def version_to_proto(v: VersionRecord) -> common_pb2.ModelVersion:
    return common_pb2.ModelVersion(
        model=v.model,
        version=v.version,
        architecture=v.architecture,
        kind=v.kind,
        num_layers=v.num_layers,
        layer_bytes=v.layer_bytes,
        embed_bytes=v.embed_bytes,
        head_bytes=v.head_bytes,
        kv_bytes_per_token_per_layer=v.kv_bytes_per_token_per_layer,
        vocab_size=v.vocab_size,
        max_context=v.max_context,
        files=[file_info(f) for f in v.files],
        aliases=v.aliases,
        created_unix_ms=v.created_unix_ms,
        config_json=v.config_json,
    )


def model_to_proto(m: ModelRecord) -> common_pb2.Model:
    return common_pb2.Model(
        name=m.name,
        versions=[version_to_proto(v) for v in m.versions],
        aliases=m.aliases,
        replicas=m.replicas,
        num_stages=m.num_stages,
    )


def deployment_to_proto(d: Deployment) -> registry_pb2.Deployment:
    return registry_pb2.Deployment(version=version_to_proto(d.version), replicas=d.replicas, num_stages=d.num_stages)


def tensor_chunk(piece: TensorPiece) -> registry_pb2.TensorChunk:
    e = piece.entry
    return registry_pb2.TensorChunk(
        name=piece.name,
        dtype=e.dtype,
        shape=e.shape,
        offset=piece.offset,
        data=piece.data,
        total_bytes=e.nbytes,
        sha256=piece.sha256,
    )


def file_chunk(path: str, offset: int, data: bytes) -> common_pb2.FileChunk:
    return common_pb2.FileChunk(path=path, offset=offset, data=data)


def key_to_proto(k: ApiKeyRecord) -> common_pb2.ApiKey:
    return common_pb2.ApiKey(
        key_id=k.key_id,
        name=k.name,
        prefix=k.prefix,
        admin=k.admin,
        limits=common_pb2.KeyLimits(
            requests_per_minute=k.limits.requests_per_minute,
            tokens_per_minute=k.limits.tokens_per_minute,
            max_streams=k.limits.max_streams,
        ),
        created_unix_ms=k.created_unix_ms,
        revoked_unix_ms=k.revoked_unix_ms,
    )


def key_limits(limits: common_pb2.KeyLimits) -> KeyLimits:
    return KeyLimits(limits.requests_per_minute, limits.tokens_per_minute, limits.max_streams)


# ---- batch jobs (services/registry/job_db.py) ---------------------------------------------------

def job_params_to_json(params: jobs_pb2.JobParams) -> dict[str, Any]:
    return json_format.MessageToDict(params, preserving_proto_field_name=True)


def job_to_proto(job: JobRecord, now_ms: int) -> jobs_pb2.Job:
    p = progress(job, now_ms)
    return jobs_pb2.Job(
        job_id=job.job_id, model=job.model, version=job.version, kind=job.kind, state=job.state, total=job.total,
        done=job.done, failed=job.failed, created_unix_ms=job.created_unix_ms, started_unix_ms=job.started_unix_ms,
        finished_unix_ms=job.finished_unix_ms, error=job.error,
        params=json_format.ParseDict(job.params, jobs_pb2.JobParams(), ignore_unknown_fields=True),
        progress=p.fraction, items_per_s=p.items_per_s, eta_s=p.eta_s, owner=job.owner,
    )


def item_from_proto(item: jobs_pb2.JobItem) -> ItemInput:
    return ItemInput(item.id, item.text, item.prompt, item.max_tokens)


def item_to_proto(index: int, item: ItemInput) -> jobs_pb2.IndexedItem:
    return jobs_pb2.IndexedItem(index=index, item=jobs_pb2.JobItem(
        id=item.item_id, text=item.text, prompt=item.prompt, max_tokens=item.max_tokens))


def result_from_proto(r: jobs_pb2.JobResult) -> ItemResult:
    embedding = np.asarray(r.embedding, dtype="<f4").tobytes() if len(r.embedding) else b""
    return ItemResult(index=r.index, embedding=embedding, text=r.text, token_ids=tuple(r.token_ids),
                      finish_reason=r.finish_reason, error=r.error)


def result_to_proto(r: ItemResult) -> jobs_pb2.JobResult:
    out = jobs_pb2.JobResult(index=r.index, id=r.item_id, text=r.text, token_ids=r.token_ids,
                             finish_reason=r.finish_reason, error=r.error)
    if r.embedding:
        out.embedding.extend(np.frombuffer(r.embedding, dtype="<f4").tolist())
    return out


def pending_to_proto(spans: list[tuple[int, int]]) -> jobs_pb2.PendingItems:
    return jobs_pb2.PendingItems(starts=[a for a, _ in spans], ends=[b for _, b in spans])
