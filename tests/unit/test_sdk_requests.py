"""Request building and reply conversion of the SDK (no network)."""

from __future__ import annotations

import pytest

from modelgrid import convert, jobs
from modelgrid.aio import AsyncClient
from modelgrid.client import Client
from modelgrid.errors import InvalidArgument
from modelgrid.v1 import common_pb2, gateway_pb2


def _request(**kwargs):
    args = dict(model="m", prompt="hi", prompt_ids=None, max_tokens=None, temperature=None, top_p=None, top_k=None,
                seed=None, stop=None, version=None)
    args.update(kwargs)
    return convert.generate_request(**args)


def test_unset_sampling_fields_stay_unset_so_the_server_defaults_apply() -> None:
    request = _request()
    assert request.text == "hi" and request.WhichOneof("prompt") == "text"
    for name in ("max_tokens", "temperature", "top_p", "top_k", "seed"):
        assert not request.HasField(name), name
    request = _request(prompt=None, prompt_ids=[5, 6], max_tokens=3, temperature=0.0, top_p=0.9, top_k=0, seed=0,
                       stop="\n", version="v2")
    assert list(request.token_ids.ids) == [5, 6]
    assert request.max_tokens == 3 and request.HasField("temperature") and request.temperature == 0.0
    assert request.HasField("top_k") and request.HasField("seed") and request.seed == 0
    assert list(request.stop) == ["\n"] and request.version == "v2"


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompt=None), "exactly one of prompt"),
    (dict(prompt_ids=[1]), "exactly one of prompt"),
    (dict(prompt=None, prompt_ids=[]), "prompt_ids is empty"),
    (dict(prompt=None, prompt_ids=[1, -2]), "non-negative"),
    (dict(seed=-1), "seed"),
    (dict(model=""), "model is required"),
])
def test_bad_requests_fail_before_the_network(kwargs, message) -> None:
    with pytest.raises(InvalidArgument, match=message):
        _request(**kwargs)


def test_generate_checks_arguments_eagerly() -> None:
    with Client("127.0.0.1:9") as client:  # never dialled
        with pytest.raises(InvalidArgument):
            client.generate("m")  # no prompt: raised at the call, not at the first next()
        with pytest.raises(InvalidArgument, match="list of strings"):
            client.embed("m", "one string")


async def test_async_generate_checks_arguments_eagerly() -> None:
    async with AsyncClient("127.0.0.1:9") as client:
        with pytest.raises(InvalidArgument):
            client.generate("m", prompt="a", prompt_ids=[1])


def test_address_from_environment(monkeypatch) -> None:
    monkeypatch.setenv("MODELGRID_GATEWAY", "gw.example:6000")
    with Client() as client:
        assert client.address == "gw.example:6000"
    with Client("other:1") as client:
        assert client.address == "other:1"
    monkeypatch.delenv("MODELGRID_GATEWAY")
    assert AsyncClient().address == "localhost:50051"


def test_chunks_collect_into_a_completion() -> None:
    builder = convert.CompletionBuilder()
    messages = [
        gateway_pb2.GenerateChunk(text="he", token_id=7, logprob=-0.5, index=0, version="v1"),
        gateway_pb2.GenerateChunk(text="", token_id=8, logprob=-0.25, index=1, version="v1"),
        gateway_pb2.GenerateChunk(text="llo", token_id=9, logprob=-1.0, index=2, version="v1", finish_reason="length",
                                  usage=gateway_pb2.Usage(prompt_tokens=2, completion_tokens=3, total_tokens=5)),
    ]
    chunks = [convert.chunk_from_proto(m) for m in messages]
    assert chunks[0].finish_reason is None and chunks[0].usage is None
    assert chunks[2].usage is not None and chunks[2].usage.total_tokens == 5
    for chunk in chunks:
        builder.add(chunk)
    done = builder.build()
    assert done.text == "hello" and done.token_ids == [7, 8, 9] and done.finish_reason == "length"
    assert done.usage.prompt_tokens == 2 and done.version == "v1" and done.logprobs == [-0.5, -0.25, -1.0]


def test_placement_and_model_conversion() -> None:
    placement = convert.placement_from_proto(common_pb2.Placement(
        model="m", version="v1", epoch=4, state="ready",
        stages=[common_pb2.PlacedStage(start_layer=0, end_layer=2, replicas=[common_pb2.Replica(
                    worker_id="w0", address="a:1", ready=True)]),
                common_pb2.PlacedStage(start_layer=2, end_layer=4, replicas=[common_pb2.Replica(
                    worker_id="w1", address="a:2", ready=False)])],
    ))
    assert [(s.first_layer, s.last_layer) for s in placement.stages] == [(0, 1), (2, 3)]
    assert not placement.ready  # stage 1 has no ready replica yet

    model = convert.model_from_proto(common_pb2.Model(
        name="m", replicas=1, aliases={"latest": "v2", "prod": "v1"},
        versions=[common_pb2.ModelVersion(model="m", version="v1", num_layers=2),
                  common_pb2.ModelVersion(model="m", version="v2", num_layers=4,
                                          files=[common_pb2.FileInfo(path="a", size=3, sha256="x")])],
    ))
    assert model.latest is not None and model.latest.version == "v2" and model.latest.total_bytes == 3
    assert model.aliases == {"latest": "v2", "prod": "v1"}


def test_inline_job_items_keep_ids_as_strings_and_a_null_id_unset() -> None:
    request = jobs.submit_request("m", "generate", items=["a", {"id": 7, "prompt": "b"}, {"id": None, "prompt": "c"}],
                                  max_tokens=4)
    items = request.items.items
    assert [i.prompt for i in items] == ["a", "b", "c"]
    assert [i.id for i in items] == ["", "7", ""]  # unset: the gateway gives the item its position (not "None")
    assert request.params.max_tokens == 4 and not request.params.HasField("temperature")
