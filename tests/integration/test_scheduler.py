"""The scheduler against a real Redis, over gRPC, with minimal stand-ins for the services it calls.

FakeRegistry and FakeWorker below are NOT the real registry and worker: they answer the few RPCs the
scheduler uses (ResolveVersion/ListDeployments; LoadStage/UnloadStage/GetStatus) from fixed data, and
FakeWorker heartbeats like a worker does (re-registering on NOT_FOUND), so these tests do not depend on
the other services.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import grpc
import pytest
import redis.asyncio as aioredis

from modelgrid.channel import aio_channel
from modelgrid.v1 import (
    common_pb2,
    registry_pb2,
    registry_pb2_grpc,
    scheduler_pb2,
    scheduler_pb2_grpc,
    worker_pb2,
    worker_pb2_grpc,
)
from services.common.server import RunningServer, create_server
from services.scheduler.app import start_scheduler
from services.scheduler.config import SchedulerConfig
from services.scheduler.controller import Controller
from tests.support import Service, free_port

pytestmark = pytest.mark.timeout(120)

INTERVAL_S, TTL_S = 0.25, 0.75  # the expiry test's TTL: 3 heartbeat intervals, as in production
RELAXED_TTL_S = 3.0  # other tests: a busy CI machine must not expire workers by accident
PLACEMENTS_KEY = "modelgrid:scheduler:placements"


# -- stand-ins ----------------------------------------------------------------------------------------


def version(model: str = "demo", name: str = "v1", layers: int = 4, layer_bytes: int = 100, aliases=("latest",)):
    return common_pb2.ModelVersion(
        model=model, version=name, architecture="llama", kind="decoder", num_layers=layers,
        layer_bytes=[layer_bytes] * layers, aliases=list(aliases),
    )


class FakeRegistry(registry_pb2_grpc.RegistryServicer):
    """Stand-in registry: a fixed list of deployments; ResolveVersion looks versions and aliases up in it."""

    def __init__(self) -> None:
        self.versions: list[common_pb2.ModelVersion] = []  # every registered version
        self.deployments: list[registry_pb2.Deployment] = []  # those the scheduler should place

    def deploy(self, v: common_pb2.ModelVersion, replicas: int = 1, num_stages: int = 0) -> None:
        self.versions.append(v)
        self.deployments.append(registry_pb2.Deployment(version=v, replicas=replicas, num_stages=num_stages))

    async def ListDeployments(self, request, context):
        return registry_pb2.ListDeploymentsResponse(deployments=self.deployments)

    async def ResolveVersion(self, request, context):
        wanted = request.version or "latest"
        versions = [v for v in self.versions if v.model == request.model]
        for v in versions:
            if wanted == v.version or wanted in v.aliases:
                return v
        if not versions:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"model '{request.model}' not found")
        await context.abort(grpc.StatusCode.NOT_FOUND, f"model '{request.model}' has no version '{wanted}'")


class FakeWorker(worker_pb2_grpc.WorkerServicer):
    """Stand-in worker: records LoadStage/UnloadStage, 'holds' stages, heartbeats like the real one."""

    def __init__(self, worker_id: str, memory: int) -> None:
        self.worker_id, self.memory = worker_id, memory
        self.loads: list[tuple[str, str, int, int, int]] = []
        self.unloads: list[tuple[str, str, int, int, int]] = []
        self.stages: dict[tuple[str, str, int, int], int] = {}
        self.gate: asyncio.Event | None = None  # when set, LoadStage waits for it
        # Fencing like the real worker's: instructions older than the newest epoch heard of (from the
        # scheduler's replies or an instruction) are ABORTED.
        self.newest_epoch = 0
        self.active_sessions = 0
        self.state = "serving"
        self.registrations = 0
        self.last_heartbeat = 0.0
        self.server: RunningServer | None = None
        self._beat: asyncio.Task | None = None
        self._channel: grpc.aio.Channel | None = None

    @property
    def address(self) -> str:
        assert self.server is not None
        return f"127.0.0.1:{self.server.port}"

    async def LoadStage(self, request, context):
        key = (request.model, request.version, request.start_layer, request.end_layer)
        self.loads.append((*key, request.epoch))
        await self._fence(request.epoch, context)
        if self.gate is not None:
            await self.gate.wait()
        self.stages[key] = request.epoch
        return worker_pb2.LoadStageResponse(stage=self._stage(key))

    async def UnloadStage(self, request, context):
        key = (request.model, request.version, request.start_layer, request.end_layer)
        self.unloads.append((*key, request.epoch))
        await self._fence(request.epoch, context)
        self.stages.pop(key, None)
        return worker_pb2.UnloadStageResponse()

    async def _fence(self, epoch: int, context) -> None:
        if epoch < self.newest_epoch:
            await context.abort(grpc.StatusCode.ABORTED, f"epoch {epoch} is older than {self.newest_epoch}")
        self.newest_epoch = epoch

    async def GetStatus(self, request, context):
        return self.info()

    def _stage(self, key: tuple[str, str, int, int]) -> common_pb2.LoadedStage:
        model, ver, start, end = key
        return common_pb2.LoadedStage(
            model=model, version=ver, start_layer=start, end_layer=end, epoch=self.stages[key]
        )

    def info(self) -> common_pb2.WorkerInfo:
        return common_pb2.WorkerInfo(
            worker_id=self.worker_id, address=self.address, device="cpu", total_memory=self.memory,
            free_memory=self.memory, stages=[self._stage(k) for k in self.stages], state=self.state,
            active_sessions=self.active_sessions,
        )

    async def start(self, scheduler_address: str) -> FakeWorker:
        self.server = await create_server(
            "127.0.0.1:0", lambda s: worker_pb2_grpc.add_WorkerServicer_to_server(self, s),
            ["modelgrid.v1.Worker"], "fake-worker",
        )
        self._channel = aio_channel(scheduler_address)
        self.scheduler = scheduler_pb2_grpc.SchedulerStub(self._channel)
        await self._register()
        self._beat = asyncio.create_task(self._heartbeats())
        return self

    async def _register(self) -> None:
        reply = await self.scheduler.RegisterWorker(scheduler_pb2.RegisterWorkerRequest(worker=self.info()), timeout=5)
        self.newest_epoch = max(self.newest_epoch, reply.epoch)
        self.registrations += 1
        self.last_heartbeat = time.monotonic()

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(INTERVAL_S)
            try:
                reply = await self.scheduler.Heartbeat(
                    scheduler_pb2.HeartbeatRequest(worker_id=self.worker_id, worker=self.info()), timeout=5
                )
                self.newest_epoch = max(self.newest_epoch, reply.epoch)
                self.last_heartbeat = time.monotonic()
            except grpc.aio.AioRpcError as err:
                if err.code() == grpc.StatusCode.NOT_FOUND:
                    await self._register()

    async def restart(self) -> None:
        """A fresh process under the same id: nothing loaded, registers again before its key expired."""
        self.stages.clear()
        await self._register()

    async def restart_heartbeats(self) -> None:
        await self._register()
        self._beat = asyncio.create_task(self._heartbeats())

    async def stop_heartbeats(self) -> None:
        if self._beat is not None:
            self._beat.cancel()
            await asyncio.gather(self._beat, return_exceptions=True)
            self._beat = None

    async def stop(self) -> None:
        await self.stop_heartbeats()
        if self.server is not None:
            await self.server.server.stop(0)
        if self._channel is not None:
            await self._channel.close()
            self._channel = None


# -- fixtures -----------------------------------------------------------------------------------------


@dataclass
class Cluster:
    registry: FakeRegistry
    stub: scheduler_pb2_grpc.SchedulerStub
    controller: Controller
    redis: aioredis.Redis
    address: str
    registry_server: RunningServer
    workers: dict[str, FakeWorker] = field(default_factory=dict)

    async def add_worker(self, worker_id: str, memory: int = 250, **attributes: Any) -> FakeWorker:
        worker = FakeWorker(worker_id, memory)
        for name, value in attributes.items():
            setattr(worker, name, value)
        self.workers[worker_id] = await worker.start(self.address)
        return worker

    async def placement(self, model: str = "demo", ver: str = "v1") -> common_pb2.Placement:
        return await self.stub.GetPlacement(common_pb2.GetPlacementRequest(model=model, version=ver), timeout=5)

    async def route(self, model: str = "demo", ver: str = "", exclude=()) -> common_pb2.Route:
        return await self.stub.GetRoute(
            scheduler_pb2.GetRouteRequest(model=model, version=ver, exclude_workers=list(exclude)), timeout=5
        )

    def holder(self, placement: common_pb2.Placement, stage: int) -> FakeWorker:
        return self.workers[placement.stages[stage].replicas[0].worker_id]


@pytest.fixture
async def make_cluster(redis_url: str):
    started: list[tuple[Cluster, RunningServer, RunningServer, grpc.aio.Channel]] = []

    async def make(**overrides: Any) -> Cluster:
        registry = FakeRegistry()
        registry_server = await create_server(
            "127.0.0.1:0", lambda s: registry_pb2_grpc.add_RegistryServicer_to_server(registry, s),
            ["modelgrid.v1.Registry"], "fake-registry",
        )
        settings = dict(
            listen="127.0.0.1:0", metrics_port=-1, redis_url=redis_url, registry=f"127.0.0.1:{registry_server.port}",
            heartbeat_interval_s=INTERVAL_S, heartbeat_ttl_s=RELAXED_TTL_S, reconcile_interval_s=0.3,
            kv_reserve_tokens=0,
        )
        settings.update(overrides)
        config = SchedulerConfig(**settings)
        config.validate()
        running, controller = await start_scheduler(config)
        address = f"127.0.0.1:{running.port}"
        channel = aio_channel(address)
        cluster = Cluster(registry, scheduler_pb2_grpc.SchedulerStub(channel), controller,
                          aioredis.Redis.from_url(redis_url), address, registry_server)
        started.append((cluster, running, registry_server, channel))
        return cluster

    yield make
    for cluster, running, registry_server, channel in started:
        for worker in cluster.workers.values():
            await worker.stop()
        await channel.close()
        await running.stop(0)
        await cluster.controller.close()
        await registry_server.server.stop(0)
        await cluster.redis.aclose()


async def eventually(check: Callable[[], Awaitable[Any]], timeout_s: float = 10.0, what: str = "condition") -> Any:
    """Poll an async check until it returns a truthy value without raising."""
    deadline = time.monotonic() + timeout_s
    last: object = None
    while time.monotonic() < deadline:
        try:
            value = await check()
            if value:
                return value
            last = value
        except (grpc.aio.AioRpcError, AssertionError, KeyError, IndexError) as err:
            last = err
        await asyncio.sleep(0.05)
    raise AssertionError(f"{what} not reached in {timeout_s} s; last: {last}")


def ranges(placement: common_pb2.Placement) -> list[tuple[int, int, list[str]]]:
    return [(s.start_layer, s.end_layer, [r.worker_id for r in s.replicas]) for s in placement.stages]


async def ready_placement(
    cluster: Cluster, model: str = "demo", ver: str = "v1", newer_than: int = 0
) -> common_pb2.Placement:
    async def check():
        p = await cluster.placement(model, ver)
        return p if p.state == "ready" and p.epoch > newer_than else None

    return await eventually(check, what=f"{model} {ver} ready")


# -- tests --------------------------------------------------------------------------------------------


async def test_places_with_epoch_tells_workers_and_routes(make_cluster) -> None:
    cluster = await make_cluster()
    cluster.registry.deploy(version())  # 4 layers x 100 bytes: two 250-byte workers need 2 stages
    w1, w2 = await cluster.add_worker("w1"), await cluster.add_worker("w2")

    reply = await cluster.stub.Reconcile(scheduler_pb2.ReconcileRequest(), timeout=10)
    (placed,) = reply.placements
    assert (placed.model, placed.version) == ("demo", "v1")
    assert [(s.start_layer, s.end_layer) for s in placed.stages] == [(0, 2), (2, 4)]
    assert placed.epoch >= 1

    stored = json.loads(await cluster.redis.hget(PLACEMENTS_KEY, "demo/v1"))
    assert stored["epoch"] == placed.epoch
    assert [(s["start"], s["end"]) for s in stored["stages"]] == [(0, 2), (2, 4)]
    assert int(await cluster.redis.get("modelgrid:scheduler:epoch")) >= placed.epoch

    ready = await ready_placement(cluster)
    assert ready.epoch == placed.epoch and ranges(ready) == ranges(placed)
    first, second = cluster.holder(ready, 0), cluster.holder(ready, 1)
    assert {first.worker_id, second.worker_id} == {"w1", "w2"}
    assert first.loads == [("demo", "v1", 0, 2, placed.epoch)]
    assert second.loads == [("demo", "v1", 2, 4, placed.epoch)]

    route = await cluster.route("demo", "latest")  # alias resolved through the registry
    assert (route.model, route.version, route.epoch) == ("demo", "v1", placed.epoch)  # the newest epoch
    assert [(h.start_layer, h.end_layer, h.worker_id, h.address) for h in route.hops] == [
        (0, 2, first.worker_id, first.address), (2, 4, second.worker_id, second.address)
    ]
    assert (await cluster.route("demo", "v1")).hops == route.hops

    listed = await cluster.stub.ListPlacements(common_pb2.ListPlacementsRequest(), timeout=5)
    assert [(p.model, p.version, p.state) for p in listed.placements] == [("demo", "v1", "ready")]
    workers = (await cluster.stub.ListWorkers(common_pb2.ListWorkersRequest(), timeout=5)).workers
    assert sorted(w.worker_id for w in workers) == ["w1", "w2"]
    assert all(0 <= w.heartbeat_age_s < 2 and w.total_memory == 250 for w in workers)

    for request, code, text in [
        (("nope", ""), grpc.StatusCode.NOT_FOUND, "model 'nope' not found"),
        (("demo", "v9"), grpc.StatusCode.NOT_FOUND, "has no version 'v9'"),
        (("", ""), grpc.StatusCode.INVALID_ARGUMENT, "model is required"),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await cluster.route(*request)
        assert err.value.code() == code and text in err.value.details()


async def test_route_is_unavailable_while_stages_load(make_cluster) -> None:
    cluster = await make_cluster()
    cluster.registry.deploy(version())
    w1 = await cluster.add_worker("w1", gate=asyncio.Event())
    w2 = await cluster.add_worker("w2", gate=asyncio.Event())
    await cluster.stub.Reconcile(scheduler_pb2.ReconcileRequest(), timeout=10)

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await cluster.route()
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert err.value.details() == "model 'demo' v1 is loading: 0/2 stages ready"

    w1.gate.set()

    async def one_ready():
        try:
            await cluster.route()
        except grpc.aio.AioRpcError as e:
            return e.details() == "model 'demo' v1 is loading: 1/2 stages ready"

    await eventually(one_ready, what="one stage ready")
    w2.gate.set()
    route = await eventually(cluster.route, what="route")
    assert len(route.hops) == 2


async def test_worker_without_heartbeats_is_removed_and_its_stage_replaced(make_cluster) -> None:
    cluster = await make_cluster(heartbeat_ttl_s=TTL_S)
    cluster.registry.deploy(version())
    for wid in ("w1", "w2", "w3"):
        await cluster.add_worker(wid)
    await cluster.stub.Reconcile(scheduler_pb2.ReconcileRequest(), timeout=10)
    before = await ready_placement(cluster)
    survivor, victim = cluster.holder(before, 0), cluster.holder(before, 1)
    spare = next(w for w in cluster.workers.values() if w not in (survivor, victim))

    await victim.stop_heartbeats()
    last_heartbeat = victim.last_heartbeat

    async def gone():
        workers = (await cluster.stub.ListWorkers(common_pb2.ListWorkersRequest(), timeout=5)).workers
        return victim.worker_id not in {w.worker_id for w in workers}

    await eventually(gone, what="victim removed")
    # The key lives TTL (3 intervals) after the last heartbeat; the monitor notices within a quarter interval.
    assert time.monotonic() - last_heartbeat < TTL_S + INTERVAL_S

    after = await ready_placement(cluster, newer_than=before.epoch)
    assert ranges(after) == [(0, 2, [survivor.worker_id]), (2, 4, [spare.worker_id])]
    assert spare.loads == [("demo", "v1", 2, 4, after.epoch)]
    assert survivor.loads == [("demo", "v1", 0, 2, before.epoch)]  # kept where it was, not reloaded
    route = await cluster.route()
    assert [h.worker_id for h in route.hops] == [survivor.worker_id, spare.worker_id]
    assert route.epoch == after.epoch


async def test_redis_flush_makes_workers_register_again_and_placement_is_rebuilt(make_cluster) -> None:
    cluster = await make_cluster()
    cluster.registry.deploy(version())
    for wid in ("w1", "w2"):
        await cluster.add_worker(wid)
    await cluster.stub.Reconcile(scheduler_pb2.ReconcileRequest(), timeout=10)
    before = await ready_placement(cluster)
    loads = {w.worker_id: list(w.loads) for w in cluster.workers.values()}

    await cluster.redis.flushall()

    async def re_registered():
        return all(w.registrations >= 2 for w in cluster.workers.values())

    await eventually(re_registered, what="workers re-registered after NOT_FOUND heartbeats")
    after = await ready_placement(cluster)
    assert after.epoch > before.epoch  # the epoch never goes back, even though Redis lost it
    assert ranges(after) == ranges(before)  # rebuilt where the workers already hold the stages
    assert {w.worker_id: w.loads for w in cluster.workers.values()} == loads  # adopted, not loaded again
    route = await cluster.route()
    assert len(route.hops) == 2 and route.epoch >= after.epoch


async def test_after_a_redis_reset_placement_waits_for_every_worker_to_come_back(make_cluster) -> None:
    """w2 re-registers late: placing on w1 alone (room for the whole model) would reload and unload."""
    cluster = await make_cluster()
    cluster.registry.deploy(version(), num_stages=2)
    w1, w2 = await cluster.add_worker("w1", 1000), await cluster.add_worker("w2", 1000)
    await cluster.stub.Reconcile(scheduler_pb2.ReconcileRequest(), timeout=10)
    before = await ready_placement(cluster)
    cluster.registry.deployments[0].num_stages = 0  # as few stages as fit: one, if placed from scratch
    await w2.stop_heartbeats()

    await cluster.redis.flushall()

    async def w1_back():
        return w1.registrations >= 2

    await eventually(w1_back, what="w1 re-registered")
    await cluster.stub.Reconcile(scheduler_pb2.ReconcileRequest(), timeout=10)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await cluster.placement()  # resyncing: nothing placed while w2 is away
    assert err.value.code() == grpc.StatusCode.NOT_FOUND

    await w2.restart_heartbeats()
    after = await ready_placement(cluster)
    assert ranges(after) == ranges(before) and after.epoch > before.epoch
    assert len(w1.loads) == len(w2.loads) == 1 and not w1.unloads and not w2.unloads


async def test_report_failure_removes_a_dead_worker_at_once(make_cluster) -> None:
    cluster = await make_cluster(heartbeat_ttl_s=60.0)  # only the report can remove it quickly
    cluster.registry.deploy(version())
    for wid in ("w1", "w2", "w3"):
        await cluster.add_worker(wid)
    await cluster.stub.Reconcile(scheduler_pb2.ReconcileRequest(), timeout=10)
    before = await ready_placement(cluster)
    survivor, victim = cluster.holder(before, 0), cluster.holder(before, 1)
    spare = next(w for w in cluster.workers.values() if w not in (survivor, victim))

    # A healthy worker reported by mistake stays.
    await cluster.stub.ReportFailure(
        scheduler_pb2.ReportFailureRequest(worker_id=survivor.worker_id, reason="test"), timeout=10
    )
    assert (await cluster.placement()).epoch == before.epoch

    await victim.stop()
    await cluster.stub.ReportFailure(
        scheduler_pb2.ReportFailureRequest(worker_id=victim.worker_id, reason="stream broke"), timeout=10
    )
    workers = (await cluster.stub.ListWorkers(common_pb2.ListWorkersRequest(), timeout=5)).workers
    assert victim.worker_id not in {w.worker_id for w in workers}
    after = await cluster.placement()
    assert after.epoch > before.epoch
    assert ranges(after) == [(0, 2, [survivor.worker_id]), (2, 4, [spare.worker_id])]
    await ready_placement(cluster)

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await cluster.stub.ReportFailure(scheduler_pb2.ReportFailureRequest(), timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_route_prefers_fewest_sessions_and_honours_exclusions(make_cluster) -> None:
    cluster = await make_cluster()
    cluster.registry.deploy(version(), replicas=2)
    w1, w2 = await cluster.add_worker("w1", 1000), await cluster.add_worker("w2", 1000)
    await cluster.stub.Reconcile(scheduler_pb2.ReconcileRequest(), timeout=10)
    placed = await ready_placement(cluster)
    assert ranges(placed)[0][:2] == (0, 4) and sorted(ranges(placed)[0][2]) == ["w1", "w2"]

    w1.active_sessions = 5

    async def picks_w2():
        return (await cluster.route()).hops[0].worker_id == "w2"

    await eventually(picks_w2, what="route to the idle replica")
    assert (await cluster.route(exclude=["w2"])).hops[0].worker_id == "w1"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await cluster.route(exclude=["w1", "w2"])
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "outside the excluded workers (w1, w2)" in err.value.details()


async def test_undeployed_version_is_unloaded_and_its_placement_removed(make_cluster) -> None:
    cluster = await make_cluster()
    cluster.registry.deploy(version())
    w1, w2 = await cluster.add_worker("w1"), await cluster.add_worker("w2")
    await cluster.stub.Reconcile(scheduler_pb2.ReconcileRequest(), timeout=10)
    await ready_placement(cluster)
    epoch = int(await cluster.redis.get("modelgrid:scheduler:epoch"))

    cluster.registry.deployments.clear()
    reply = await cluster.stub.Reconcile(scheduler_pb2.ReconcileRequest(), timeout=10)
    assert list(reply.placements) == []
    assert int(await cluster.redis.get("modelgrid:scheduler:epoch")) > epoch

    async def unloaded():
        return not w1.stages and not w2.stages

    await eventually(unloaded, what="stages unloaded")
    assert sorted(u[:4] for u in w1.unloads + w2.unloads) == [("demo", "v1", 0, 2), ("demo", "v1", 2, 4)]


async def test_unplaceable_and_undeployed_versions_get_clear_errors(make_cluster) -> None:
    cluster = await make_cluster()
    cluster.registry.deploy(version(layer_bytes=1000))  # 4000 bytes; workers have 250
    cluster.registry.versions.append(version("demo", "v0", aliases=()))  # registered, no alias: not deployed
    await cluster.add_worker("w1")
    await cluster.add_worker("w2")
    await cluster.stub.Reconcile(scheduler_pb2.ReconcileRequest(), timeout=10)

    placement = await cluster.placement()
    assert placement.state == "unplaceable" and not placement.stages
    assert "does not fit" in placement.message and "250 B free" in placement.message
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await cluster.route()
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "model 'demo' v1 does not fit" in err.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await cluster.route("demo", "v0")
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "model 'demo' v0 is not deployed" in err.value.details()


async def test_membership_errors(make_cluster) -> None:
    cluster = await make_cluster()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await cluster.stub.Heartbeat(scheduler_pb2.HeartbeatRequest(worker_id="ghost"), timeout=5)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "RegisterWorker" in err.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await cluster.stub.RegisterWorker(
            scheduler_pb2.RegisterWorkerRequest(worker=common_pb2.WorkerInfo(worker_id="w1")), timeout=5
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "address" in err.value.details()
    reply = await cluster.stub.RegisterWorker(
        scheduler_pb2.RegisterWorkerRequest(
            worker=common_pb2.WorkerInfo(
                worker_id="w1", address="127.0.0.1:1", total_memory=10,
                stages=[common_pb2.LoadedStage(model="m", version="v1", start_layer=0, end_layer=1, epoch=41)],
            )
        ),
        timeout=5,
    )
    assert reply.heartbeat_interval_s == INTERVAL_S
    assert reply.epoch >= 41  # never below an epoch the worker has already seen
    beat = await cluster.stub.Heartbeat(scheduler_pb2.HeartbeatRequest(worker_id="w1"), timeout=5)
    assert beat.epoch >= 41


async def test_stale_epoch_refusal_gets_a_fresh_epoch(make_cluster) -> None:
    cluster = await make_cluster()
    cluster.registry.deploy(version())
    # It has seen epoch 50 (e.g. before Redis was flushed and the scheduler restarted) and holds nothing.
    w1 = await cluster.add_worker("w1", 1000, newest_epoch=50)
    await cluster.stub.Reconcile(scheduler_pb2.ReconcileRequest(), timeout=10)
    await ready_placement(cluster)
    assert w1.loads[-1][:4] == ("demo", "v1", 0, 4) and w1.loads[-1][4] >= 50
    assert len(w1.loads) <= 8  # the epoch jumps ahead (1, 2, 4, ...), not one refusal per epoch
    assert (await cluster.route()).epoch >= w1.loads[-1][4]  # so Forward passes the worker's fence


async def test_models_share_workers_memory_and_epochs(make_cluster) -> None:
    cluster = await make_cluster()
    for name in ("a", "b", "c"):
        cluster.registry.deploy(version(name, layers=3))  # 300 bytes each
    w1, w2 = await cluster.add_worker("w1", 450), await cluster.add_worker("w2", 450)
    await cluster.stub.Reconcile(scheduler_pb2.ReconcileRequest(), timeout=10)
    a, b = await ready_placement(cluster, "a"), await ready_placement(cluster, "b")
    assert {ranges(a)[0][2][0], ranges(b)[0][2][0]} == {"w1", "w2"}  # 300 + 300 do not fit one 450-byte worker
    c = await cluster.placement("c")
    assert c.state == "unplaceable" and "150 B free" in c.message
    for model in ("a", "b"):
        route = await cluster.route(model)
        sent = [load[4] for w in (w1, w2) for load in w.loads if load[0] == model]
        assert sent and route.epoch >= max(sent)  # a route passes the Forward fence of every worker



async def test_draining_worker_hands_its_stages_over_without_losing_them(make_cluster) -> None:
    cluster = await make_cluster()
    cluster.registry.deploy(version())
    for wid in ("w1", "w2", "w3"):
        await cluster.add_worker(wid)
    await cluster.stub.Reconcile(scheduler_pb2.ReconcileRequest(), timeout=10)
    before = await ready_placement(cluster)
    survivor, draining = cluster.holder(before, 0), cluster.holder(before, 1)
    spare = next(w for w in cluster.workers.values() if w not in (survivor, draining))
    spare.gate = asyncio.Event()  # its copy loads slowly

    draining.state = "draining"  # told by its next heartbeat
    handing_over = [(0, 2, [survivor.worker_id]), (2, 4, [spare.worker_id, draining.worker_id])]

    async def replacement_loading():
        return ranges(await cluster.placement()) == handing_over and spare.loads

    await eventually(replacement_loading, what="a copy placed on the spare, the draining one kept")
    # Until the new copy is ready, the draining worker stays in routes: nothing waits for the load.
    assert [h.worker_id for h in (await cluster.route()).hops] == [survivor.worker_id, draining.worker_id]
    spare.gate.set()

    async def handed_over():
        p = await cluster.placement()
        return p if ranges(p) == [(0, 2, [survivor.worker_id]), (2, 4, [spare.worker_id])] else None

    after = await eventually(handed_over, what="the draining worker out of the placement")
    assert after.state == "ready" and after.epoch > before.epoch
    assert [h.worker_id for h in (await cluster.route()).hops] == [survivor.worker_id, spare.worker_id]
    await cluster.stub.Reconcile(scheduler_pb2.ReconcileRequest(), timeout=10)
    assert draining.unloads == [] and draining.stages  # it finishes its sessions; nobody unloads it


async def test_restarted_worker_is_told_to_load_again(make_cluster) -> None:
    cluster = await make_cluster()
    cluster.registry.deploy(version())
    w1, w2 = await cluster.add_worker("w1"), await cluster.add_worker("w2")
    await cluster.stub.Reconcile(scheduler_pb2.ReconcileRequest(), timeout=10)
    before = await ready_placement(cluster)
    loads = len(w1.loads)

    await w1.restart()
    placement = await cluster.placement()
    assert placement.epoch == before.epoch and placement.state == "loading"  # same placement, w1 not ready
    after = await ready_placement(cluster)
    assert ranges(after) == ranges(before) and len(w1.loads) == loads + 1 and w1.stages


async def test_registry_outage_keeps_placements_and_concrete_routes(make_cluster) -> None:
    cluster = await make_cluster()
    cluster.registry.deploy(version())
    w1, w2 = await cluster.add_worker("w1"), await cluster.add_worker("w2")
    await cluster.stub.Reconcile(scheduler_pb2.ReconcileRequest(), timeout=10)
    before = await ready_placement(cluster)

    cluster.registry.deployments.clear()  # would undeploy it, but the registry is about to be unreachable
    await cluster.registry_server.server.stop(0)
    reply = await cluster.stub.Reconcile(scheduler_pb2.ReconcileRequest(), timeout=10)
    assert [(p.model, p.epoch) for p in reply.placements] == [("demo", before.epoch)]
    assert len((await cluster.route("demo", "v1")).hops) == 2  # a concrete version needs no registry
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await cluster.route("demo", "latest")
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "registry at" in err.value.details()
    assert w1.unloads == [] and w2.unloads == []


def test_subprocess_starts_healthy_and_exits_cleanly_on_sigterm(redis_url: str, tmp_path) -> None:
    port = free_port()
    service = Service(
        "scheduler",
        ["--listen", f"127.0.0.1:{port}", "--metrics-port", "-1", "--redis-url", redis_url,
         "--registry", f"127.0.0.1:{free_port()}", "--reconcile-interval-s", "0.2"],
        port, tmp_path / "scheduler.log",
    ).start(timeout_s=30)
    assert service.proc is not None
    deadline = time.monotonic() + 10  # the first tick runs at start and logs the missing registry once
    while "cannot list deployments" not in service.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    service.proc.send_signal(signal.SIGTERM)
    assert service.proc.wait(15) == 0, service.log()
    service.stop()
    log = service.log()
    assert "scheduler serving on port" in log and "cannot list deployments (UNAVAILABLE: registry at" in log
    assert "Traceback" not in log
