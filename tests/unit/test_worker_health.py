"""The worker's health answer requires its device to compute; a failing or hung device is NOT_SERVING."""

from __future__ import annotations

import threading

import torch
from grpc_health.v1 import health_pb2

from services.worker import health
from services.worker.device import DeviceProbe
from services.worker.health import DeviceHealthServicer

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def check(servicer: DeviceHealthServicer) -> int:
    return (await servicer.Check(health_pb2.HealthCheckRequest(service=""), None)).status


async def test_cpu_probe_passes_and_a_broken_device_fails() -> None:
    assert DeviceProbe(torch.device("cpu"))()
    if not torch.cuda.is_available():  # an absent GPU raises in the probe: caught, reported unhealthy
        assert not DeviceProbe(torch.device("cuda:0"))()
    assert await check(DeviceHealthServicer(DeviceProbe(torch.device("cpu")))) == SERVING


async def test_failing_probe_is_not_serving_and_results_are_reused_briefly() -> None:
    calls = []

    def broken() -> bool:
        calls.append(1)
        return False

    servicer = DeviceHealthServicer(broken)
    assert await check(servicer) == NOT_SERVING
    assert await check(servicer) == NOT_SERVING
    assert len(calls) == 1  # within PROBE_TTL_S the last result is reused


async def test_hung_probe_is_not_serving(monkeypatch) -> None:
    monkeypatch.setattr(health, "PROBE_TIMEOUT_S", 0.1)
    release = threading.Event()
    servicer = DeviceHealthServicer(lambda: release.wait(5))
    try:
        assert await check(servicer) == NOT_SERVING
    finally:
        release.set()


async def test_not_serving_status_is_kept_whatever_the_device_says() -> None:
    servicer = DeviceHealthServicer(lambda: True)
    await servicer.set("", NOT_SERVING)
    assert await check(servicer) == NOT_SERVING
