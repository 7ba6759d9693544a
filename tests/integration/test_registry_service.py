"""The registry as a real gRPC server in-process (port 0) on a real SQLite file and PostgreSQL."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import struct
import time
from pathlib import Path
from typing import AsyncIterator, Iterable

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from safetensors import safe_open
from safetensors.torch import save_file

from modelgrid.channel import aio_channel
from modelgrid.model import load_spec, stage_tensor_names, write_random_checkpoint
from modelgrid.v1 import common_pb2, registry_pb2, registry_pb2_grpc
from services.registry.app import RegistryServer, start_registry
from services.registry.config import RegistryConfig
from services.registry.records import Limits
from modelgrid.upload import iter_upload_chunks, sha256_file

TINY = dict(num_layers=2, hidden_size=32, num_heads=2, vocab_size=300, max_position_embeddings=128)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    return {
        "llama": write_random_checkpoint(root / "llama", **TINY, seed=1),
        "llama2": write_random_checkpoint(root / "llama2", **TINY, seed=2),
        "sharded": write_random_checkpoint(root / "sharded", **{**TINY, "num_layers": 3}, num_kv_heads=1,
                                           shard_size_bytes=60_000, seed=3),
        "bert": write_random_checkpoint(root / "bert", "bert", **TINY, seed=4),
    }


class Harness:
    def __init__(self, server: RegistryServer, data_dir: Path) -> None:
        self.server = server
        self.data_dir = data_dir
        self.channel = aio_channel(f"127.0.0.1:{server.port}")
        self.stub = registry_pb2_grpc.RegistryStub(self.channel)

    async def upload(self, directory: Path, model: str, aliases: Iterable[str] = (), replicas: int = 0,
                     num_stages: int = 0) -> common_pb2.ModelVersion:
        return await self.stub.UploadVersion(iter_upload_chunks(directory, model, list(aliases), replicas, num_stages))

    async def fetch_tensors(self, model: str, version: str, names: list[str]) -> list[registry_pb2.TensorChunk]:
        request = registry_pb2.FetchTensorsRequest(model=model, version=version, names=names)
        return [c async for c in self.stub.FetchTensors(request)]

    async def fetch_file(self, model: str, version: str, path: str) -> bytes:
        request = registry_pb2.FetchFileRequest(model=model, version=version, path=path)
        return b"".join([c.data async for c in self.stub.FetchFile(request)])

    async def healthy(self) -> bool:
        reply = await health_pb2_grpc.HealthStub(self.channel).Check(
            health_pb2.HealthCheckRequest(service="modelgrid.v1.Registry"), timeout=5
        )
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    def leftovers(self) -> list[str]:
        """Files under artifacts/ other than the (empty) .incoming directory."""
        root = self.data_dir / "artifacts"
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.name != ".incoming")


@pytest.fixture()
async def reg(db_url: str, tmp_path: Path) -> AsyncIterator[Harness]:
    data = tmp_path / "data"
    config = RegistryConfig(listen="127.0.0.1:0", metrics_port=-1, db_url=db_url, data_dir=str(data))
    server = await start_registry(config)
    harness = Harness(server, data)
    yield harness
    await harness.channel.close()
    await server.stop(1)


async def expect_error(call, code: grpc.StatusCode, *fragments: str) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == code, info.value.details()
    for fragment in fragments:
        assert fragment in info.value.details(), info.value.details()
    return info.value.details()


# ---- registration, versions, aliases, replicas, deployments -------------------------------------


async def test_versions_aliases_replicas_deployments(reg: Harness, checkpoints: dict[str, Path]) -> None:
    v1 = await reg.upload(checkpoints["llama"], "tiny", aliases=["prod"], replicas=2, num_stages=2)
    assert (v1.model, v1.version, v1.architecture, v1.kind, v1.num_layers) == ("tiny", "v1", "llama", "decoder", 2)
    assert list(v1.aliases) == ["latest", "prod"]
    assert len(v1.layer_bytes) == 2 and all(b > 0 for b in v1.layer_bytes)
    assert v1.embed_bytes == 300 * 32 * 4 and v1.head_bytes > v1.embed_bytes  # untied head + final norm
    assert v1.kv_bytes_per_token_per_layer == 2 * 2 * 16 * 4  # k and v, 2 kv heads, head_dim 16, float32
    assert (v1.vocab_size, v1.max_context) == (300, 128)
    assert json.loads(v1.config_json)["model_type"] == "llama"
    original = {p.name: p.read_bytes() for p in checkpoints["llama"].iterdir()}
    assert {f.path: (f.size, f.sha256) for f in v1.files} == {
        name: (len(data), hashlib.sha256(data).hexdigest()) for name, data in original.items()
    }
    stored = reg.data_dir / "artifacts" / "tiny" / "v1"
    assert {p.name: p.read_bytes() for p in stored.iterdir()} == original

    v2 = await reg.upload(checkpoints["llama2"], "tiny")
    assert v2.version == "v2" and list(v2.aliases) == ["latest"]
    assert (await reg.stub.ResolveVersion(registry_pb2.ResolveVersionRequest(model="tiny"))).version == "v2"
    for ref, want in (("latest", "v2"), ("prod", "v1"), ("v1", "v1"), ("v2", "v2")):
        got = await reg.stub.ResolveVersion(registry_pb2.ResolveVersionRequest(model="tiny", version=ref))
        assert got.version == want, ref

    model = await reg.stub.GetModel(common_pb2.GetModelRequest(name="tiny"))
    assert [v.version for v in model.versions] == ["v1", "v2"]
    assert dict(model.aliases) == {"latest": "v2", "prod": "v1"}
    assert (model.replicas, model.num_stages) == (2, 2)

    deployments = (await reg.stub.ListDeployments(registry_pb2.ListDeploymentsRequest())).deployments
    assert [(d.version.version, d.replicas, d.num_stages) for d in deployments] == [("v1", 2, 2), ("v2", 2, 2)]

    moved = await reg.stub.SetAlias(common_pb2.SetAliasRequest(model="tiny", alias="prod", version="latest"))
    assert moved.version == "v2" and list(moved.aliases) == ["latest", "prod"]
    canary = await reg.stub.SetAlias(common_pb2.SetAliasRequest(model="tiny", alias="canary", version="v1"))
    assert list(canary.aliases) == ["canary"]
    scaled = await reg.stub.SetReplicas(common_pb2.SetReplicasRequest(model="tiny", replicas=3))
    assert scaled.replicas == 3 and dict(scaled.aliases) == {"canary": "v1", "latest": "v2", "prod": "v2"}
    deployments = (await reg.stub.ListDeployments(registry_pb2.ListDeploymentsRequest())).deployments
    assert [(d.version.version, sorted(d.version.aliases), d.replicas) for d in deployments] == [
        ("v1", ["canary"], 3), ("v2", ["latest", "prod"], 3)
    ]

    await reg.upload(checkpoints["bert"], "embedder", replicas=1)
    models = (await reg.stub.ListModels(common_pb2.ListModelsRequest())).models
    assert [(m.name, len(m.versions)) for m in models] == [("embedder", 1), ("tiny", 2)]
    bert = models[0].versions[0]
    assert (bert.architecture, bert.kind, bert.kv_bytes_per_token_per_layer) == ("bert", "encoder", 0)

    # v3 of tiny: latest moves, prod and canary stay
    v3 = await reg.upload(checkpoints["llama"], "tiny", replicas=0)
    assert v3.version == "v3"
    model = await reg.stub.GetModel(common_pb2.GetModelRequest(name="tiny"))
    assert dict(model.aliases) == {"canary": "v1", "latest": "v3", "prod": "v2"} and model.replicas == 3


async def test_lookup_errors_name_what_exists(reg: Harness, checkpoints: dict[str, Path]) -> None:
    await expect_error(reg.stub.GetModel(common_pb2.GetModelRequest(name="nope")), grpc.StatusCode.NOT_FOUND,
                       "model 'nope' not found; models: none")
    await reg.upload(checkpoints["llama"], "a", aliases=["prod"])
    await reg.upload(checkpoints["llama"], "b")
    await expect_error(reg.stub.GetModel(common_pb2.GetModelRequest(name="c")), grpc.StatusCode.NOT_FOUND,
                       "model 'c' not found; models: a, b")
    await expect_error(
        reg.stub.ResolveVersion(registry_pb2.ResolveVersionRequest(model="a", version="v7")),
        grpc.StatusCode.NOT_FOUND, "'v7'", "versions: v1", "aliases: latest, prod",
    )
    await expect_error(
        reg.stub.SetAlias(common_pb2.SetAliasRequest(model="a", alias="latest", version="v1")),
        grpc.StatusCode.FAILED_PRECONDITION, "'latest' is managed by the registry",
    )
    await expect_error(reg.stub.SetAlias(common_pb2.SetAliasRequest(model="a", alias="v2", version="v1")),
                       grpc.StatusCode.INVALID_ARGUMENT, "looks like a version")
    await expect_error(reg.stub.SetAlias(common_pb2.SetAliasRequest(model="a", alias="x", version="v9")),
                       grpc.StatusCode.NOT_FOUND, "versions: v1")
    await expect_error(reg.stub.SetAlias(common_pb2.SetAliasRequest(model="zz", alias="x", version="v1")),
                       grpc.StatusCode.NOT_FOUND, "model 'zz' not found")
    await expect_error(reg.stub.SetReplicas(common_pb2.SetReplicasRequest(model="a", replicas=0)),
                       grpc.StatusCode.INVALID_ARGUMENT, "replicas must be between 1")
    await expect_error(reg.stub.SetReplicas(common_pb2.SetReplicasRequest(model="zz", replicas=2)),
                       grpc.StatusCode.NOT_FOUND)


async def test_concurrent_uploads_get_distinct_versions(reg: Harness, checkpoints: dict[str, Path]) -> None:
    replies = await asyncio.gather(*(reg.upload(checkpoints["llama"], "busy") for _ in range(4)))
    assert sorted(r.version for r in replies) == ["v1", "v2", "v3", "v4"]
    model = await reg.stub.GetModel(common_pb2.GetModelRequest(name="busy"))
    assert model.aliases["latest"] == "v4"
    assert sorted(p.name for p in (reg.data_dir / "artifacts" / "busy").iterdir()) == ["v1", "v2", "v3", "v4"]


async def test_restart_keeps_versions_and_cleans_stale_uploads(
    db_url: str, tmp_path: Path, checkpoints: dict[str, Path]
) -> None:
    data = tmp_path / "data"
    config = RegistryConfig(listen="127.0.0.1:0", metrics_port=-1, db_url=db_url, data_dir=str(data))
    first = Harness(await start_registry(config), data)
    await first.upload(checkpoints["llama"], "tiny", aliases=["prod"])
    await first.channel.close()
    await first.server.stop(1)

    stale = data / "artifacts" / ".incoming" / "upload-crashed"
    stale.mkdir()
    (stale / "config.json").write_text("{}")
    os.utime(stale, (time.time() - 2 * 86400, time.time() - 2 * 86400))
    fresh = data / "artifacts" / ".incoming" / "upload-in-flight-elsewhere"
    fresh.mkdir()

    second = Harness(await start_registry(config), data)
    try:
        model = await second.stub.GetModel(common_pb2.GetModelRequest(name="tiny"))
        assert dict(model.aliases) == {"latest": "v1", "prod": "v1"}
        config_json = await second.fetch_file("tiny", "v1", "config.json")
        assert config_json == (checkpoints["llama"] / "config.json").read_bytes()
        assert not stale.exists() and fresh.exists()
    finally:
        await second.channel.close()
        await second.server.stop(1)


# ---- tensors and files --------------------------------------------------------------------------


def reassemble(chunks: list[registry_pb2.TensorChunk]) -> dict[str, tuple[bytes, registry_pb2.TensorChunk]]:
    """name -> (bytes, last chunk); checks offsets are contiguous and only the last chunk has sha256."""
    out: dict[str, tuple[bytearray, registry_pb2.TensorChunk]] = {}
    for c in chunks:
        data, last = out.get(c.name, (bytearray(), None))
        assert last is None or not last.sha256, f"{c.name}: chunk after the one carrying sha256"
        assert c.offset == len(data)
        data += c.data
        out[c.name] = (data, c)
    return {name: (bytes(data), last) for name, (data, last) in out.items()}


def original_bytes(directory: Path, name: str) -> bytes:
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            if name in f.keys():
                return f.get_tensor(name).contiguous().view(torch.uint8).numpy().tobytes()
    raise KeyError(name)


async def test_fetch_tensors_exactly_those_asked(reg: Harness, checkpoints: dict[str, Path]) -> None:
    source = checkpoints["sharded"]
    assert len(list(source.glob("*.safetensors"))) > 1
    await reg.upload(source, "shards")
    spec = load_spec(source)
    reg.server.registry.chunk_bytes = 1000  # several chunks per tensor
    for start, end in ((0, 1), (1, 2), (2, 3), (0, 3)):
        names = stage_tensor_names(spec, start, end)
        chunks = await reg.fetch_tensors("shards", "v1", names)
        got = reassemble(chunks)
        assert list(got) == names  # exactly those, in the order asked
        for name, (data, last) in got.items():
            assert data == original_bytes(source, name), name
            assert last.sha256 == hashlib.sha256(data).hexdigest()
            assert last.total_bytes == len(data) and last.dtype == "float32"
        assert all(len(c.data) <= 1000 for c in chunks)
        assert any(len(c.data) == 1000 for c in chunks)

    one = "model.layers.1.self_attn.k_proj.weight"
    got = reassemble(await reg.fetch_tensors("shards", "v1", [one, one]))
    assert list(got) == [one] and list(got[one][1].shape) == [16, 32]  # 1 kv head x head_dim 16

    await expect_error(reg.fetch_tensors("shards", "v1", [one, "model.layers.9.mlp.up_proj.weight"]),
                       grpc.StatusCode.NOT_FOUND, "model.layers.9.mlp.up_proj.weight")
    await expect_error(reg.fetch_tensors("shards", "v2", [one]), grpc.StatusCode.NOT_FOUND, "versions: v1")
    await expect_error(reg.fetch_tensors("shards", "latest", [one]), grpc.StatusCode.INVALID_ARGUMENT, "alias")
    await expect_error(reg.fetch_tensors("shards", "", [one]), grpc.StatusCode.INVALID_ARGUMENT, "by version")
    await expect_error(reg.fetch_tensors("nope", "v1", [one]), grpc.StatusCode.NOT_FOUND, "model 'nope'")
    await expect_error(reg.fetch_tensors("shards", "v1", []), grpc.StatusCode.INVALID_ARGUMENT)


async def test_fetch_file(reg: Harness, checkpoints: dict[str, Path]) -> None:
    source = checkpoints["sharded"]
    await reg.upload(source, "shards")
    reg.server.registry.chunk_bytes = 1000
    for name in ("tokenizer.json", "config.json", "tokenizer_config.json", "model.safetensors.index.json"):
        assert await reg.fetch_file("shards", "v1", name) == (source / name).read_bytes(), name
    shard = sorted(source.glob("*.safetensors"))[0].name
    await expect_error(reg.fetch_file("shards", "v1", shard), grpc.StatusCode.INVALID_ARGUMENT, "FetchTensors")
    await expect_error(reg.fetch_file("shards", "v1", "../../registry.db"), grpc.StatusCode.INVALID_ARGUMENT)
    await expect_error(reg.fetch_file("shards", "v1", "vocab.txt"), grpc.StatusCode.NOT_FOUND, "tokenizer.json")
    await expect_error(reg.fetch_file("shards", "v9", "config.json"), grpc.StatusCode.NOT_FOUND)
    await expect_error(reg.fetch_file("shards", "", "config.json"), grpc.StatusCode.INVALID_ARGUMENT)

    # artifacts lost from the registry's disk: the operator's problem, said so, not INTERNAL
    stored = reg.data_dir / "artifacts" / "shards" / "v1"
    (stored / "tokenizer.json").unlink()
    (stored / shard).unlink()
    await expect_error(reg.fetch_file("shards", "v1", "tokenizer.json"), grpc.StatusCode.FAILED_PRECONDITION,
                       "shards/v1/tokenizer.json is missing")
    with safe_open(source / shard, framework="pt") as f:
        lost = sorted(f.keys())[0]
    await expect_error(reg.fetch_tensors("shards", "v1", [lost]), grpc.StatusCode.FAILED_PRECONDITION, "missing")
    assert await reg.healthy()


# ---- bad uploads: refused, nothing left behind, server fine -------------------------------------


def raw_upload(directory: Path, model: str, names: list[str] | None = None,
               **header: object) -> list[common_pb2.UploadVersionChunk]:
    """Header + chunks for exactly these files (no client-side checks), for crafting bad uploads."""
    names = names or sorted(p.name for p in directory.iterdir())
    infos = [common_pb2.FileInfo(path=n, size=(directory / n).stat().st_size, sha256=sha256_file(directory / n))
             for n in names]
    messages = [common_pb2.UploadVersionChunk(header=common_pb2.UploadHeader(model=model, files=infos, **header))]
    for n in names:
        messages.append(common_pb2.UploadVersionChunk(
            chunk=common_pb2.FileChunk(path=n, offset=0, data=(directory / n).read_bytes())))
    return messages


def copy(source: Path, dest: Path) -> Path:
    shutil.copytree(source, dest)
    return dest


def tampered_checkpoints(source: Path, root: Path) -> dict[str, Path]:
    """Broken variants of a good checkpoint."""
    out = {}
    weights = load_safetensors(source / "model.safetensors")

    d = out["missing_tensor"] = copy(source, root / "missing_tensor")
    save_file({k: v for k, v in weights.items() if k != "model.layers.1.mlp.down_proj.weight"},
              d / "model.safetensors")
    d = out["wrong_shape"] = copy(source, root / "wrong_shape")
    save_file({**weights, "model.layers.0.mlp.up_proj.weight": torch.zeros(7, 32)}, d / "model.safetensors")
    d = out["unsupported_arch"] = copy(source, root / "unsupported_arch")
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    d = out["bad_config_json"] = copy(source, root / "bad_config_json")
    (d / "config.json").write_text("{not json")
    d = out["silly_config"] = copy(source, root / "silly_config")
    (d / "config.json").write_text(json.dumps({**config, "num_hidden_layers": -3}))
    d = out["no_tokenizer"] = copy(source, root / "no_tokenizer")
    (d / "tokenizer.json").unlink()
    d = out["bad_tokenizer"] = copy(source, root / "bad_tokenizer")
    (d / "tokenizer.json").write_text('{"model": 42}')
    d = out["garbage_safetensors"] = copy(source, root / "garbage_safetensors")
    (d / "model.safetensors").write_bytes(struct.pack("<Q", 20) + b'{"a": {"dtype": 3}} ' + b"\0" * 64)
    d = out["pickled_only"] = copy(source, root / "pickled_only")
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    return out


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(path, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


async def test_bad_uploads_leave_nothing(reg: Harness, checkpoints: dict[str, Path], tmp_path: Path) -> None:
    good = checkpoints["llama"]
    bad = tampered_checkpoints(good, tmp_path)
    invalid = grpc.StatusCode.INVALID_ARGUMENT

    wrong_sha = raw_upload(good, "m")
    wrong_sha[0].header.files[0].sha256 = "0" * 64
    short = raw_upload(good, "m")
    short[-1].chunk.data = short[-1].chunk.data[:-1]
    long = raw_upload(good, "m")
    long[-1].chunk.data += b"x"
    gap = raw_upload(good, "m")
    gap[-1].chunk.offset = 5
    stranger = raw_upload(good, "m")
    stranger.append(common_pb2.UploadVersionChunk(chunk=common_pb2.FileChunk(path="other.json", data=b"{}")))
    header_twice = raw_upload(good, "m")
    header_twice.append(header_twice[0])
    dot_path = raw_upload(good, "m")
    dot_path[0].header.files[0].path = "../config.json"
    sub_path = raw_upload(good, "m")
    sub_path[0].header.files[0].path = "sub/config.json"

    cases: list[tuple[str, list[common_pb2.UploadVersionChunk], grpc.StatusCode, str]] = [
        ("dotdot name", raw_upload(good, "../evil"), invalid, "invalid model name"),
        ("dots in name", raw_upload(good, "a..b"), invalid, "invalid model name"),
        ("upper-case name", raw_upload(good, "Tiny"), invalid, "invalid model name"),
        ("path with ..", dot_path, invalid, "invalid file path"),
        ("path with /", sub_path, invalid, "invalid file path"),
        ("bad alias", raw_upload(good, "m", aliases=["Prod!"]), invalid, "invalid alias"),
        ("pickled only", raw_upload(bad["pickled_only"], "m"), invalid, "pickled weights are refused"),
        ("sha256 mismatch", wrong_sha, invalid, "sha256 mismatch"),
        ("short file", short, invalid, "incomplete"),
        ("long file", long, invalid, "longer than"),
        ("chunk gap", gap, invalid, "expected 0"),
        ("unknown file chunk", stranger, invalid, "does not list"),
        ("second header", header_twice, invalid, "second header"),
        ("chunk first", raw_upload(good, "m")[1:], invalid, "must be its header"),
        ("empty stream", [], invalid, "empty upload"),
        ("missing tensor", raw_upload(bad["missing_tensor"], "m"), invalid, "model.layers.1.mlp.down_proj.weight"),
        ("wrong shape", raw_upload(bad["wrong_shape"], "m"), invalid, "model.layers.0.mlp.up_proj.weight"),
        ("unsupported architecture", raw_upload(bad["unsupported_arch"], "m"), invalid, "unsupported architecture"),
        ("config not json", raw_upload(bad["bad_config_json"], "m"), invalid, "config.json is not valid JSON"),
        ("silly config", raw_upload(bad["silly_config"], "m"), invalid, "config.json"),
        ("no tokenizer", raw_upload(bad["no_tokenizer"], "m"), invalid, "tokenizer.json"),
        ("bad tokenizer", raw_upload(bad["bad_tokenizer"], "m"), invalid, "tokenizer.json does not load"),
        ("garbage safetensors", raw_upload(bad["garbage_safetensors"], "m"), invalid, "model.safetensors"),
        ("too many stages", raw_upload(good, "m", num_stages=3), invalid, "only 2 layers"),
        ("negative replicas", raw_upload(good, "m", replicas=-1), invalid, "replicas"),
    ]
    for label, messages, code, fragment in cases:
        await expect_error(reg.stub.UploadVersion(iter(messages)), code, fragment)
        assert reg.leftovers() == [], label
        assert list((reg.data_dir / "artifacts" / ".incoming").iterdir()) == [], label
        assert not (await reg.stub.ListModels(common_pb2.ListModelsRequest())).models, label

    reg.server.registry.limits = Limits(max_bytes=1000, max_files=256)
    await expect_error(reg.upload(good, "m"), grpc.StatusCode.RESOURCE_EXHAUSTED, "--max-upload-bytes")
    reg.server.registry.limits = Limits(max_bytes=1 << 40, max_files=2)
    await expect_error(reg.upload(good, "m"), grpc.StatusCode.RESOURCE_EXHAUSTED, "--max-upload-files")
    reg.server.registry.limits = Limits(max_bytes=1 << 40, max_files=256)

    assert await reg.healthy()
    first = await reg.upload(good, "m")
    assert first.version == "v1"  # failed attempts used no version number
    # a failure on an existing model leaves its versions alone
    await expect_error(reg.stub.UploadVersion(iter(raw_upload(bad["missing_tensor"], "m"))), invalid)
    model = await reg.stub.GetModel(common_pb2.GetModelRequest(name="m"))
    assert [v.version for v in model.versions] == ["v1"] and reg.leftovers() == ["m", "m/v1"] + sorted(
        f"m/v1/{p.name}" for p in good.iterdir())


async def test_cancelled_upload_leaves_nothing(reg: Harness, checkpoints: dict[str, Path]) -> None:
    messages = raw_upload(checkpoints["llama"], "m")
    sent = asyncio.Event()

    async def stalled() -> AsyncIterator[common_pb2.UploadVersionChunk]:
        yield messages[0]
        yield messages[1]
        sent.set()
        await asyncio.Event().wait()  # never finishes

    call = reg.stub.UploadVersion(stalled())
    await sent.wait()
    incoming = reg.data_dir / "artifacts" / ".incoming"
    for _ in range(200):  # the server has made its upload directory
        if list(incoming.iterdir()):
            break
        await asyncio.sleep(0.01)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    for _ in range(500):
        if not list(incoming.iterdir()):
            break
        await asyncio.sleep(0.01)
    assert list(incoming.iterdir()) == [] and reg.leftovers() == []
    assert await reg.healthy()


async def test_a_refused_upload_is_answered_with_its_status_once_the_client_has_sent_everything(reg: Harness) -> None:
    """The registry refuses the header at once; services.common.rpc then reads the rest of the upload before the
    call answers (as for every failed client-streaming call: so that
    an asyncio client, like the gateway's proxy, gets the status rather than grpc.aio's INTERNAL "Internal
    error from Core" for a write after the call ended: grpc/grpc#36066, a race this test cannot force). Here:
    the refusal still comes with its status and message, promptly (20 uploads, not 20 drain timeouts)."""
    started = asyncio.get_running_loop().time()
    header = common_pb2.UploadHeader(model="../evil", files=[
        common_pb2.FileInfo(path="model.safetensors", size=64 * 65536, sha256="0" * 64)])
    chunks = [common_pb2.UploadVersionChunk(header=header)] + [
        common_pb2.UploadVersionChunk(chunk=common_pb2.FileChunk(path="model.safetensors", offset=i * 65536,
                                                                  data=bytes(65536))) for i in range(64)]
    for _ in range(20):
        await expect_error(reg.stub.UploadVersion(iter(chunks)), grpc.StatusCode.INVALID_ARGUMENT, "../evil")
    assert await reg.healthy() and reg.leftovers() == []
    assert asyncio.get_running_loop().time() - started < 20
