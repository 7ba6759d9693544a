"""The whole platform in-process, on port 0, for integration tests: the registry (SQLite), the scheduler
(real Redis), CPU workers and the gateway, with models registered through Gateway.RegisterModel.

    async with running_stack(tmp, redis_url, {"tiny-llama": llama_dir}, workers=2) as stack:
        chunks = await generate(stack, model="tiny-llama", text="hi", max_tokens=4)
"""

from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Mapping

import grpc
import torch

from modelgrid.channel import aio_channel
from modelgrid.model import write_random_checkpoint
from modelgrid.upload import aiter_upload_chunks, plan_upload
from modelgrid.v1 import (
    common_pb2,
    gateway_pb2,
    gateway_pb2_grpc,
    scheduler_pb2,
    scheduler_pb2_grpc,
    worker_pb2,
    worker_pb2_grpc,
)
from services.gateway.app import start_gateway, stop_gateway
from services.gateway.config import GatewayConfig
from services.registry.app import start_registry
from services.registry.config import RegistryConfig
from services.scheduler.app import start_scheduler
from services.scheduler.config import SchedulerConfig
from services.worker.app import WorkerApp, start_worker, stop_worker
from services.worker.config import WorkerConfig


# the in-process gateway asks for no API keys and opens no HTTP port, unless a test says otherwise
GATEWAY_TEST_SETTINGS = {"auth": "disabled", "http_port": -1}


@dataclass
class Stack:
    gateway: gateway_pb2_grpc.GatewayStub
    scheduler: scheduler_pb2_grpc.SchedulerStub
    workers: dict[str, worker_pb2_grpc.WorkerStub]  # worker id -> stub
    running_workers: dict[str, tuple[Any, WorkerApp]]  # worker id -> (RunningServer, WorkerApp), while running
    channels: list[grpc.aio.Channel] = field(default_factory=list)
    versions: dict[str, common_pb2.ModelVersion] = field(default_factory=dict)  # registered at start

    async def placed(self, model: str) -> list[str]:
        """Worker ids of the route, waiting (by polling GetRoute) until the model is served."""
        deadline = time.monotonic() + 120
        while True:
            try:
                route = await self.scheduler.GetRoute(scheduler_pb2.GetRouteRequest(model=model))
                return [h.worker_id for h in route.hops]
            except grpc.aio.AioRpcError as err:
                if err.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                    raise
            await asyncio.sleep(0.1)

    async def active_sessions(self) -> dict[str, int]:
        out = {}
        for worker_id, stub in self.workers.items():
            if worker_id in self.running_workers:
                out[worker_id] = (await stub.GetStatus(worker_pb2.GetStatusRequest())).active_sessions
        return out

    async def wait_no_sessions(self, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while (sessions := await self.active_sessions()) and any(sessions.values()):
            assert time.monotonic() < deadline, f"sessions still open: {sessions}"
            await asyncio.sleep(0.05)


async def upload(chunks: list[common_pb2.UploadVersionChunk]) -> AsyncIterator[common_pb2.UploadVersionChunk]:
    for chunk in chunks:
        yield chunk


@asynccontextmanager
async def running_stack(
    tmp: Path,
    redis_url: str,
    models: Mapping[str, Path],
    *,
    workers: int = 3,
    num_stages: int = 2,
    worker_settings: Mapping[str, Any] | None = None,
    gateway_settings: Mapping[str, Any] | None = None,
) -> AsyncIterator[Stack]:
    """Start everything (Redis at redis_url must be empty), register `models` (name -> checkpoint dir)
    with num_stages each, and stop everything on exit. Workers are w0, w1, ... with 1 GiB each."""
    registry = await start_registry(RegistryConfig(listen="127.0.0.1:0", metrics_port=-1, data_dir=str(tmp / "data")))
    registry_addr = f"127.0.0.1:{registry.port}"
    sched_running, controller = await start_scheduler(SchedulerConfig(
        listen="127.0.0.1:0", metrics_port=-1, redis_url=redis_url, registry=registry_addr,
        heartbeat_interval_s=0.5, heartbeat_ttl_s=5.0, reconcile_interval_s=0.5, kv_reserve_tokens=256,
    ))
    scheduler_addr = f"127.0.0.1:{sched_running.port}"
    running_workers: dict[str, tuple[Any, WorkerApp]] = {}
    gw_running = gw_app = None
    channels: list[grpc.aio.Channel] = []
    try:
        for i in range(workers):
            running_workers[f"w{i}"] = await start_worker(WorkerConfig(**{
                "listen": "127.0.0.1:0", "metrics_port": -1, "worker_id": f"w{i}", "registry": registry_addr,
                "scheduler": scheduler_addr, "device": "cpu", "memory_bytes": 1 << 30,
                "cache_dir": str(tmp / f"cache-{i}"), **(worker_settings or {}),
            }))
        gw_running, gw_app = await start_gateway(GatewayConfig(**{
            "listen": "127.0.0.1:0", "metrics_port": -1, "registry": registry_addr, "scheduler": scheduler_addr,
            "redis_url": redis_url, "max_failovers": 8, **GATEWAY_TEST_SETTINGS, **(gateway_settings or {}),
        }))
        channels = [aio_channel(f"127.0.0.1:{gw_running.port}"), aio_channel(scheduler_addr)]
        stubs = {}
        for worker_id, (running, _) in running_workers.items():
            channels.append(aio_channel(f"127.0.0.1:{running.port}"))
            stubs[worker_id] = worker_pb2_grpc.WorkerStub(channels[-1])
        stack = Stack(gateway_pb2_grpc.GatewayStub(channels[0]), scheduler_pb2_grpc.SchedulerStub(channels[1]),
                      stubs, running_workers, channels)
        for model, directory in models.items():
            chunks = aiter_upload_chunks(plan_upload(directory), model, num_stages=num_stages)
            stack.versions[model] = await stack.gateway.RegisterModel(chunks)
        yield stack
    finally:
        for channel in channels:
            await channel.close()
        if gw_running is not None:
            await stop_gateway(gw_running, gw_app)
        for running, app in list(running_workers.values()):
            await stop_worker(running, app)
        await sched_running.stop(0)
        await controller.close()
        await registry.stop(0)


def decisive_llama(directory: Path, seed: int) -> Path:
    """A random Llama (4 layers, hidden 64, 2 kv heads, vocab 512) with decisive logits: no near-ties in
    argmax, so greedy tokens do not depend on how the work was batched or split."""
    return write_random_checkpoint(directory, "llama", num_layers=4, hidden_size=64, num_heads=4, num_kv_heads=2,
                                   vocab_size=512, seed=seed, init_std=0.2, random_norms_and_biases=True)


async def generate(stack: Stack, timeout: float = 60.0, **fields: Any) -> list[gateway_pb2.GenerateChunk]:
    """One Gateway.Generate call, all its chunks."""
    return [c async for c in stack.gateway.Generate(gateway_pb2.GenerateRequest(**fields), timeout=timeout)]


def hf_greedy(directory: Path, prompt: list[int], max_new_tokens: int) -> list[int]:
    """transformers' greedy continuation (stops at the config's EOS, as the gateway does)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    return hf_greedy_many(model, [prompt], max_new_tokens)[0]


def hf_greedy_many(model: Any, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy continuations of each prompt, one at a time, with a loaded transformers model."""
    out = []
    with torch.no_grad():
        for prompt in prompts:
            ids = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                                 attention_mask=torch.ones(1, len(prompt), dtype=torch.long), pad_token_id=0)
            out.append(ids[0, len(prompt):].tolist())
    return out
