"""Client, AsyncClient and the CLI against a real gRPC server speaking the Gateway contract.

The server is a small scripted Gateway (the real one needs the whole platform; tests/e2e runs that):
it checks what the SDK sends on the wire (requests, upload bytes) and what it makes of the replies
and of error statuses.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import defaultdict
from concurrent import futures
from pathlib import Path
from typing import Iterator

import grpc
import pytest

import modelgrid
from modelgrid import cli
from modelgrid.channel import SERVER_OPTIONS
from modelgrid.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc


class ScriptedGateway(gateway_pb2_grpc.GatewayServicer):
    def __init__(self) -> None:
        self.requests: list[gateway_pb2.GenerateRequest] = []
        self.uploads: list[tuple[common_pb2.UploadHeader, dict[str, bytes]]] = []

    def Generate(self, request, context) -> Iterator[gateway_pb2.GenerateChunk]:
        self.requests.append(request)
        if request.model != "demo":
            context.abort(grpc.StatusCode.NOT_FOUND, f"model {request.model!r} not found; models: demo")
        n = request.max_tokens if request.HasField("max_tokens") else 16
        prompt = len(request.token_ids.ids) if request.WhichOneof("prompt") == "token_ids" else len(request.text)
        for i in range(n):
            last = i == n - 1
            yield gateway_pb2.GenerateChunk(
                text=f"t{i} ", token_id=100 + i, logprob=-0.5, index=i, version="v1",
                finish_reason="length" if last else "",
                usage=gateway_pb2.Usage(prompt_tokens=prompt, completion_tokens=n, total_tokens=prompt + n)
                if last else None,
            )

    def Embed(self, request, context):
        if not request.texts:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "texts is empty")
        return gateway_pb2.EmbedResponse(
            embeddings=[gateway_pb2.Embedding(values=[float(len(t)), 1.0]) for t in request.texts], version="v1"
        )

    def _model(self) -> common_pb2.Model:
        return common_pb2.Model(
            name="demo", replicas=1, num_stages=2, aliases={"latest": "v1"},
            versions=[common_pb2.ModelVersion(model="demo", version="v1", architecture="llama", kind="decoder",
                                              num_layers=4, aliases=["latest"])],
        )

    def ListModels(self, request, context):
        return common_pb2.ListModelsResponse(models=[self._model()])

    def GetModel(self, request, context):
        if request.name != "demo":
            context.abort(grpc.StatusCode.NOT_FOUND, f"model {request.name!r} not found; models: demo")
        return self._model()

    def RegisterModel(self, request_iterator, context):
        messages = list(request_iterator)
        header = messages[0].header
        files: dict[str, bytearray] = defaultdict(bytearray)
        for m in messages[1:]:
            assert m.chunk.offset == len(files[m.chunk.path])
            files[m.chunk.path] += m.chunk.data
        for f in header.files:
            if hashlib.sha256(files[f.path]).hexdigest() != f.sha256:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"file {f.path!r}: sha256 mismatch")
        self.uploads.append((header, {k: bytes(v) for k, v in files.items()}))
        return common_pb2.ModelVersion(model=header.model, version="v2", architecture="llama", kind="decoder",
                                       num_layers=4, files=header.files, aliases=["latest", *header.aliases])

    def SetAlias(self, request, context):
        return common_pb2.ModelVersion(model=request.model, version=request.version, aliases=[request.alias])

    def SetReplicas(self, request, context):
        if request.replicas > 2:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "only 2 workers: at most 2 replicas")
        model = self._model()
        model.replicas = request.replicas
        return model

    def ListWorkers(self, request, context):
        return common_pb2.ListWorkersResponse(workers=[
            common_pb2.WorkerInfo(worker_id=f"w{i}", address=f"127.0.0.1:{7000 + i}", device="cpu",
                                  total_memory=2**30, free_memory=2**29, state="serving",
                                  stages=[common_pb2.LoadedStage(model="demo", version="v1", start_layer=2 * i,
                                                                 end_layer=2 * i + 2, epoch=3)])
            for i in range(2)
        ])

    def GetPlacement(self, request, context):
        return common_pb2.Placement(model=request.model, version="v1", epoch=3, state="ready", stages=[
            common_pb2.PlacedStage(start_layer=2 * i, end_layer=2 * i + 2,
                                   replicas=[common_pb2.Replica(worker_id=f"w{i}", address=f"127.0.0.1:{7000 + i}",
                                                                ready=True)])
            for i in range(2)
        ])


@pytest.fixture()
def gateway() -> Iterator[tuple[ScriptedGateway, str]]:
    servicer = ScriptedGateway()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=SERVER_OPTIONS)
    gateway_pb2_grpc.add_GatewayServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(None)


def test_generate_streams_and_collects(gateway) -> None:
    servicer, address = gateway
    with modelgrid.Client(address, timeout=10) as client:
        chunks = list(client.generate("demo", prompt="hello", max_tokens=3, temperature=0.0, stop=["\n"]))
        assert [c.token_id for c in chunks] == [100, 101, 102]
        assert chunks[-1].finish_reason == "length" and chunks[0].finish_reason is None
        done = client.generate_text("demo", prompt_ids=[1, 2], max_tokens=2)
    assert done.token_ids == [100, 101] and done.text == "t0 t1 " and done.usage.total_tokens == 4
    first, second = servicer.requests
    assert first.HasField("temperature") and first.temperature == 0.0 and list(first.stop) == ["\n"]
    assert not second.HasField("temperature") and list(second.token_ids.ids) == [1, 2]


def test_errors_carry_the_code_and_the_server_message(gateway) -> None:
    _, address = gateway
    with modelgrid.Client(address, timeout=10) as client:
        with pytest.raises(modelgrid.NotFound, match="model 'nope' not found; models: demo"):
            list(client.generate("nope", prompt="x"))
        with pytest.raises(modelgrid.NotFound):
            client.get_model("nope")
        with pytest.raises(modelgrid.ResourceExhausted, match="at most 2 replicas"):
            client.set_replicas("demo", 3)


def test_unreachable_gateway_is_unavailable_with_a_hint() -> None:
    with modelgrid.Client("127.0.0.1:1", timeout=5) as client:
        with pytest.raises(modelgrid.Unavailable, match="modelgrid up"):
            client.list_models()


def test_admin_calls(gateway, tmp_path: Path) -> None:
    servicer, address = gateway
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    weights = os.urandom(3 * 1024 * 1024 + 17)
    (tmp_path / "model.safetensors").write_bytes(weights)
    progress = []
    with modelgrid.Client(address, timeout=10) as client:
        version = client.register(tmp_path, "demo", aliases=["prod"], stages=2,
                                  progress=lambda sent, total: progress.append((sent, total)))
        assert version.version == "v2" and version.aliases == ["latest", "prod"]
        header, files = servicer.uploads[0]
        assert header.num_stages == 2 and files["model.safetensors"] == weights
        assert progress[-1][0] == progress[-1][1] == len(weights) + len('{"model_type": "llama"}')

        [model] = client.list_models()
        assert model.name == "demo" and model.latest is not None and model.latest.num_layers == 4
        assert client.set_alias("demo", "prod", "v1").version == "v1"
        assert client.set_replicas("demo", 2).replicas == 2
        workers = client.workers()
        assert [w.worker_id for w in workers] == ["w0", "w1"] and workers[1].stages[0].start_layer == 2
        placement = client.placement("demo")
        assert placement.ready and [(s.first_layer, s.last_layer) for s in placement.stages] == [(0, 1), (2, 3)]
        assert client.embed("demo", ["ab", "abc"]) == [[2.0, 1.0], [3.0, 1.0]]


async def test_async_client(gateway, tmp_path: Path) -> None:
    servicer, address = gateway
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"w" * 1000)
    async with modelgrid.AsyncClient(address, timeout=10) as client:
        chunks = [c async for c in client.generate("demo", prompt="hi", max_tokens=4)]
        assert [c.index for c in chunks] == [0, 1, 2, 3]
        done = await client.generate_text("demo", prompt="hi", max_tokens=2)
        assert done.finish_reason == "length" and done.token_ids == [100, 101]
        with pytest.raises(modelgrid.NotFound, match="not found; models: demo"):
            await client.generate_text("nope", prompt="hi")
        version = await client.register(tmp_path, "demo")
        assert version.version == "v2" and servicer.uploads[-1][1]["model.safetensors"] == b"w" * 1000
        assert [m.name for m in await client.list_models()] == ["demo"]
        assert (await client.placement("demo")).epoch == 3
        assert len(await client.workers()) == 2
        assert await client.embed("demo", ["x"]) == [[1.0, 1.0]]


def test_cli_against_the_gateway(gateway, tmp_path: Path, capsys) -> None:
    _, address = gateway
    gw = ["--gateway", address]

    assert cli.main(["generate", "--model", "demo", "--prompt", "hello", "--max-tokens", "3", "--json", *gw]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["token_ids"] == [100, 101, 102] and out["text"] == "t0 t1 t2 " and out["finish_reason"] == "length"
    assert out["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}

    assert cli.main(["generate", "--model", "demo", "--prompt-ids", "1,2", "--max-tokens", "2", *gw]) == 0
    assert capsys.readouterr().out == "t0 t1 \n"

    assert cli.main(["generate", "--model", "nope", "--prompt", "x", *gw]) == 1
    assert "error: NOT_FOUND: model 'nope' not found; models: demo" in capsys.readouterr().err

    assert cli.main(["placement", "demo", "--json", *gw]) == 0
    stages = json.loads(capsys.readouterr().out)["stages"]
    assert [(s["first_layer"], s["last_layer"], s["worker_id"]) for s in stages] == [(0, 1, "w0"), (2, 3, "w1")]
    assert cli.main(["placement", "demo", *gw]) == 0
    assert "w1" in capsys.readouterr().out

    assert cli.main(["workers", "--json", *gw]) == 0
    assert [w["worker_id"] for w in json.loads(capsys.readouterr().out)] == ["w0", "w1"]
    assert cli.main(["workers", *gw]) == 0
    assert "127.0.0.1:7001" in capsys.readouterr().out

    assert cli.main(["models", "list", "--json", *gw]) == 0
    assert json.loads(capsys.readouterr().out)[0]["name"] == "demo"
    assert cli.main(["models", "list", *gw]) == 0
    assert "demo" in capsys.readouterr().out
    assert cli.main(["models", "alias", "demo", "prod", "v1", *gw]) == 0
    assert "prod -> v1" in capsys.readouterr().out
    assert cli.main(["models", "replicas", "demo", "5", *gw]) == 1
    assert "error: RESOURCE_EXHAUSTED: only 2 workers" in capsys.readouterr().err

    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"w" * 10)
    assert cli.main(["models", "register", str(tmp_path), "--name", "demo", "--alias", "prod", *gw]) == 0
    assert "registered demo v2" in capsys.readouterr().out
    (tmp_path / "model.safetensors").unlink()
    assert cli.main(["models", "register", str(tmp_path), "--name", "demo", *gw]) == 1
    assert "error: INVALID_ARGUMENT:" in capsys.readouterr().err

    assert cli.main(["embed", "--model", "demo", "ab", "--json", *gw]) == 0
    assert json.loads(capsys.readouterr().out)["embeddings"] == [[2.0, 1.0]]


def test_cli_reads_the_gateway_from_the_environment(gateway, monkeypatch, capsys) -> None:
    _, address = gateway
    monkeypatch.setenv("MODELGRID_GATEWAY", address)
    assert cli.main(["workers", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 2
    monkeypatch.setenv("MODELGRID_GATEWAY", "127.0.0.1:1")
    assert cli.main(["workers", "--timeout", "5"]) == 1
    assert "error: UNAVAILABLE: cannot reach the ModelGrid gateway at 127.0.0.1:1" in capsys.readouterr().err
