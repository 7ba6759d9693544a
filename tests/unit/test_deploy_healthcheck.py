"""services.common.healthcheck: the probe compose's healthchecks run (exit 0 only when SERVING).

These use a real grpc.health.v1 server on a loopback port picked by the OS; nothing else.
"""

from __future__ import annotations

import subprocess
import sys
import time
from concurrent import futures
from typing import Iterator

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from services.common import healthcheck
from tests.unit.test_deploy_contract import ROOT


class HealthServer:
    def __init__(self) -> None:
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def set(self, service: str, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        self.health.set(service, status)


@pytest.fixture()
def server() -> Iterator[HealthServer]:
    s = HealthServer()
    yield s
    s.server.stop(None)


def test_serving_exits_0(server: HealthServer) -> None:
    server.set("", True)
    server.set("modelgrid.v1.Worker", True)
    assert healthcheck.main([server.address]) == 0
    assert healthcheck.main([server.address, "--service", "modelgrid.v1.Worker"]) == 0


def test_not_serving_exits_1(server: HealthServer, capsys: pytest.CaptureFixture[str]) -> None:
    server.set("", False)
    assert healthcheck.main([server.address]) == 1
    assert "NOT_SERVING" in capsys.readouterr().err


def test_unknown_service_exits_1(server: HealthServer) -> None:
    server.set("", True)
    assert healthcheck.check(server.address, "modelgrid.v1.Nope") == "NOT_FOUND"
    assert healthcheck.main([server.address, "--service", "modelgrid.v1.Nope"]) == 1


def test_nothing_listening_exits_1_quickly() -> None:
    s = HealthServer()  # take a free port, then close it
    address = s.address
    s.server.stop(None).wait()
    start = time.monotonic()
    assert healthcheck.main([address, "--timeout-s", "5"]) == 1
    assert time.monotonic() - start < 5


def test_cli_runs_without_torch(server: HealthServer) -> None:
    """The probe runs every few seconds in every container: it must not pay for importing torch."""
    server.set("", True)
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "services.common.healthcheck", server.address],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in result.stderr.splitlines() if "|" in line}
    assert "grpc" in imported and "torch" not in imported
