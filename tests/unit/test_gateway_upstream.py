"""Gateway plumbing without a network: downstream error mapping, version/route caches, config checks."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from modelgrid.errors import DeadlineExceeded, InvalidArgument, NotFound, Unavailable
from modelgrid.v1 import common_pb2
from services.common.settings import parse_settings
from services.gateway import convert
from services.gateway.config import GatewayConfig
from services.gateway.domain import Hop, Route, VersionInfo
from services.gateway.upstream import RouteCache, VersionCache, downstream_error


def rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


def test_downstream_errors_keep_code_and_message() -> None:
    err = downstream_error("registry", "h:1", rpc_error(grpc.StatusCode.NOT_FOUND, "model 'x' has no version 'v3'"))
    assert isinstance(err, NotFound) and err.message == "model 'x' has no version 'v3'"
    err = downstream_error("registry", "h:1", rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "bad sha256"))
    assert isinstance(err, InvalidArgument) and err.message == "bad sha256"
    err = downstream_error("registry", "h:1", rpc_error(grpc.StatusCode.INTERNAL, "boom"))
    assert err.code == "INTERNAL" and err.message == "boom"


def test_an_unreachable_service_is_named() -> None:
    refused = rpc_error(grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses")
    err = downstream_error("scheduler", "127.0.0.1:9", refused)
    assert isinstance(err, Unavailable)
    assert err.message.startswith("scheduler at 127.0.0.1:9 is unavailable")
    # a service that answered UNAVAILABLE itself keeps its own message
    err = downstream_error("scheduler", "127.0.0.1:9", rpc_error(grpc.StatusCode.UNAVAILABLE, "m v1 is not placed yet"))
    assert isinstance(err, Unavailable) and err.message == "m v1 is not placed yet"
    err = downstream_error("worker w1", "h:2", rpc_error(grpc.StatusCode.CANCELLED, "server shutting down"))
    assert isinstance(err, Unavailable) and "worker w1 at h:2" in err.message
    late = rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, "")
    assert isinstance(downstream_error("registry", "h", late), DeadlineExceeded)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class CountingRegistry:
    def __init__(self) -> None:
        self.calls = 0

    async def resolve_version(self, model, version, timeout=None) -> VersionInfo:
        self.calls += 1
        return VersionInfo(model, f"v{self.calls}", "llama", "decoder", 10, 10)


async def test_version_cache_expires() -> None:
    clock, registry = Clock(), CountingRegistry()
    cache = VersionCache(registry, ttl_s=2.0, clock=clock)
    assert (await cache.resolve("m", "latest")).version == "v1"
    assert (await cache.resolve("m", "latest")).version == "v1"
    clock.now += 2.5
    assert (await cache.resolve("m", "latest")).version == "v2"
    assert (await cache.resolve("m", "prod")).version == "v3"  # per alias


class RouteScheduler:
    def __init__(self) -> None:
        self.epoch = 1
        self.calls: list[tuple[str, ...]] = []
        self.down: Exception | None = None

    async def get_route(self, model, version, exclude=(), timeout=None) -> Route:
        self.calls.append(tuple(exclude))
        if self.down is not None:
            raise self.down
        worker = "w2" if "w1" in exclude else "w1"
        return Route(model, version, self.epoch, (Hop(0, 4, worker, f"{worker}:1"),))


async def test_route_cache_asks_every_time_and_stands_in_while_the_scheduler_cannot_answer() -> None:
    clock, scheduler = Clock(), RouteScheduler()
    cache = RouteCache(scheduler, ttl_s=5.0, clock=clock)
    first = await cache.get("m", "v1")
    assert (await cache.get("m", "v1")) == first and len(scheduler.calls) == 2  # fresh per request
    # the scheduler restarting, or its Redis resyncing: the last route stands in
    scheduler.down = Unavailable("scheduler at s:1 is unavailable: connection refused")
    assert await cache.get("m", "v1") == first
    with pytest.raises(Unavailable):
        await cache.get("m", "v1", stand_in=False)  # a first, stricter try of the caller's
    scheduler.down = Unavailable("model 'm' v1 is not placed yet; the scheduler is placing it, retry shortly")
    assert await cache.get("m", "v1") == first
    # ... but never through an excluded worker
    with pytest.raises(Unavailable, match="not placed yet"):
        await cache.get("m", "v1", exclude=["w1"])
    # a failed route is dropped: nothing stands in any more
    cache.invalidate(first)
    with pytest.raises(Unavailable):
        await cache.get("m", "v1")
    scheduler.down = None
    scheduler.epoch = 2
    second = await cache.get("m", "v1", exclude=["w1"])
    assert second.worker_ids == ("w2",) and scheduler.calls[-1] == ("w1",)
    cache.invalidate(first)  # an older route's failure drops nothing newer
    scheduler.down = Unavailable("connection refused")
    assert await cache.get("m", "v1") == second
    clock.now += 6  # a stand-in lasts ttl_s after the route was last confirmed
    with pytest.raises(Unavailable):
        await cache.get("m", "v1")


def test_version_info_from_proto() -> None:
    pb = common_pb2.ModelVersion(
        model="m", version="v2", architecture="qwen2", kind="decoder", vocab_size=512, max_context=2048,
        config_json='{"eos_token_id": [2, 7], "hidden_size": 64}',
    )
    info = convert.version_from_proto(pb)
    assert info.eos_ids == frozenset({2, 7}) and info.hidden_size == 64 and info.label == "m v2"
    assert VersionInfo("m", "v1", "llama", "decoder", 1, 1, {"eos_token_id": 2}).eos_ids == frozenset({2})
    assert VersionInfo("m", "v1", "llama", "decoder", 1, 1, {}).eos_ids == frozenset()


def test_tensor_codec() -> None:
    mask = np.array([[1, 1, 0], [1, 0, 0]])
    t = convert.int_tensor(mask)
    assert (t.dtype, list(t.shape)) == ("int64", [2, 3])
    assert np.frombuffer(t.data, dtype="<i8").reshape(2, 3).tolist() == mask.tolist()
    values = np.array([[0.5, -1.25], [3.0, 0.0]], dtype=np.float32)
    f32 = common_pb2.Tensor(data=values.tobytes(), dtype="float32", shape=[2, 2])
    assert convert.tensor_to_numpy(f32, "e").tolist() == values.tolist()
    high_halves = (values.view(np.uint32) >> 16).astype("<u2")  # these values are exact in bfloat16
    bf16 = common_pb2.Tensor(data=high_halves.tobytes(), dtype="bfloat16", shape=[2, 2])
    assert convert.tensor_to_numpy(bf16, "e").tolist() == values.tolist()
    with pytest.raises(Unavailable, match="3 values for shape"):
        convert.tensor_to_numpy(common_pb2.Tensor(data=values.tobytes()[:12], dtype="float32", shape=[2, 2]), "e")


def test_config_flags_env_and_validation() -> None:
    config = parse_settings(GatewayConfig, ["--max-tokens-cap", "64"], environ={"MODELGRID_REGISTRY_ADDR": "reg:1"})
    assert (config.max_tokens_cap, config.registry, config.listen) == (64, "reg:1", "0.0.0.0:50051")
    for bad in (["--listen", "nowhere"], ["--max-tokens-cap", "0"], ["--default-max-tokens", "5000"],
                ["--max-request-s", "0"], ["--metrics-port", "-2"]):
        with pytest.raises(SystemExit):
            parse_settings(GatewayConfig, bad, environ={})
