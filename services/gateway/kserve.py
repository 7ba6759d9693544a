"""The KServe Open Inference Protocol (v2) on the gateway's gRPC port (protos/inference/grpc_predict_v2.proto).

Embedding (encoder) models take one BYTES tensor of UTF-8 texts (any shape; its B elements are the
batch) and return "embeddings", FP32 [B, H]. Generative (decoder) models take one INT64 (or INT32)
tensor of prompt token ids, shape [1, T] or [T], and return "output_ids", INT64 [1, N]; the request's
parameters max_tokens, temperature, top_p, top_k and seed set the sampling (unset: the gateway's
defaults). Responses carry raw_output_contents when the request used raw_input_contents (as
tritonclient does), typed contents otherwise. BYTES raw contents hold, per element, a 4-byte
little-endian length and the bytes.

Both kinds run through the gateway's own validation, planning and pipeline (GatewayApp).
"""

from __future__ import annotations

import math
import struct
from contextlib import aclosing
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version as package_version
from typing import Any, Sequence

import grpc
import numpy as np

from modelgrid.errors import InvalidArgument, ModelGridError
from modelgrid.inference import grpc_predict_v2_pb2 as pb, grpc_predict_v2_pb2_grpc as pb_grpc
from modelgrid.v1 import common_pb2
from services.common.rpc import rpc
from services.gateway.app import GatewayApp
from services.gateway.domain import VersionInfo
from services.gateway.upstream import DEFAULT_TIMEOUT_S
from services.gateway.validation import check_model_ref, parse_embed, parse_generate

SERVICE_NAME = "inference.GRPCInferenceService"
PROBE_TIMEOUT_S = 5.0
TEXT_INPUT, EMBEDDINGS_OUTPUT = "text", "embeddings"
IDS_INPUT, IDS_OUTPUT = "input_ids", "output_ids"
INT_PARAMS = ("max_tokens", "top_k", "seed")
INT_RANGES = {"top_k": (0, 2**31), "seed": (0, 2**64)}  # what the workers' SamplingParams can carry
FLOAT_PARAMS = ("temperature", "top_p")
# request parameters Triton's clients may add; they mean nothing here and are ignored
IGNORED_PARAMS = ("priority", "timeout", "sequence_id", "sequence_start", "sequence_end")
INT_DTYPES = {"INT64": ("<i8", "int64_contents"), "INT32": ("<i4", "int_contents")}


def _server_version() -> str:
    try:
        return package_version("modelgrid")
    except PackageNotFoundError:
        return "0"


# ---- tensors ----------------------------------------------------------------------------------

def _element_count(tensor: pb.ModelInferRequest.InferInputTensor) -> int:
    if any(d < 0 for d in tensor.shape):
        raise InvalidArgument(f"input '{tensor.name}' has a negative dimension in shape {list(tensor.shape)}")
    return math.prod(tensor.shape)


def decode_bytes_raw(raw: bytes, what: str) -> list[bytes]:
    """Length-prefixed elements (4-byte little-endian length, then the bytes), as tritonclient writes them."""
    out, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise InvalidArgument(f"{what}: raw BYTES contents end inside a 4-byte length prefix")
        (size,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + size > len(raw):
            raise InvalidArgument(f"{what}: raw BYTES element {len(out)} claims {size} bytes past the end")
        out.append(raw[offset : offset + size])
        offset += size
    return out


def encode_bytes_raw(values: Sequence[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(v)) + v for v in values)


def input_texts(tensor: pb.ModelInferRequest.InferInputTensor, raw: bytes | None) -> list[str]:
    if tensor.datatype != "BYTES":
        raise InvalidArgument(f"input '{tensor.name}' must be BYTES (UTF-8 texts) for an embedding model, "
                              f"got {tensor.datatype or 'no datatype'}")
    count = _element_count(tensor)
    values = decode_bytes_raw(raw, f"input '{tensor.name}'") if raw is not None else list(tensor.contents.bytes_contents)
    if len(values) != count:
        raise InvalidArgument(f"input '{tensor.name}' has shape {list(tensor.shape)} ({count} elements) "
                              f"but holds {len(values)}")
    texts = []
    for i, value in enumerate(values):
        try:
            texts.append(value.decode("utf-8"))
        except UnicodeDecodeError:
            raise InvalidArgument(f"input '{tensor.name}' element {i} is not valid UTF-8") from None
    return texts


def input_ids(tensor: pb.ModelInferRequest.InferInputTensor, raw: bytes | None) -> list[int]:
    if tensor.datatype not in INT_DTYPES:
        raise InvalidArgument(f"input '{tensor.name}' must be INT64 (or INT32) token ids for a generative model, "
                              f"got {tensor.datatype or 'no datatype'}")
    shape = list(tensor.shape)
    if len(shape) not in (1, 2) or (len(shape) == 2 and shape[0] != 1):
        raise InvalidArgument(f"input '{tensor.name}' must have shape [1, T] or [T] (one prompt), got {shape}")
    count = _element_count(tensor)
    dtype, field = INT_DTYPES[tensor.datatype]
    if raw is not None:
        width = np.dtype(dtype).itemsize
        if len(raw) != count * width:
            raise InvalidArgument(f"input '{tensor.name}' has shape {shape} ({count} {tensor.datatype} values) "
                                  f"but {len(raw)} raw bytes; expected {count * width}")
        return np.frombuffer(raw, dtype=dtype).astype(np.int64).tolist()
    values = list(getattr(tensor.contents, field))
    if len(values) != count:
        raise InvalidArgument(f"input '{tensor.name}' has shape {shape} ({count} elements) but holds {len(values)}")
    return values


@dataclass(frozen=True)
class Output:
    name: str
    datatype: str
    array: np.ndarray  # already in its wire dtype


def _only_input(request: pb.ModelInferRequest) -> tuple[pb.ModelInferRequest.InferInputTensor, bytes | None]:
    if len(request.inputs) != 1:
        raise InvalidArgument(f"{request.model_name} takes exactly one input tensor, got {len(request.inputs)}")
    if request.raw_input_contents and len(request.raw_input_contents) != 1:
        raise InvalidArgument(f"raw_input_contents has {len(request.raw_input_contents)} entries for 1 input")
    return request.inputs[0], (request.raw_input_contents[0] if request.raw_input_contents else None)


def _requested(request: pb.ModelInferRequest, available: str) -> None:
    for out in request.outputs:
        if out.name != available:
            raise InvalidArgument(f"{request.model_name} has no output '{out.name}'; its output is '{available}'")


def infer_response(
    request: pb.ModelInferRequest, version: VersionInfo, output: Output, parameters: dict[str, Any]
) -> pb.ModelInferResponse:
    reply = pb.ModelInferResponse(model_name=request.model_name, model_version=version.version, id=request.id)
    for key, value in parameters.items():
        if isinstance(value, str):
            reply.parameters[key].string_param = value
        else:
            reply.parameters[key].int64_param = int(value)
    tensor = reply.outputs.add(name=output.name, datatype=output.datatype, shape=list(output.array.shape))
    if request.raw_input_contents:
        reply.raw_output_contents.append(output.array.tobytes())
    elif output.datatype == "FP32":
        tensor.contents.fp32_contents.extend(output.array.reshape(-1).tolist())
    else:
        tensor.contents.int64_contents.extend(output.array.reshape(-1).tolist())
    return reply


# ---- parameters -------------------------------------------------------------------------------

def _param(p: pb.InferParameter) -> Any:
    which = p.WhichOneof("parameter_choice")
    return None if which is None else getattr(p, which)


def sampling_parameters(parameters: Any) -> dict[str, Any]:
    """max_tokens / top_k / seed as ints, temperature / top_p as floats (None when unset)."""
    out: dict[str, Any] = {}
    for key in parameters:
        value = _param(parameters[key])
        if key in IGNORED_PARAMS:
            continue
        if key in INT_PARAMS:
            number = _number(key, value)
            if not math.isfinite(number) or number != int(number):
                raise InvalidArgument(f"parameter {key} must be an integer, got {value!r}")
            low, high = INT_RANGES.get(key, (-math.inf, math.inf))
            if not low <= number < high:
                raise InvalidArgument(f"parameter {key} must be in [{low}, {high:.0f}), got {value!r}")
            out[key] = int(number)
        elif key in FLOAT_PARAMS:
            out[key] = float(_number(key, value))
        else:
            raise InvalidArgument(
                f"unknown parameter {key!r}; a generative model takes {', '.join(INT_PARAMS + FLOAT_PARAMS)}"
            )
    return out


def _number(key: str, value: Any) -> float:
    if isinstance(value, bool) or value is None:
        raise InvalidArgument(f"parameter {key} must be a number, got {value!r}")
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise InvalidArgument(f"parameter {key} must be a number, got {value!r}") from None
    return value


def tensor_metadata(version: VersionInfo) -> tuple[list[Any], list[Any]]:
    meta = pb.ModelMetadataResponse.TensorMetadata
    if version.kind == "encoder":
        return ([meta(name=TEXT_INPUT, datatype="BYTES", shape=[-1])],
                [meta(name=EMBEDDINGS_OUTPUT, datatype="FP32", shape=[-1, version.hidden_size])])
    return ([meta(name=IDS_INPUT, datatype="INT64", shape=[1, -1])],
            [meta(name=IDS_OUTPUT, datatype="INT64", shape=[1, -1])])


# ---- the servicer -----------------------------------------------------------------------------

class KServeServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, app: GatewayApp) -> None:
        self._app = app

    async def _version(self, name: str, version: str, context: grpc.aio.ServicerContext) -> VersionInfo:
        check_model_ref(name, version)
        left = context.time_remaining()
        timeout = DEFAULT_TIMEOUT_S if left is None else max(min(left, DEFAULT_TIMEOUT_S), 0.0)
        return await self._app.versions.resolve(name, version, timeout)

    @rpc
    async def ServerLive(self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    @rpc
    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        """Ready while the registry answers (without it no model can be resolved)."""
        try:
            await self._app.registry.list_models(common_pb2.ListModelsRequest(), PROBE_TIMEOUT_S)
        except ModelGridError:
            return pb.ServerReadyResponse(ready=False)
        return pb.ServerReadyResponse(ready=True)

    @rpc
    async def ModelReady(self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext) -> pb.ModelReadyResponse:
        """Ready when the scheduler has a route through every stage; NOT_FOUND for an unknown model."""
        version = await self._version(request.name, request.version, context)
        try:
            await self._app.routes.get(version.model, version.version, (), PROBE_TIMEOUT_S)
        except ModelGridError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    @rpc
    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="modelgrid", version=_server_version(), extensions=[])

    @rpc
    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        version = await self._version(request.name, request.version, context)
        model = await self._app.registry.get_model(common_pb2.GetModelRequest(name=version.model), PROBE_TIMEOUT_S)
        inputs, outputs = tensor_metadata(version)
        return pb.ModelMetadataResponse(
            name=version.model, versions=[v.version for v in model.versions],
            platform=f"modelgrid_{version.architecture}", inputs=inputs, outputs=outputs,
        )

    @rpc
    async def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext) -> pb.ModelInferResponse:
        version = await self._version(request.model_name, request.model_version, context)
        deadline = self._app.deadline(context.time_remaining())
        tensor, raw = _only_input(request)
        if version.kind == "encoder":
            _requested(request, EMBEDDINGS_OUTPUT)
            if request.parameters:
                raise InvalidArgument(f"{version.label} is an embedding model and takes no parameters")
            params = parse_embed(model=version.model, version=version.version, texts=input_texts(tensor, raw))
            _, result = await self._app.embed(params, deadline)
            vectors = np.ascontiguousarray(result.vectors, dtype="<f4")
            output = Output(EMBEDDINGS_OUTPUT, "FP32", vectors)
            return infer_response(request, version, output, {"prompt_tokens": result.prompt_tokens})
        _requested(request, IDS_OUTPUT)
        sampling = sampling_parameters(request.parameters)
        params = parse_generate(
            model=version.model, version=version.version, text=None, token_ids=input_ids(tensor, raw),
            max_tokens=sampling.get("max_tokens"), temperature=sampling.get("temperature"),
            top_p=sampling.get("top_p"), top_k=sampling.get("top_k"), seed=sampling.get("seed"), stop=[],
            limits=self._app.limits,
        )
        plan, tokenizer = await self._app.plan_generation(params, deadline)
        ids: list[int] = []
        finish, completion_tokens = "", 0
        async with aclosing(self._app.generate(plan, tokenizer)) as chunks:
            async for chunk in chunks:
                ids.append(chunk.token_id)
                finish, completion_tokens = chunk.finish_reason or finish, chunk.completion_tokens
        output = Output(IDS_OUTPUT, "INT64", np.asarray([ids], dtype="<i8"))
        parameters = {"finish_reason": finish, "prompt_tokens": len(plan.prompt_ids),
                      "completion_tokens": completion_tokens}
        return infer_response(request, version, output, parameters)


def add_kserve_servicer(app: GatewayApp, server: grpc.aio.Server) -> None:
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(KServeServicer(app), server)
