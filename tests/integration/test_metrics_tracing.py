"""Observability of the real services as processes (`python -m services.<name>`), each with its own /metrics:
a registry (with a bootstrap API key), a scheduler, two CPU workers and a gateway, a tiny Llama in two stages.

Every /metrics parses with prometheus_client's parser; the request counters grow by exactly the calls this
test makes; the gateway counts tokens and times the first and the following tokens; the scheduler reports
each worker's heartbeat age. A request id sent to the gateway appears in the log lines of the registry, the
scheduler and both workers for that request. `modelgrid status` shows it all on one screen.
"""

from __future__ import annotations

import json
import os
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Iterator

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

import modelgrid
from modelgrid import cli
from modelgrid.channel import sync_channel
from modelgrid.model import write_random_checkpoint
from modelgrid.v1 import (
    common_pb2,
    gateway_pb2,
    gateway_pb2_grpc,
    registry_pb2_grpc,
    scheduler_pb2_grpc,
    worker_pb2,
    worker_pb2_grpc,
)
from tests.support import Service, free_port

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]

BOOT = "mg_admin-key-of-the-metrics-test"
MODEL = "tiny"
REQUEST_ID = "trace-4f1e9a"
WORKERS = ("w0", "w1")


@dataclass
class Stack:
    services: dict[str, Service]
    metrics_ports: dict[str, int]
    channels: list[grpc.Channel] = field(default_factory=list)

    def channel(self, name: str) -> grpc.Channel:
        self.channels.append(sync_channel(self.services[name].address))
        return self.channels[-1]

    @property
    def gateway(self) -> str:
        return self.services["gateway"].address

    def metrics(self, name: str) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_ports[name]}/metrics", timeout=10) as reply:
            return reply.read().decode()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, redis_server) -> Iterator[Stack]:
    import redis

    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    tmp = tmp_path_factory.mktemp("observed")
    names = ("registry", "scheduler", "gateway", *WORKERS)
    free: set[int] = set()
    while len(free) < 2 * len(names):  # distinct: a port the kernel hands out twice would clash
        free.add(free_port())
    ports, metrics = dict(zip(names, sorted(free))), dict(zip(names, sorted(free)[len(names):]))
    registry_addr, scheduler_addr = f"127.0.0.1:{ports['registry']}", f"127.0.0.1:{ports['scheduler']}"

    def service(name: str, module: str, *args: str, env: dict[str, str] | None = None) -> Service:
        return Service(module, ["--listen", f"127.0.0.1:{ports[name]}", "--metrics-port", str(metrics[name]),
                                "--log-level", "DEBUG", "--grace-s", "1", *args],
                       ports[name], tmp / f"{name}.log", env=env)

    services = {
        "registry": service("registry", "registry", "--data-dir", str(tmp / "data"),
                            env={"MODELGRID_BOOTSTRAP_API_KEY": BOOT}),
        "scheduler": service("scheduler", "scheduler", "--redis-url", redis_server.url, "--registry", registry_addr,
                             "--heartbeat-interval-s", "0.5", "--heartbeat-ttl-s", "5", "--reconcile-interval-s",
                             "0.5", "--kv-reserve-tokens", "64"),
        **{w: service(w, "worker", "--worker-id", w, "--scheduler", scheduler_addr, "--registry", registry_addr,
                      "--device", "cpu", "--memory-bytes", str(1 << 30), "--cache-dir", str(tmp / f"cache-{w}"))
           for w in WORKERS},
        "gateway": service("gateway", "gateway", "--registry", registry_addr, "--scheduler", scheduler_addr,
                           "--redis-url", redis_server.url, env={"MODELGRID_GATEWAY_HTTP_PORT": "-1"}),
    }
    started: list[Service] = []
    stack = Stack(services, metrics)
    try:
        for svc in services.values():
            started.append(svc.start(timeout_s=120))
        checkpoint = write_random_checkpoint(tmp / "ckpt", "llama", num_layers=2, hidden_size=64, num_heads=4,
                                             vocab_size=300, seed=3)
        with modelgrid.Client(stack.gateway, timeout=120, api_key=BOOT) as sdk:
            sdk.register(checkpoint, MODEL, replicas=1, stages=2)
            wait_ready(sdk)
        yield stack
    finally:
        for channel in stack.channels:
            channel.close()
        for svc in reversed(started):
            svc.stop()


def wait_ready(sdk: modelgrid.Client, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            placement = sdk.placement(MODEL)
            if placement.ready and len({s.replicas[0].worker_id for s in placement.stages}) == 2:
                return
        except (modelgrid.Unavailable, modelgrid.NotFound):  # not placed yet
            pass
        assert time.monotonic() < deadline, "the model was not placed on both workers"
        time.sleep(0.1)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, parsed with prometheus_client's own parser."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(snapshot: dict, name: str, **labels: str) -> float:
    return snapshot.get((name, tuple(sorted(labels.items()))), 0.0)


def requests_ok(snapshot: dict, service: str, method: str) -> float:
    return value(snapshot, "modelgrid_grpc_requests_total", service=service, method=method, code="OK")


def test_metrics_count_exactly_and_request_ids_reach_every_service(stack: Stack) -> None:
    names = ("registry", "scheduler", *WORKERS, "gateway")
    before = {name: samples(stack.metrics(name)) for name in names}

    gateway = gateway_pb2_grpc.GatewayStub(stack.channel("gateway"))
    request = gateway_pb2.GenerateRequest(model=MODEL, token_ids=common_pb2.TokenIds(ids=[5, 17, 42]), max_tokens=4,
                                          temperature=0.0)
    call = gateway.Generate(request, metadata=(("authorization", f"Bearer {BOOT}"), ("x-request-id", REQUEST_ID)),
                            timeout=60)
    chunks = list(call)
    assert dict(call.initial_metadata())["x-request-id"] == REQUEST_ID
    generated = chunks[-1].usage.completion_tokens
    assert generated == len(chunks) >= 1 and chunks[-1].usage.prompt_tokens == 3
    with modelgrid.Client(stack.gateway, timeout=30, api_key=BOOT) as sdk:
        for _ in range(3):
            sdk.list_models()
    registry = registry_pb2_grpc.RegistryStub(stack.channel("registry"))
    scheduler = scheduler_pb2_grpc.SchedulerStub(stack.channel("scheduler"))
    for _ in range(2):
        registry.ListModels(common_pb2.ListModelsRequest(), timeout=10)
        scheduler.ListWorkers(common_pb2.ListWorkersRequest(), timeout=10)
    for w in WORKERS:
        stub = worker_pb2_grpc.WorkerStub(stack.channel(w))
        for _ in range(2):
            assert stub.GetStatus(worker_pb2.GetStatusRequest(), timeout=10).active_sessions == 0

    after = {name: samples(stack.metrics(name)) for name in names}

    def grew(service: str, method: str, metrics_of: str | None = None) -> float:
        of = metrics_of or service
        return requests_ok(after[of], service, method) - requests_ok(before[of], service, method)

    assert grew("gateway", "Generate") == 1
    assert grew("gateway", "ListModels") == 3
    assert grew("registry", "ListModels") == 3 + 2  # the gateway's three proxied calls, and ours
    assert grew("scheduler", "ListWorkers") == 2
    for w in WORKERS:
        assert grew("worker", "GetStatus", w) == 2
        # each step passes both stages once, as a message on the gateway's step stream (no Forward call; the
        # stream stays open, so it is counted when it ends)
        assert grew("worker", "Forward", w) == 0
        steps = "modelgrid_worker_forward_steps_total"
        assert value(after[w], steps) - value(before[w], steps) == generated
        assert value(after[w], "modelgrid_worker_loaded_stages") == 1
        assert value(after[w], "modelgrid_worker_active_sessions") == 0
        assert ("modelgrid_worker_kv_cache_bytes", ()) in after[w]
    gw_before, gw_after = before["gateway"], after["gateway"]
    for name, labels, delta in [
        ("modelgrid_gateway_tokens_total", dict(model=MODEL, direction="in"), 3),
        ("modelgrid_gateway_tokens_total", dict(model=MODEL, direction="out"), generated),
        ("modelgrid_gateway_time_to_first_token_seconds_count", dict(model=MODEL), 1),
        ("modelgrid_gateway_inter_token_seconds_count", dict(model=MODEL), generated - 1),
    ]:
        assert value(gw_after, name, **labels) - value(gw_before, name, **labels) == delta, name
    assert value(gw_after, "modelgrid_gateway_active_streams") == 0
    ages = {w: value(after["scheduler"], "modelgrid_scheduler_heartbeat_age_seconds", worker=w) for w in WORKERS}
    assert all(("modelgrid_scheduler_heartbeat_age_seconds", (("worker", w),)) in after["scheduler"]
               for w in WORKERS)
    assert all(0 <= age < 5 for age in ages.values()), ages

    for name in ("gateway", "registry", "scheduler", *WORKERS):
        tagged = [line for line in stack.services[name].log().splitlines() if f"[{REQUEST_ID}]" in line]
        assert tagged, f"no log line of {name} carries the request id"
    registry_lines = "\n".join(l for l in stack.services["registry"].log().splitlines() if REQUEST_ID in l)
    assert "ResolveVersion" in registry_lines and "FetchFile" in registry_lines
    for w in WORKERS:  # the prompt's ForwardBatch call carries it in its metadata, each decode step in its message
        tagged = "\n".join(l for l in stack.services[w].log().splitlines() if REQUEST_ID in l)
        assert "ForwardBatch step of session" in tagged and "ForwardStream step of session" in tagged


def test_a_user_key_sees_placements_without_worker_addresses(stack: Stack) -> None:
    with modelgrid.Client(stack.gateway, timeout=30, api_key=BOOT) as admin:
        user = admin.create_key("viewer")
        assert all(r.address for s in admin.placement(MODEL).stages for r in s.replicas)
    with modelgrid.Client(stack.gateway, timeout=30, api_key=user.secret) as client:
        placement = client.placement(MODEL)
        assert placement.ready and all(r.worker_id and not r.address for s in placement.stages for r in s.replicas)
        with pytest.raises(modelgrid.PermissionDenied):
            client.workers()


def test_status_shows_workers_placements_and_traffic(stack: Stack, capsys: pytest.CaptureFixture[str]) -> None:
    with modelgrid.Client(stack.gateway, timeout=30, api_key=BOOT) as sdk:
        sdk.generate_text(MODEL, prompt_ids=[1, 2], max_tokens=2, temperature=0.0)
    os.environ.pop("MODELGRID_API_KEY", None)
    capsys.readouterr()
    assert cli.main(["status", "--json", "--gateway", stack.gateway, "--api-key", BOOT]) == 0
    status = json.loads(capsys.readouterr().out)
    assert sorted(w["worker_id"] for w in status["workers"]) == list(WORKERS)
    assert [p["model"] for p in status["placements"]] == [MODEL]
    (traffic,) = [m for m in status["stats"]["models"] if m["model"] == MODEL]
    assert traffic["requests"] >= 1 and traffic["completion_tokens"] >= 1 and traffic["errors"] == 0
    assert cli.main(["status", "--gateway", stack.gateway, "--api-key", BOOT]) == 0
    screen = capsys.readouterr().out
    for text in ("workers", "w0", "w1", "cpu", "placements", MODEL, "ready", "traffic", "REQ/S"):
        assert text in screen, (text, screen)
    assert screen.count(f" {MODEL} ") >= 2  # in the placements and in the traffic
