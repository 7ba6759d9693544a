"""`python -m services.worker` as a real process: healthy without a scheduler, graceful SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from modelgrid.channel import aio_channel, sync_channel
from modelgrid.model import write_random_checkpoint
from modelgrid.v1 import common_pb2, registry_pb2_grpc, scheduler_pb2_grpc, worker_pb2, worker_pb2_grpc
from services.registry.app import start_registry
from services.registry.config import RegistryConfig
from modelgrid.upload import iter_upload_chunks
from services.scheduler.app import start_scheduler
from services.scheduler.config import SchedulerConfig
from tests.support import Service, free_port


def worker_service(tmp_path: Path, *extra: str, registry: str | None = None, scheduler: str | None = None) -> Service:
    port = free_port()
    args = ["--listen", f"127.0.0.1:{port}", "--scheduler", scheduler or f"127.0.0.1:{free_port()}",
            "--registry", registry or f"127.0.0.1:{free_port()}", "--metrics-port", "-1",
            "--cache-dir", str(tmp_path / "cache"), "--device", "cpu", "--worker-id", "proc-1", *extra]
    return Service("worker", args, port, tmp_path / "worker.log")


def wait_for_log(service: Service, text: str, timeout_s: float = 15) -> None:
    deadline = time.monotonic() + timeout_s
    while text not in service.log():
        assert time.monotonic() < deadline, f"{text!r} not in the log:\n{service.log()}"
        time.sleep(0.05)


def test_healthy_without_scheduler_keeps_retrying_and_exits_0_on_sigterm(tmp_path: Path) -> None:
    worker = worker_service(tmp_path, "--log-level", "DEBUG").start()
    try:
        with sync_channel(worker.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for service in ("", "modelgrid.v1.Worker"):
                reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
            status = worker_pb2_grpc.WorkerStub(channel).GetStatus(worker_pb2.GetStatusRequest(), timeout=5)
            assert status.worker_id == "proc-1" and status.address == worker.address and status.state == "serving"
            assert status.total_memory > 0 and status.free_memory == status.total_memory
        wait_for_log(worker, "attempt 2")  # registration is retried, and the process is still up
        assert worker.proc.poll() is None
    finally:
        rc = worker.stop()
    assert rc == 0, worker.log()
    assert "Traceback" not in worker.log()


def test_bad_flag_is_refused_with_a_message(tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.support import ROOT

    proc = subprocess.run([sys.executable, "-m", "services.worker", "--device", "tpu"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--device must be" in proc.stderr


@pytest.mark.asyncio
async def test_sigterm_drains_open_sessions_then_exits_0(tmp_path: Path) -> None:
    ckpt = write_random_checkpoint(tmp_path / "ckpt", "llama", num_layers=2, hidden_size=32, num_heads=4,
                                   vocab_size=300)
    registry = await start_registry(RegistryConfig(listen="127.0.0.1:0", metrics_port=-1,
                                                   data_dir=str(tmp_path / "registry")))
    worker = worker_service(tmp_path, "--grace-s", "30", registry=f"127.0.0.1:{registry.port}")
    try:
        async with aio_channel(f"127.0.0.1:{registry.port}") as channel:
            await registry_pb2_grpc.RegistryStub(channel).UploadVersion(iter(list(iter_upload_chunks(ckpt, "tiny"))))
        await asyncio.to_thread(worker.start)
        async with aio_channel(worker.address) as channel:
            stub = worker_pb2_grpc.WorkerStub(channel)
            health = health_pb2_grpc.HealthStub(channel)

            def step(session: str, position: int, ids: list[int]) -> worker_pb2.ForwardRequest:
                req = worker_pb2.ForwardRequest(session_id=session, model="tiny", version="v1", start_layer=0,
                                                end_layer=2, epoch=1, position=position)
                req.tokens.ids.extend(ids)
                return req

            await stub.LoadStage(worker_pb2.LoadStageRequest(model="tiny", version="v1", start_layer=0,
                                                             end_layer=2, epoch=1))
            assert (await stub.Forward(step("open", 0, [1, 2, 3]))).WhichOneof("output") == "token"

            worker.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 10
            while (await health.Check(health_pb2.HealthCheckRequest(), timeout=5)).status == \
                    health_pb2.HealthCheckResponse.SERVING:
                assert time.monotonic() < deadline, "still SERVING after SIGTERM"
                await asyncio.sleep(0.05)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Forward(step("new", 0, [1]))
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "worker draining" in info.value.details()
            # the open session goes on while the process waits for it
            assert (await stub.Forward(step("open", 3, [4]))).cache_length == 4
            assert worker.proc.poll() is None
            await stub.CloseSession(worker_pb2.CloseSessionRequest(session_id="open"))
        rc = await asyncio.to_thread(worker.proc.wait, 15)
        assert rc == 0, worker.log()
    finally:
        await asyncio.to_thread(worker.stop)
        await registry.stop(0)
    assert "Traceback" not in worker.log()


@pytest.mark.asyncio
async def test_registers_when_the_real_scheduler_comes_up_and_again_after_redis_is_flushed(
    tmp_path: Path, redis_url: str
) -> None:
    import redis

    scheduler_address = f"127.0.0.1:{free_port()}"
    worker = worker_service(tmp_path, scheduler=scheduler_address)
    await asyncio.to_thread(worker.start)
    running = controller = None
    try:
        await asyncio.to_thread(wait_for_log, worker, "scheduler registration failed")
        running, controller = await start_scheduler(SchedulerConfig(
            listen=scheduler_address, metrics_port=-1, redis_url=redis_url, registry=f"127.0.0.1:{free_port()}",
            heartbeat_interval_s=0.2, heartbeat_ttl_s=2.0))
        async with aio_channel(scheduler_address) as channel:
            stub = scheduler_pb2_grpc.SchedulerStub(channel)

            async def listed() -> list:
                reply = await stub.ListWorkers(common_pb2.ListWorkersRequest(), timeout=5)
                return [(w.worker_id, w.address, w.state) for w in reply.workers]

            async def until_listed() -> None:
                deadline = time.monotonic() + 15
                while (await listed()) != [("proc-1", worker.address, "serving")]:
                    assert time.monotonic() < deadline, f"worker not registered; log:\n{worker.log()}"
                    await asyncio.sleep(0.05)

            await until_listed()
            redis.Redis.from_url(redis_url).flushall()  # the scheduler forgets every worker
            assert await listed() == []
            await until_listed()  # heartbeat -> NOT_FOUND -> registered again
        assert worker.proc.poll() is None
    finally:
        rc = await asyncio.to_thread(worker.stop)
        if running is not None:
            await running.stop(0)
            await controller.close()
    assert rc == 0, worker.log()
