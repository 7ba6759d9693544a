"""WorkerServicer: each RPC parses the proto, calls the runtime, builds the reply."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import AsyncIterator, Callable

import grpc

from modelgrid.errors import ModelGridError
from modelgrid.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from services.common.rpc import rpc
from services.common.tracing import request_id
from services.worker import convert
from services.worker.runtime import WorkerRuntime

log = logging.getLogger(__name__)


class WorkerServicer(worker_pb2_grpc.WorkerServicer):
    def __init__(self, runtime: WorkerRuntime, on_change: Callable[[], None] = lambda: None) -> None:
        self.runtime = runtime
        self.on_change = on_change  # stages changed: tell the scheduler at once (a heartbeat)
        self._streams: set[asyncio.Queue] = set()  # the reply queues of the open ForwardStream calls
        self._ending = False  # end_streams was called: the worker is stopping

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
        async for reply in self._answer(request, base=0):
            yield reply

    @rpc
    async def ForwardStream(
        self, requests: AsyncIterator[worker_pb2.ForwardBatchRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.ForwardBatchResponse]:
        """Each message read is answered as a ForwardBatch of its own, concurrently with the next ones; the
        replies of all of them go out on this call as they come (see the proto for the numbering)."""
        replies: asyncio.Queue[worker_pb2.ForwardBatchResponse | None] = asyncio.Queue()
        batches: set[asyncio.Task] = set()

        async def answer(request: worker_pb2.ForwardBatchRequest, base: int) -> None:
            unanswered = set(range(len(request.steps)))
            try:
                async for reply in self._answer(request, base, stream=True):
                    unanswered.difference_update(r.index - base for r in reply.results)
                    replies.put_nowait(reply)
            except Exception as err:  # noqa: BLE001 - a bug: its steps fail alone, the stream goes on
                log.exception("ForwardStream batch at step %d failed", base)
                failed = ModelGridError(f"ForwardStream failed on worker {self.runtime.worker_id}: {err}")
                for reply in convert.forward_batch_responses([(i, failed) for i in sorted(unanswered)], base=base):
                    replies.put_nowait(reply)

        async def read() -> None:
            base = 0
            try:
                async for request in requests:
                    task = asyncio.ensure_future(answer(request, base))
                    batches.add(task)
                    task.add_done_callback(batches.discard)
                    base += len(request.steps)
                await asyncio.gather(*batches)  # the gateway sends no more: end once all it sent is answered
            except grpc.aio.AioRpcError as err:  # the gateway's side broke: the call is over anyway
                log.info("ForwardStream from the gateway ended: %s %s", err.code().name, err.details())
            except Exception:  # noqa: BLE001 - a bug: end the call (the gateway fails over) rather than hang
                log.exception("reading ForwardStream failed")
            finally:
                replies.put_nowait(None)

        if self._ending:  # drained: a new stream ends at once (the gateway sends its steps elsewhere)
            return
        await context.send_initial_metadata(())  # "accepted": the gateway writes nothing before (step_stream.py)
        reader = asyncio.ensure_future(read())
        self._streams.add(replies)
        try:
            while (reply := await replies.get()) is not None:
                yield reply
        finally:
            self._streams.discard(replies)
            for task in (reader, *batches):
                task.cancel()

    def end_streams(self) -> None:
        """End every ForwardStream call (the worker has drained and is stopping): steps still unanswered on
        them fail at the gateway, which replays them elsewhere. Streams opened after this end at once."""
        self._ending = True
        for replies in self._streams:
            replies.put_nowait(None)

    async def _answer(
        self, request: worker_pb2.ForwardBatchRequest, base: int, stream: bool = False
    ) -> AsyncIterator[worker_pb2.ForwardBatchResponse]:
        """A ForwardBatch's replies, one or more per pass; result indices start at base. Each step's outcome is
        logged under its own request id (a failure at INFO, success at DEBUG, as a call's would be)."""
        call = "ForwardStream" if stream else "ForwardBatch"
        debug = log.isEnabledFor(logging.DEBUG)
        steps = self.runtime.decoder_steps(convert.decoder_batch_from_proto(request))
        async with contextlib.aclosing(steps):
            async for ended in steps:
                for index, result in ended:
                    failed = isinstance(result, ModelGridError)
                    # an INTERNAL one was logged with its traceback where it happened
                    if (failed and result.code != "INTERNAL") or (debug and not failed):
                        step = request.steps[index]
                        with request_id(step.request_id):
                            if failed:
                                log.info("%s step of session %s -> %s: %s", call, step.session_id, result.code,
                                         result.message)
                            else:
                                log.debug("%s step of session %s at position %d -> OK", call, step.session_id,
                                          step.position)
                for reply in convert.forward_batch_responses(ended, base=base):
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
