"""Protobuf <-> the scheduler's plain records. The only scheduler module besides the gRPC edges that
touches *_pb2 types."""

from __future__ import annotations

import json

from google.protobuf import json_format

from modelgrid.v1 import common_pb2, jobs_pb2, registry_pb2
from services.scheduler.job_tasks import JobMeta, Lease, StoredJob
from services.scheduler.placement import ModelSizes
from services.scheduler.records import (
    Deployment,
    LoadedStageRecord,
    PlacementRecord,
    Route,
    WorkerRecord,
)


def worker_from_proto(info: common_pb2.WorkerInfo, last_seen_ms: int) -> WorkerRecord:
    return WorkerRecord(
        worker_id=info.worker_id,
        address=info.address,
        device=info.device,
        total_memory=info.total_memory,
        free_memory=info.free_memory,
        stages=[
            LoadedStageRecord(s.model, s.version, s.start_layer, s.end_layer, s.param_bytes, s.epoch)
            for s in info.stages
        ],
        state=info.state or "serving",
        active_sessions=info.active_sessions,
        kv_cache_bytes=info.kv_cache_bytes,
        last_seen_ms=last_seen_ms,
    )


def worker_to_proto(worker: WorkerRecord, now_ms: int) -> common_pb2.WorkerInfo:
    return common_pb2.WorkerInfo(
        worker_id=worker.worker_id,
        address=worker.address,
        device=worker.device,
        total_memory=worker.total_memory,
        free_memory=worker.free_memory,
        stages=[
            common_pb2.LoadedStage(
                model=s.model, version=s.version, start_layer=s.start, end_layer=s.end,
                param_bytes=s.param_bytes, epoch=s.epoch,
            )
            for s in worker.stages
        ],
        heartbeat_age_s=max(0.0, (now_ms - worker.last_seen_ms) / 1000.0),
        state=worker.state,
        active_sessions=worker.active_sessions,
        kv_cache_bytes=worker.kv_cache_bytes,
    )


def placement_to_proto(record: PlacementRecord) -> common_pb2.Placement:
    return common_pb2.Placement(
        model=record.model,
        version=record.version,
        epoch=record.epoch,
        stages=[
            common_pb2.PlacedStage(
                start_layer=s.start,
                end_layer=s.end,
                replicas=[
                    common_pb2.Replica(worker_id=r.worker_id, address=r.address, ready=r.ready) for r in s.replicas
                ],
            )
            for s in record.stages
        ],
        state=record.state,
        message=record.message,
    )


def route_to_proto(route: Route) -> common_pb2.Route:
    return common_pb2.Route(
        model=route.model,
        version=route.version,
        epoch=route.epoch,
        hops=[
            common_pb2.RouteHop(start_layer=h.start, end_layer=h.end, worker_id=h.worker_id, address=h.address)
            for h in route.hops
        ],
    )


def sizes_from_proto(version: common_pb2.ModelVersion) -> ModelSizes:
    """Byte sizes for placement. With tied embeddings the last stage also holds the embedding matrix (its
    LM head): the registry counts it in head_bytes too (added here if it did not), and a single stage,
    both first and last, loads it once."""
    head, shared = version.head_bytes, 0
    if version.kind != "encoder" and _tied(version.config_json):
        if head < version.embed_bytes:
            head += version.embed_bytes
        shared = version.embed_bytes
    return ModelSizes(
        layer_bytes=tuple(version.layer_bytes),
        embed_bytes=version.embed_bytes,
        head_bytes=head,
        kv_bytes_per_token_per_layer=version.kv_bytes_per_token_per_layer,
        shared_bytes=shared,
    )


def _tied(config_json: str) -> bool:
    if not config_json:
        return False
    try:
        config = json.loads(config_json)
    except ValueError:
        return False
    return isinstance(config, dict) and bool(config.get("tie_word_embeddings", False))


def deployment_from_proto(dep: registry_pb2.Deployment) -> Deployment:
    return Deployment(
        model=dep.version.model,
        version=dep.version.version,
        sizes=sizes_from_proto(dep.version),
        replicas=max(1, dep.replicas),
        num_stages=max(0, dep.num_stages),
    )


# ---- batch jobs ----------------------------------------------------------------------------------

def stored_job_from_proto(job: jobs_pb2.Job) -> StoredJob:
    params = json_format.MessageToDict(job.params, preserving_proto_field_name=True)
    meta = JobMeta(job.job_id, job.model, job.version, job.kind, params)
    return StoredJob(meta, job.state, job.created_unix_ms, job.total)


def lease_to_proto(lease: Lease) -> jobs_pb2.TaskLease:
    meta, task = lease.meta, lease.task
    return jobs_pb2.TaskLease(
        job_id=meta.job_id, task=task.task, lease_id=task.lease_id, start=task.start, end=task.end, model=meta.model,
        version=meta.version, kind=meta.kind,
        params=json_format.ParseDict(meta.params, jobs_pb2.JobParams(), ignore_unknown_fields=True),
        route=route_to_proto(lease.route), attempt=task.attempt, lease_s=lease.lease_s,
    )
