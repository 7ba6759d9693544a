"""`modelgrid up` as a user runs it: the real launcher, the real services, the CLI in subprocesses.

Readiness is the launcher's own "ready" line (it polls health and the demo's placement); every wait
is bounded. After each test no process the launcher started may remain.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import stat
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import ROOT, free_port

pytestmark = pytest.mark.slow

START_TIMEOUT_S = 300
STOP_TIMEOUT_S = 60


def modelgrid_command() -> list[str]:
    """The installed `modelgrid` console script when there is one, else the same entry point via -m."""
    script = Path(sys.executable).parent / "modelgrid"
    return [str(script)] if script.exists() else [sys.executable, "-m", "modelgrid"]


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    for name in ("MODELGRID_GATEWAY", "MODELGRID_API_KEY", "MODELGRID_DATA_DIR"):
        env.pop(name, None)
    return {**env, **extra}


def process_alive(pid: int) -> bool:
    """Running (a zombie that nobody has reaped yet counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def processes_mentioning(text: str) -> list[tuple[int, str]]:
    """Live processes (other than this one) whose command line contains text."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline and process_alive(int(entry.name)):
            found.append((int(entry.name), cmdline))
    return found


class Launcher:
    """`modelgrid up ...` in a subprocess, its output collected line by line by a reader thread."""

    def __init__(self, data_dir: Path, *args: str) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        if "--http-port" not in args:  # never the default 8000: tests must not collide with anything on this machine
            args = (*args, "--http-port", str(free_port()))
        self.proc = subprocess.Popen(
            [*modelgrid_command(), "up", "--port", str(self.port), "--data-dir", str(data_dir), *args],
            cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    @property
    def gateway(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            self._queue.put(line)
        self._queue.put(None)

    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                line = self._queue.get(timeout=1.0)
            except queue.Empty:
                continue
            if line is None:
                pytest.fail(f"modelgrid up exited with {self.proc.wait()} before ready:\n{self.output()}\n"
                            f"{self.service_logs()}")
            if line.startswith("ready"):
                return
        pytest.fail(f"modelgrid up not ready after {timeout_s} s:\n{self.output()}\n{self.service_logs()}")

    def wait_exit(self, timeout_s: float) -> int:
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            pytest.fail(f"modelgrid up still running {timeout_s} s after SIGTERM:\n{self.output()}")

    def child_pids(self) -> dict[str, int]:
        return {p.stem: int(p.read_text()) for p in (self.data_dir / "run").glob("*.pid") if p.stem != "launcher"}

    def service_logs(self, lines: int = 30) -> str:
        out = []
        for log in sorted((self.data_dir / "logs").glob("*.log")):
            tail = log.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {log.name}\n" + "\n".join(tail))
        return "\n".join(out)

    def cleanup(self) -> None:
        """Whatever happened in the test, leave nothing running."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for pid in self.child_pids().values():
            if process_alive(pid):
                os.kill(pid, signal.SIGKILL)


def run_cli(*args: str, timeout_s: float = 120, data_dir: Path | None = None) -> subprocess.CompletedProcess:
    """The CLI in a subprocess; with data_dir it finds the API key `modelgrid up` saved there."""
    env = _env(MODELGRID_DATA_DIR=str(data_dir)) if data_dir is not None else _env()
    return subprocess.run([*modelgrid_command(), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout_s)


def printed_key(up: "Launcher") -> str | None:
    """The admin key `modelgrid up` printed (once), if it printed one."""
    lines = up.lines
    for i, line in enumerate(lines):
        if line.startswith("admin API key (shown once"):
            return lines[i + 1].strip()
    return None


def metrics_ports(up: "Launcher") -> dict[str, int]:
    """Service -> metrics port, from the table `modelgrid up` prints."""
    found = {}
    for line in up.lines:
        match = re.match(r"^\s*(\S+)\s+\S+\s+:(\d+)\s+\d+\s", line)
        if match:
            found[match.group(1)] = int(match.group(2))
    return found


def assert_all_gone(pids: dict[str, int], data_dir: Path, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        alive = {name: pid for name, pid in pids.items() if process_alive(pid)}
        leftovers = processes_mentioning(str(data_dir))
        if not alive and not leftovers:
            return
        time.sleep(0.1)
    pytest.fail(f"processes left behind: {alive} {leftovers}")


def check_keys(up: Launcher, data: Path, gw: list[str]) -> None:
    """No key: refused; a user key made with `keys create` serves but is no admin; revoked, it stops."""
    nowhere = data.parent / "no-key-here"
    nowhere.mkdir(exist_ok=True)
    result = run_cli("models", "list", *gw, data_dir=nowhere)
    assert result.returncode == 1 and "UNAUTHENTICATED" in result.stderr, result.stderr
    result = run_cli("keys", "create", "--name", "alice", "--rpm", "100", "--json", *gw, data_dir=data)
    assert result.returncode == 0, result.stderr
    alice = json.loads(result.stdout)["secret"]
    as_alice = [*gw, "--api-key", alice]
    result = run_cli("generate", "--model", "demo", "--prompt", "hi", "--max-tokens", "2", *as_alice, data_dir=nowhere)
    assert result.returncode == 0, result.stderr
    result = run_cli("workers", *as_alice, data_dir=nowhere)
    assert result.returncode == 1 and "PERMISSION_DENIED" in result.stderr, result.stderr
    result = run_cli("status", *gw, data_dir=data)
    assert result.returncode == 0 and "worker-0" in result.stdout and "demo" in result.stdout, result.stderr
    result = run_cli("keys", "revoke", "alice", *gw, data_dir=data)
    assert result.returncode == 0, result.stderr
    deadline = time.monotonic() + 10
    while (result := run_cli("models", "list", *as_alice, data_dir=nowhere)).returncode == 0:
        assert time.monotonic() < deadline, "a revoked key still works"
    assert "UNAUTHENTICATED" in result.stderr, result.stderr


def check_metrics(up: Launcher) -> None:
    """Every service's /metrics parses; the gateway counted the demo's generated tokens."""
    ports = metrics_ports(up)
    assert {"registry", "scheduler", "worker-0", "worker-1", "gateway"} <= set(ports), up.output()
    families = {}
    for name, port in ports.items():
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
            families[name] = {f.name: f for f in text_string_to_metric_families(reply.read().decode())}
    out = [s.value for s in families["gateway"]["modelgrid_gateway_tokens"].samples
           if s.name == "modelgrid_gateway_tokens_total" and s.labels == {"model": "demo", "direction": "out"}]
    assert out and out[0] >= 8
    assert "modelgrid_scheduler_heartbeat_age_seconds" in families["scheduler"]
    assert "modelgrid_worker_loaded_stages" in families["worker-0"]


def test_up_demo_generate_placement_workers_then_sigterm(tmp_path: Path) -> None:
    data = tmp_path / "data"
    up = Launcher(data, "--workers", "2", "--demo")
    try:
        up.wait_ready()
        key = printed_key(up)  # a new data dir: `up` made the first admin key, printed it once and saved it
        assert key and key.startswith("mg_") and up.output().count(key) == 1, up.output()
        assert (data / "api-key").read_text().strip() == key
        assert stat.S_IMODE((data / "api-key").stat().st_mode) == 0o600
        pids = up.child_pids()
        assert {"redis", "registry", "scheduler", "worker-0", "worker-1", "gateway"} <= set(pids), pids
        assert all(process_alive(pid) for pid in pids.values()), pids
        if "MODELGRID_WORKER_TORCH_THREADS" not in os.environ:  # the 2 workers split the cores between them
            argv = Path(f"/proc/{pids['worker-0']}/cmdline").read_bytes().decode().split("\0")
            assert argv[argv.index("--torch-threads") + 1] == str(max(1, len(os.sched_getaffinity(0)) // 2)), argv
        gw = ["--gateway", up.gateway]

        max_tokens = 8
        result = run_cli("generate", "--model", "demo", "--prompt", "hello", "--json", "--max-tokens",
                         str(max_tokens), "--temperature", "0", *gw, data_dir=data)
        assert result.returncode == 0, result.stderr
        out = json.loads(result.stdout)
        assert out["finish_reason"] in ("length", "stop"), out
        assert len(out["token_ids"]) == max_tokens or (out["finish_reason"] == "stop" and out["token_ids"]), out
        assert out["usage"]["completion_tokens"] == len(out["token_ids"])
        assert isinstance(out["text"], str)

        result = run_cli("generate", "--model", "demo", "--prompt", "hello", "--max-tokens", "4", *gw, data_dir=data)
        assert result.returncode == 0, result.stderr  # plain streaming output

        result = run_cli("placement", "demo", "--json", *gw, data_dir=data)
        assert result.returncode == 0, result.stderr
        placement = json.loads(result.stdout)
        stages = sorted(placement["stages"], key=lambda s: s["first_layer"])
        covered = [layer for s in stages for layer in range(s["first_layer"], s["last_layer"] + 1)]
        assert covered == list(range(4)), stages  # the demo has 4 layers, each served exactly once
        assert len({s["worker_id"] for s in stages}) == 2, stages  # stages = min(workers, 2) on distinct workers
        assert placement["epoch"] > 0

        result = run_cli("workers", "--json", *gw, data_dir=data)
        assert result.returncode == 0, result.stderr
        workers = json.loads(result.stdout)
        assert sorted(w["worker_id"] for w in workers) == ["worker-0", "worker-1"]
        assert all(any(s["model"] == "demo" for s in w["stages"]) for w in workers), workers

        result = run_cli("generate", "--model", "no-such-model", "--prompt", "x", *gw, data_dir=data)
        assert result.returncode == 1 and "error: NOT_FOUND" in result.stderr, result.stderr

        check_keys(up, data, gw)
        check_metrics(up)

        up.proc.send_signal(signal.SIGTERM)
        assert up.wait_exit(STOP_TIMEOUT_S) == 0, up.output()
        assert_all_gone(pids, data)
        assert not list((data / "run").glob("*.pid"))
        assert (data / "logs" / "gateway.log").exists()
    finally:
        up.cleanup()


def test_children_die_with_a_killed_launcher(tmp_path: Path) -> None:
    data = tmp_path / "data"
    up = Launcher(data, "--workers", "1")
    try:
        up.wait_ready()
        pids = up.child_pids()
        assert len(pids) == 5, pids  # redis, registry, scheduler, worker-0, gateway
        up.proc.kill()  # SIGKILL: no clean-up code runs; PR_SET_PDEATHSIG must take the children down
        up.proc.wait()
        assert_all_gone(pids, data, timeout_s=15)
    finally:
        up.cleanup()
    key = (data / "api-key").read_text().strip()

    again = Launcher(data, "--workers", "1")  # the same data dir: its saved key is used again, not printed
    try:
        again.wait_ready()
        assert printed_key(again) is None and key not in again.output()
        assert (data / "api-key").read_text().strip() == key
        result = run_cli("keys", "list", "--json", "--gateway", again.gateway, data_dir=data)
        assert result.returncode == 0 and [k["name"] for k in json.loads(result.stdout)] == ["bootstrap"]
        again.proc.send_signal(signal.SIGTERM)
        assert again.wait_exit(STOP_TIMEOUT_S) == 0, again.output()
    finally:
        again.cleanup()

    other = Launcher(data, "--workers", "1", "--api-key", "mg_a-key-this-registry-has-never-seen")
    try:
        assert other.wait_exit(START_TIMEOUT_S) == 1, other.output()
        assert "already has admin API keys and refused --api-key" in other.output(), other.output()
        assert_all_gone(other.child_pids(), data)
    finally:
        other.cleanup()


def test_a_service_that_cannot_start_fails_with_its_log(tmp_path: Path) -> None:
    data = tmp_path / "data"
    up = Launcher(data, "--workers", "1", "--db-url", "nosuchdb://nowhere/registry")
    try:
        code = up.wait_exit(START_TIMEOUT_S)
        assert code == 1, up.output()
        assert "error:" in up.output() and "registry" in up.output(), up.output()
        assert "ready" not in [line.split(":")[0] for line in up.lines]
        assert_all_gone(up.child_pids(), data)
    finally:
        up.cleanup()


def test_ctrl_c_while_starting_stops_everything(tmp_path: Path) -> None:
    data = tmp_path / "data"
    up = Launcher(data, "--workers", "1")
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not (data / "run" / "registry.pid").exists():  # registry spawned, not yet healthy
            assert up.proc.poll() is None and time.monotonic() < deadline, up.output()
            time.sleep(0.02)
        pids = up.child_pids()
        up.proc.send_signal(signal.SIGINT)
        assert up.wait_exit(STOP_TIMEOUT_S) == 0, up.output()
        assert not any(line.startswith("ready") for line in up.lines)
        assert_all_gone(pids, data)
    finally:
        up.cleanup()
