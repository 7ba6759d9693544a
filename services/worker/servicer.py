"""WorkerServicer: each RPC parses the proto, calls the runtime, builds the reply."""

from __future__ import annotations

import contextlib
import logging
from typing import AsyncIterator, Callable

import grpc

from modelgrid.errors import ModelGridError
from modelgrid.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from services.common.rpc import rpc
from services.worker import convert
from services.worker.runtime import WorkerRuntime

log = logging.getLogger(__name__)


class WorkerServicer(worker_pb2_grpc.WorkerServicer):
    def __init__(self, runtime: WorkerRuntime, on_change: Callable[[], None] = lambda: None) -> None:
        self.runtime = runtime
        self.on_change = on_change  # stages changed: tell the scheduler at once (a heartbeat)

    @rpc
    async def LoadStage(
        self, request: worker_pb2.LoadStageRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.LoadStageResponse:
        stage = await self.runtime.load_stage(convert.stage_key(request), int(request.epoch))
        self.on_change()
        return worker_pb2.LoadStageResponse(stage=convert.loaded_stage_to_proto(stage.status()))

    @rpc
    async def UnloadStage(
        self, request: worker_pb2.UnloadStageRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.UnloadStageResponse:
        if await self.runtime.unload_stage(convert.stage_key(request), int(request.epoch)):
            self.on_change()
        return worker_pb2.UnloadStageResponse()

    @rpc
    async def Forward(
        self, request: worker_pb2.ForwardRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.ForwardResponse:
        stage = self.runtime.stage_for(convert.stage_key(request), int(request.epoch))
        if stage.spec.kind == "encoder":
            result = await self.runtime.encoder_step(stage, convert.encoder_step_from_proto(request))
        else:
            result = await self.runtime.decoder_step(stage, convert.decoder_step_from_proto(request))
        return convert.forward_response(result)

    @rpc
    async def ForwardBatch(
        self, request: worker_pb2.ForwardBatchRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.ForwardBatchResponse]:
        steps = self.runtime.decoder_steps(convert.decoder_batch_from_proto(request))
        async with contextlib.aclosing(steps):
            async for ended in steps:
                for index, result in ended:
                    # an INTERNAL one was logged with its traceback where it happened
                    if isinstance(result, ModelGridError) and result.code != "INTERNAL":
                        log.info("ForwardBatch step of session %s -> %s: %s", request.steps[index].session_id,
                                 result.code, result.message)
                for reply in convert.forward_batch_responses(ended):
                    yield reply

    @rpc
    async def CloseSession(
        self, request: worker_pb2.CloseSessionRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.CloseSessionResponse:
        self.runtime.close_session(request.session_id)
        return worker_pb2.CloseSessionResponse()

    @rpc
    async def GetStatus(
        self, request: worker_pb2.GetStatusRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.WorkerInfo:
        return convert.worker_info_to_proto(self.runtime.status())
