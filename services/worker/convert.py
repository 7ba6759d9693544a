"""Protobuf <-> domain conversions for the worker (the only worker module besides the gRPC edges that
knows *_pb2 types)."""

from __future__ import annotations

import math

import torch

from modelgrid.errors import InvalidArgument, ModelGridError
from modelgrid.model.sampling import SamplingParams
from modelgrid.v1 import common_pb2, registry_pb2, worker_pb2
from services.worker.runtime import StageStatus, WorkerStatus
from services.worker.sessions import StageKey
from services.worker.shard_cache import TensorPiece, VersionInfo
from services.worker.steps import DecoderStep, EncoderStep, StepResult
from services.worker.tensors import WireTensor, decode


def stage_key(request: worker_pb2.LoadStageRequest | worker_pb2.UnloadStageRequest | worker_pb2.ForwardRequest) -> StageKey:
    return StageKey(request.model, request.version, int(request.start_layer), int(request.end_layer))


def tensor_from_proto(t: common_pb2.Tensor, what: str) -> torch.Tensor:
    return decode(t.data, t.dtype, t.shape, what)


def tensor_to_proto(wire: WireTensor) -> common_pb2.Tensor:
    """A tensor already encoded in the torch thread (encoding stays off the event loop)."""
    return common_pb2.Tensor(data=wire.data, dtype=wire.dtype, shape=wire.shape)


def sampling_from_proto(p: common_pb2.SamplingParams) -> SamplingParams:
    """Proto defaults mean: temperature 0 = greedy, top_k 0 = off, top_p 0 (unset) = 1.0 (off)."""
    top_p = 1.0 if p.top_p == 0 else float(p.top_p)
    temperature = float(p.temperature)
    try:
        return SamplingParams(temperature=temperature, top_k=int(p.top_k), top_p=top_p, seed=int(p.seed))
    except ValueError as err:
        raise InvalidArgument(f"bad sampling parameters: {err}") from None


def decoder_step_from_proto(r: worker_pb2.ForwardRequest) -> DecoderStep:
    if not r.session_id:
        raise InvalidArgument("session_id is required for a decoder step")
    if r.position < 0:
        raise InvalidArgument(f"position must be >= 0, got {r.position}")
    which = r.WhichOneof("input")
    if which is None:
        raise InvalidArgument("a Forward request needs tokens (first stage) or hidden (later stages)")
    return DecoderStep(
        session_id=r.session_id,
        tokens=list(r.tokens.ids) if which == "tokens" else None,
        hidden=tensor_from_proto(r.hidden, "hidden") if which == "hidden" else None,
        position=int(r.position),
        reset=bool(r.reset),
        sampling=sampling_from_proto(r.sampling),
        step=int(r.step),
        max_session_tokens=int(r.max_session_tokens),
        num_stages=max(0, int(r.num_stages)),
    )


def decoder_batch_from_proto(
    r: worker_pb2.ForwardBatchRequest,
) -> list[tuple[StageKey, int, DecoderStep] | ModelGridError]:
    """Each step of a ForwardBatch, or the error that makes it unusable (it fails alone)."""
    steps: list[tuple[StageKey, int, DecoderStep] | ModelGridError] = []
    for step in r.steps:
        try:
            steps.append((stage_key(step), int(step.epoch), decoder_step_from_proto(step)))
        except ModelGridError as err:
            steps.append(err)
    return steps


# A ForwardBatch message holds results up to this many bytes (hidden states of long prompts add up past
# gRPC's 64 MiB message cap); a single larger result goes alone, as a Forward reply would.
BATCH_REPLY_BYTES = 16 * 1024 * 1024


def forward_batch_responses(
    results: list[tuple[int, StepResult | ModelGridError]], budget_bytes: int = BATCH_REPLY_BYTES, base: int = 0,
) -> list[worker_pb2.ForwardBatchResponse]:
    """The results of steps that ended together, in as few messages as fit budget_bytes each; a result's
    index is base + its index in the batch (base: the stream number of the batch's first step)."""
    replies = [worker_pb2.ForwardBatchResponse()]
    size = 0
    for index, result in results:
        if isinstance(result, ModelGridError):
            one = worker_pb2.ForwardResult(index=base + index, code=result.code, message=result.message)
        else:
            one = worker_pb2.ForwardResult(index=base + index, response=forward_response(result))
        n = one.ByteSize()
        if replies[-1].results and size + n > budget_bytes:
            replies.append(worker_pb2.ForwardBatchResponse())
            size = 0
        replies[-1].results.append(one)
        size += n
    return replies


def encoder_step_from_proto(r: worker_pb2.ForwardRequest) -> EncoderStep:
    which = r.WhichOneof("input")
    if which is None:
        raise InvalidArgument("a Forward request needs tokens (first stage) or hidden (later stages)")
    mask = None
    if r.HasField("attention_mask"):
        mask = tensor_from_proto(r.attention_mask, "attention_mask")
        if mask.is_floating_point() and not bool(((mask == 0) | (mask == 1)).all()):
            raise InvalidArgument("attention_mask must hold only 0 and 1")
    return EncoderStep(
        tokens=list(r.tokens.ids) if which == "tokens" else None,
        tokens_shape=tuple(int(d) for d in r.tokens_shape),
        hidden=tensor_from_proto(r.hidden, "hidden") if which == "hidden" else None,
        attention_mask=mask,
    )


def forward_response(result: StepResult) -> worker_pb2.ForwardResponse:
    reply = worker_pb2.ForwardResponse(cache_length=result.cache_length)
    if result.token is not None:
        token_id, logprob = result.token
        reply.token.CopyFrom(worker_pb2.SampledToken(token_id=token_id, logprob=_finite(logprob)))
    elif result.embeddings is not None:
        reply.embeddings.CopyFrom(tensor_to_proto(result.embeddings))
    elif result.hidden is not None:
        reply.hidden.CopyFrom(tensor_to_proto(result.hidden))
    return reply


def _finite(x: float) -> float:
    return x if math.isfinite(x) else -3.0e38


def loaded_stage_to_proto(s: StageStatus) -> common_pb2.LoadedStage:
    return common_pb2.LoadedStage(
        model=s.model, version=s.version, start_layer=s.start, end_layer=s.end, param_bytes=s.param_bytes, epoch=s.epoch
    )


def worker_info_to_proto(s: WorkerStatus) -> common_pb2.WorkerInfo:
    return common_pb2.WorkerInfo(
        worker_id=s.worker_id,
        address=s.address,
        device=s.device,
        total_memory=s.total_memory,
        free_memory=s.free_memory,
        stages=[loaded_stage_to_proto(st) for st in s.stages],
        state=s.state,
        active_sessions=s.active_sessions,
        kv_cache_bytes=s.kv_cache_bytes,
    )


def version_from_proto(v: common_pb2.ModelVersion) -> VersionInfo:
    return VersionInfo(
        model=v.model,
        version=v.version,
        kind=v.kind,
        num_layers=int(v.num_layers),
        layer_bytes=tuple(int(b) for b in v.layer_bytes),
        embed_bytes=int(v.embed_bytes),
        head_bytes=int(v.head_bytes),
        vocab_size=int(v.vocab_size),
        max_context=int(v.max_context),
        config_json=v.config_json,
    )


def piece_from_proto(c: registry_pb2.TensorChunk) -> TensorPiece:
    return TensorPiece(
        name=c.name,
        dtype=c.dtype,
        shape=tuple(int(d) for d in c.shape),
        offset=int(c.offset),
        data=c.data,
        total_bytes=int(c.total_bytes),
        sha256=c.sha256,
    )
