"""The gateway alone, as a real gRPC server: bad requests are refused before any downstream call, and a
registry or scheduler that is down gives UNAVAILABLE naming it. Also `python -m services.gateway` as a
process: health, flags, SIGTERM."""

from __future__ import annotations

import signal
import subprocess
import sys
from typing import AsyncIterator

import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from modelgrid.channel import aio_channel
from modelgrid.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from services.gateway.app import start_gateway, stop_gateway
from services.gateway.config import GatewayConfig
from tests.support import ROOT, Service, free_port


@pytest_asyncio.fixture
async def lonely_gateway() -> AsyncIterator[tuple[gateway_pb2_grpc.GatewayStub, str, str, grpc.aio.Channel]]:
    """A gateway whose registry and scheduler addresses are dead ports."""
    registry, scheduler = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    running, app = await start_gateway(GatewayConfig(
        listen="127.0.0.1:0", metrics_port=-1, registry=registry, scheduler=scheduler, max_failovers=1,
        auth="disabled", http_port=-1,  # API keys and the HTTP API have their own tests
    ))
    channel = aio_channel(f"127.0.0.1:{running.port}")
    yield gateway_pb2_grpc.GatewayStub(channel), registry, scheduler, channel
    await channel.close()
    await stop_gateway(running, app)


async def code_of(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value.code(), info.value.details()


async def collect(call) -> list:
    return [c async for c in call]


async def test_health_is_serving(lonely_gateway) -> None:
    _, _, _, channel = lonely_gateway
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "modelgrid.v1.Gateway"):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_bad_requests_are_refused_without_downstream(lonely_gateway) -> None:
    stub, *_ = lonely_gateway
    for request, message in [
        (gateway_pb2.GenerateRequest(model="../x", text="hi"), "model name '../x' is invalid"),
        (gateway_pb2.GenerateRequest(model="m"), "prompt is empty"),
        (gateway_pb2.GenerateRequest(model="m", text="hi", top_p=2.0), "top_p"),
    ]:
        code, details = await code_of(collect(stub.Generate(request, timeout=10)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and message in details
    code, details = await code_of(stub.Embed(gateway_pb2.EmbedRequest(model="m"), timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "1 to 256" in details


async def test_a_service_that_is_down_is_named(lonely_gateway) -> None:
    stub, registry, scheduler, _ = lonely_gateway
    code, details = await code_of(stub.ListModels(common_pb2.ListModelsRequest(), timeout=10))
    assert code == grpc.StatusCode.UNAVAILABLE and f"registry at {registry} is unavailable" in details
    code, details = await code_of(collect(stub.Generate(gateway_pb2.GenerateRequest(model="m", text="hi"), timeout=10)))
    assert code == grpc.StatusCode.UNAVAILABLE and f"registry at {registry}" in details
    code, details = await code_of(stub.ListWorkers(common_pb2.ListWorkersRequest(), timeout=10))
    assert code == grpc.StatusCode.UNAVAILABLE and f"scheduler at {scheduler} is unavailable" in details
    code, details = await code_of(stub.GetPlacement(common_pb2.GetPlacementRequest(model="m"), timeout=10))
    assert code == grpc.StatusCode.UNAVAILABLE and "scheduler" in details


def test_process_serves_and_stops_on_sigterm(tmp_path) -> None:
    port = free_port()
    service = Service(
        "gateway",
        ["--listen", f"127.0.0.1:{port}", "--metrics-port", "-1", "--grace-s", "1"],
        port,
        tmp_path / "gateway.log",
        env={"MODELGRID_REGISTRY_ADDR": f"127.0.0.1:{free_port()}", "MODELGRID_AUTH": "disabled",
             "MODELGRID_GATEWAY_HTTP_PORT": "-1"},
    ).start(timeout_s=60)
    try:
        with grpc.insecure_channel(service.address) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            with pytest.raises(grpc.RpcError) as info:
                stub.GetModel(common_pb2.GetModelRequest(name="m"), timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "registry at" in info.value.details()
        service.proc.send_signal(signal.SIGTERM)
        assert service.proc.wait(30) == 0
    finally:
        service.stop()


def test_the_gateway_does_not_import_torch() -> None:
    code = ("import sys, services.gateway.__main__, services.gateway.servicer; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stderr


def test_bad_flags_exit_with_a_message(tmp_path) -> None:
    proc = subprocess.run([sys.executable, "-m", "services.gateway", "--max-tokens-cap", "0"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--max-tokens-cap must be >= 1" in proc.stderr
