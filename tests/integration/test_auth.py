"""API keys end to end, in-process on port 0: a real registry (SQLite, and PostgreSQL when configured) with a
bootstrap admin key, and gateways with auth required. No key, a wrong key, a revoked key and a user key on an
admin call are refused with the right codes; health needs no key; the database never holds a key in clear and
no log line carries one. The SDK and the CLI send the key."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator

import grpc
import pytest
import sqlalchemy
from grpc_health.v1 import health_pb2, health_pb2_grpc

import modelgrid
from modelgrid import cli
from modelgrid.channel import aio_channel
from modelgrid.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from services.gateway.app import start_gateway, stop_gateway
from services.gateway.config import GatewayConfig
from services.registry.app import start_registry
from services.registry.config import RegistryConfig
from tests.support import free_port

pytestmark = pytest.mark.timeout(120)

BOOT = "mg_bootstrap-admin-key-for-the-auth-tests"


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


@dataclass
class Platform:
    registry_port: int
    gateways: list[tuple[Any, Any]]  # (RunningServer, GatewayApp)
    channels: list[grpc.aio.Channel]

    def stub(self, i: int = 0) -> gateway_pb2_grpc.GatewayStub:
        return gateway_pb2_grpc.GatewayStub(self.channels[i])

    def address(self, i: int = 0) -> str:
        return f"127.0.0.1:{self.gateways[i][0].port}"


@asynccontextmanager
async def platform(tmp: Path, db_url: str | None = None, gateways: int = 1, **settings: Any) -> AsyncIterator[Platform]:
    """A registry with the bootstrap key BOOT and `gateways` gateways on it (their scheduler is a dead port)."""
    registry = await start_registry(RegistryConfig(
        listen="127.0.0.1:0", metrics_port=-1, data_dir=str(tmp / "data"), db_url=db_url or "",
        bootstrap_api_key=BOOT,
    ))
    plat = Platform(registry.port, [], [])
    try:
        for _ in range(gateways):
            plat.gateways.append(await start_gateway(GatewayConfig(
                listen="127.0.0.1:0", metrics_port=-1, registry=f"127.0.0.1:{registry.port}",
                scheduler=f"127.0.0.1:{free_port()}", http_port=-1, **settings,
            )))
            plat.channels.append(aio_channel(plat.address(len(plat.gateways) - 1)))
        yield plat
    finally:
        for channel in plat.channels:
            await channel.close()
        for running, app in plat.gateways:
            await stop_gateway(running, app)
        await registry.stop(0)


async def code_of(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        if hasattr(call, "__aiter__"):
            async for _ in call:
                pass
        else:
            await call
    return info.value.code(), info.value.details()


async def one_chunk() -> AsyncIterator[common_pb2.UploadVersionChunk]:
    yield common_pb2.UploadVersionChunk(header=common_pb2.UploadHeader(model="m"))


def every_call(stub: gateway_pb2_grpc.GatewayStub, metadata: tuple) -> dict[str, Any]:
    """One call of each kind (unary, server stream, client stream), user-level and admin, not yet awaited."""
    kw = dict(metadata=metadata, timeout=10)
    return {
        "ListModels": lambda: stub.ListModels(common_pb2.ListModelsRequest(), **kw),
        "GetModel": lambda: stub.GetModel(common_pb2.GetModelRequest(name="m"), **kw),
        "Generate": lambda: stub.Generate(gateway_pb2.GenerateRequest(model="m", text="hi"), **kw),
        "Embed": lambda: stub.Embed(gateway_pb2.EmbedRequest(model="m", texts=["x"]), **kw),
        "GetPlacement": lambda: stub.GetPlacement(common_pb2.GetPlacementRequest(model="m"), **kw),
        **admin_calls(stub, metadata),
    }


def admin_calls(stub: gateway_pb2_grpc.GatewayStub, metadata: tuple) -> dict[str, Any]:
    kw = dict(metadata=metadata, timeout=10)
    return {
        "RegisterModel": lambda: stub.RegisterModel(one_chunk(), **kw),
        "SetAlias": lambda: stub.SetAlias(common_pb2.SetAliasRequest(model="m", alias="prod", version="v1"), **kw),
        "SetReplicas": lambda: stub.SetReplicas(common_pb2.SetReplicasRequest(model="m", replicas=2), **kw),
        "ListWorkers": lambda: stub.ListWorkers(common_pb2.ListWorkersRequest(), **kw),
        "ListPlacements": lambda: stub.ListPlacements(common_pb2.ListPlacementsRequest(), **kw),
        "CreateKey": lambda: stub.CreateKey(common_pb2.CreateKeyRequest(name="x"), **kw),
        "ListKeys": lambda: stub.ListKeys(common_pb2.ListKeysRequest(), **kw),
        "RevokeKey": lambda: stub.RevokeKey(common_pb2.RevokeKeyRequest(key="x"), **kw),
        "GetStats": lambda: stub.GetStats(gateway_pb2.GetStatsRequest(), **kw),
    }


async def create_key(stub: gateway_pb2_grpc.GatewayStub, name: str, **fields: Any) -> common_pb2.CreateKeyResponse:
    return await stub.CreateKey(common_pb2.CreateKeyRequest(name=name, **fields), metadata=bearer(BOOT), timeout=10)


async def test_health_is_public_and_every_other_call_needs_a_valid_key(tmp_path: Path) -> None:
    async with platform(tmp_path) as plat:
        health = health_pb2_grpc.HealthStub(plat.channels[0])
        for service in ("", "modelgrid.v1.Gateway"):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stub = plat.stub()
        for metadata, message in [((), "missing API key"), (bearer("mg_not-a-key"), "unknown API key"),
                                  ((("authorization", "Basic dXNlcjpwYXNz"),), "unknown API key")]:
            for name, call in every_call(stub, metadata).items():
                code, details = await code_of(call())
                assert code == grpc.StatusCode.UNAUTHENTICATED and message in details, (name, code, details)
        assert (await stub.ListModels(common_pb2.ListModelsRequest(), metadata=bearer(BOOT))).models == []


async def test_user_keys_are_refused_on_admin_calls(tmp_path: Path) -> None:
    async with platform(tmp_path) as plat:
        stub = plat.stub()
        user = await create_key(stub, "alice", limits=common_pb2.KeyLimits(requests_per_minute=1000))
        assert user.secret.startswith("mg_") and not user.key.admin and user.key.prefix == user.secret[:10]
        assert user.key.limits.requests_per_minute == 1000
        assert (await stub.ListModels(common_pb2.ListModelsRequest(), metadata=bearer(user.secret))).models == []
        code, details = await code_of(stub.GetModel(common_pb2.GetModelRequest(name="m"), metadata=bearer(user.secret)))
        assert code == grpc.StatusCode.NOT_FOUND, details  # a user call reaches the registry
        for name, call in admin_calls(stub, bearer(user.secret)).items():
            code, details = await code_of(call())
            assert code == grpc.StatusCode.PERMISSION_DENIED, (name, code, details)
            assert f"{name} needs an admin API key; key 'alice' is not an admin key" in details
        admin = await create_key(stub, "ops", admin=True)
        listed = await stub.ListKeys(common_pb2.ListKeysRequest(), metadata=bearer(admin.secret))
        assert [(k.name, k.admin) for k in listed.keys] == [("bootstrap", True), ("alice", False), ("ops", True)]
        assert not any(s in str(listed) for s in (BOOT, user.secret, admin.secret))
        code, details = await code_of(create_key(stub, "alice"))
        assert code == grpc.StatusCode.ALREADY_EXISTS and "already exists" in details


async def test_a_revoked_key_is_refused_at_once_here_and_within_the_cache_ttl_elsewhere(tmp_path: Path) -> None:
    async with platform(tmp_path, gateways=2, auth_cache_s=1.0) as plat:
        here, there = plat.stub(0), plat.stub(1)
        user = await create_key(here, "temp")
        request, md = common_pb2.ListModelsRequest(), bearer(user.secret)
        await here.ListModels(request, metadata=md)
        await there.ListModels(request, metadata=md)  # both gateways have it cached now
        revoked = await here.RevokeKey(common_pb2.RevokeKeyRequest(key="temp"), metadata=bearer(BOOT))
        assert revoked.revoked_unix_ms > 0
        code, details = await code_of(here.ListModels(request, metadata=md))
        assert code == grpc.StatusCode.UNAUTHENTICATED and "was revoked" in details
        started = time.monotonic()
        while True:
            try:
                await there.ListModels(request, metadata=md)
            except grpc.aio.AioRpcError as err:
                assert err.code() == grpc.StatusCode.UNAUTHENTICATED
                break
            assert time.monotonic() - started < 5.0, "the revoked key still works on the other gateway"
            await asyncio.sleep(0.1)
        listed = await here.ListKeys(common_pb2.ListKeysRequest(include_revoked=True), metadata=bearer(BOOT))
        assert {k.name: bool(k.revoked_unix_ms) for k in listed.keys} == {"bootstrap": False, "temp": True}


def stored_text(db_url: str) -> str:
    """Every value in every table of the database (and, for SQLite, the raw bytes of its files)."""
    engine = sqlalchemy.create_engine(db_url)
    meta = sqlalchemy.MetaData()
    meta.reflect(engine)
    assert "api_keys" in meta.tables
    out = []
    with engine.connect() as conn:
        for table in meta.sorted_tables:
            out += [repr(tuple(row)) for row in conn.execute(table.select())]
    engine.dispose()
    url = sqlalchemy.engine.make_url(db_url)
    if url.get_backend_name() == "sqlite":
        for path in Path(url.database).parent.glob(Path(url.database).name + "*"):
            out.append(path.read_bytes().decode("latin-1"))
    return "\n".join(out)


async def test_the_database_holds_no_clear_key(tmp_path: Path, db_url: str) -> None:
    async with platform(tmp_path, db_url=db_url) as plat:
        secrets = [BOOT]
        for name, admin in (("a", False), ("b", True)):
            secrets.append((await create_key(plat.stub(), name, admin=admin)).secret)
        await plat.stub().RevokeKey(common_pb2.RevokeKeyRequest(key="a"), metadata=bearer(BOOT))
        text = await asyncio.to_thread(stored_text, db_url)
    assert "bootstrap" in text and "key_" in text  # the scan does see the keys' rows
    for secret in secrets:
        assert secret not in text and secret[12:] not in text


async def test_no_log_line_carries_a_key(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    async with platform(tmp_path) as plat:
        stub = plat.stub()
        user = await create_key(stub, "u")
        for key in (user.secret, "mg_a-wrong-key-that-must-not-be-logged", BOOT):
            for call in every_call(stub, bearer(key)).values():
                try:
                    await code_of(call())
                except (AssertionError, pytest.fail.Exception):
                    pass  # the call succeeded: fine too
        await stub.RevokeKey(common_pb2.RevokeKeyRequest(key="u"), metadata=bearer(BOOT))
        await code_of(stub.ListModels(common_pb2.ListModelsRequest(), metadata=bearer(user.secret)))
    lines = [r.getMessage() for r in caplog.records]
    assert any("refused" in line for line in lines) and any("created a user API key 'u'" in line for line in lines)
    for secret in (BOOT, user.secret, "mg_a-wrong-key-that-must-not-be-logged"):
        assert not [line for line in lines if secret in line or secret[10:] in line]


async def test_request_ids_come_back(tmp_path: Path) -> None:
    async with platform(tmp_path) as plat:
        call = plat.stub().ListModels(common_pb2.ListModelsRequest(),
                                      metadata=(*bearer(BOOT), ("x-request-id", "trace-me-123")))
        await call
        assert dict(await call.initial_metadata())["x-request-id"] == "trace-me-123"
        call = plat.stub().ListModels(common_pb2.ListModelsRequest())  # refused, and still identified
        with pytest.raises(grpc.aio.AioRpcError):
            await call
        assert len(dict(await call.initial_metadata())["x-request-id"]) == 16


async def test_the_sdk_and_the_cli_send_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    async with platform(tmp_path) as plat:
        address = plat.address()

        def sdk() -> None:
            with modelgrid.Client(address, timeout=10, api_key=BOOT) as client:
                created = client.create_key("sdk-user", requests_per_minute=7)
                assert created.key.limits.requests_per_minute == 7 and BOOT not in repr(created)
                assert created.secret not in repr(created)
            with modelgrid.Client(address, timeout=10) as client:
                with pytest.raises(modelgrid.Unauthenticated, match="missing API key"):
                    client.list_models()
            monkeypatch.setenv("MODELGRID_API_KEY", created.secret)
            with modelgrid.Client(address, timeout=10) as client:
                assert client.list_models() == []
                with pytest.raises(modelgrid.PermissionDenied):
                    client.list_keys()
            monkeypatch.delenv("MODELGRID_API_KEY")

        await asyncio.to_thread(sdk)
        async with modelgrid.AsyncClient(address, timeout=10, api_key=BOOT) as client:
            assert [k.name for k in await client.list_keys()] == ["bootstrap", "sdk-user"]

        def run(*argv: str) -> tuple[int, str, str]:
            capsys.readouterr()
            code = cli.main([*argv, "--gateway", address])
            out = capsys.readouterr()
            return code, out.out, out.err

        monkeypatch.chdir(tmp_path)  # no ./modelgrid-data/api-key here
        monkeypatch.delenv("MODELGRID_DATA_DIR", raising=False)
        code, out, err = await asyncio.to_thread(run, "keys", "list")
        assert code == 1 and "UNAUTHENTICATED" in err
        code, out, err = await asyncio.to_thread(run, "keys", "create", "--name", "ci", "--rpm", "5", "--max-streams",
                                                 "2", "--json", "--api-key", BOOT)
        assert code == 0, err
        made = json.loads(out)
        assert made["name"] == "ci" and made["limits"] == {"requests_per_minute": 5, "tokens_per_minute": 0,
                                                           "max_streams": 2}
        data = tmp_path / "elsewhere"
        data.mkdir()
        (data / "api-key").write_text(made["secret"] + "\n")
        monkeypatch.setenv("MODELGRID_DATA_DIR", str(data))  # the CLI finds the key where `modelgrid up` puts it
        code, out, err = await asyncio.to_thread(run, "models", "list", "--json")
        assert code == 0 and json.loads(out) == [], err
        code, out, err = await asyncio.to_thread(run, "keys", "list")
        assert code == 1 and "PERMISSION_DENIED" in err
        code, out, err = await asyncio.to_thread(run, "keys", "list", "--api-key", BOOT)
        assert code == 0 and "ci" in out and "sdk-user" in out and made["secret"] not in out, err
        code, out, err = await asyncio.to_thread(run, "keys", "revoke", "ci", "--api-key", BOOT)
        assert code == 0 and "revoked ci" in out, err
        code, out, err = await asyncio.to_thread(run, "models", "list")
        assert code == 1 and "UNAUTHENTICATED" in err and "revoked" in err
