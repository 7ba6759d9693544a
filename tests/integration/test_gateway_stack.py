"""The gateway over the REAL stack, all in-process on port 0: registry (SQLite), scheduler (real Redis),
three CPU workers, the gateway. A random Llama checkpoint (4 layers, hidden 64, vocab 512) and a random
BERT are registered through Gateway.RegisterModel with num_stages 2, placed by the scheduler on two
workers each, and served through the gateway. Outputs are compared with transformers.

The third worker is a spare: the last test kills a worker in the middle of a stream and checks that the
gateway re-routes, replays and still returns exactly the greedy tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator

import grpc
import numpy as np
import pytest
import pytest_asyncio
import torch

from modelgrid.model import write_random_checkpoint
from modelgrid.upload import iter_upload_chunks, plan_upload
from modelgrid.v1 import common_pb2, gateway_pb2
from services.worker.app import stop_worker
from tests.stack import Stack, decisive_llama, generate, hf_greedy, running_stack, upload

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(300)]

LLM, BERT = "tiny-llama", "tiny-bert"
PROMPT = [1, 17, 250, 3, 99, 42, 7]
GREEDY_TOKENS = 32
TEXT = "The river ran past the mill"


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return decisive_llama(tmp_path_factory.mktemp("llama"), seed=5)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_checkpoint(tmp_path_factory.mktemp("bert"), "bert", num_layers=2, hidden_size=32,
                                   num_heads=4, vocab_size=300, max_position_embeddings=64, seed=2)


@dataclass
class References:
    """Everything computed with transformers, before the stack starts: the in-process services share one
    event loop, and blocking it for long would make the scheduler drop the workers' heartbeats."""

    greedy: list[int]  # greedy continuation of PROMPT
    text_ids: list[int]  # AutoTokenizer(TEXT)
    text_greedy: list[int]  # greedy continuation of text_ids (8 tokens)
    text_decoded: str  # tokenizer.decode(greedy)
    embed_texts: list[str]
    embeddings: np.ndarray  # mean-pooled, L2-normalised BertModel states, one text at a time (no padding)
    embed_tokens: int


@pytest.fixture(scope="module")
def refs(llama_dir: Path, bert_dir: Path) -> References:
    from transformers import AutoModel, AutoTokenizer

    greedy = hf_greedy(llama_dir, PROMPT, GREEDY_TOKENS)
    tok = AutoTokenizer.from_pretrained(llama_dir)
    text_ids = tok(TEXT)["input_ids"]
    texts = ["short", "a somewhat longer sentence about rivers and mills", "café 日本"]
    bert_tok = AutoTokenizer.from_pretrained(bert_dir)
    bert = AutoModel.from_pretrained(bert_dir, dtype=torch.float32).eval()
    vectors, n_tokens = [], 0
    for text in texts:
        ids = bert_tok(text, return_tensors="pt")
        n_tokens += ids["input_ids"].shape[1]
        with torch.no_grad():
            hidden = bert(**ids).last_hidden_state[0]
        vectors.append(torch.nn.functional.normalize(hidden.mean(0), dim=0).numpy())
    return References(
        greedy=greedy, text_ids=text_ids, text_greedy=hf_greedy(llama_dir, text_ids, 8),
        text_decoded=tok.decode(greedy, skip_special_tokens=True), embed_texts=texts,
        embeddings=np.stack(vectors), embed_tokens=n_tokens,
    )


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(
    tmp_path_factory: pytest.TempPathFactory, redis_server, llama_dir: Path, bert_dir: Path, refs: References
) -> AsyncIterator[Stack]:
    import redis

    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    async with running_stack(tmp_path_factory.mktemp("stack"), redis_server.url, {LLM: llama_dir, BERT: bert_dir},
                             workers=3) as stack:
        for model in (LLM, BERT):
            assert (stack.versions[model].model, stack.versions[model].version) == (model, "v1")
        yield stack


async def test_registered_models_are_placed_over_two_workers(stack: Stack) -> None:
    for model in (LLM, BERT):
        hops = await stack.placed(model)
        assert len(hops) == 2 and len(set(hops)) == 2
    placement = await stack.gateway.GetPlacement(common_pb2.GetPlacementRequest(model=LLM))
    assert placement.state == "ready" and [(s.start_layer, s.end_layer) for s in placement.stages] == [(0, 2), (2, 4)]


async def test_greedy_generation_matches_transformers(stack: Stack, refs: References) -> None:
    await stack.placed(LLM)
    chunks = await generate(stack, model=LLM, token_ids=common_pb2.TokenIds(ids=PROMPT),
                            max_tokens=GREEDY_TOKENS, temperature=0.0)
    assert [c.token_id for c in chunks] == refs.greedy
    assert [c.index for c in chunks] == list(range(len(chunks)))
    last = chunks[-1]
    assert last.finish_reason == ("stop" if refs.greedy[-1] == 2 else "length")
    assert all(c.finish_reason == "" for c in chunks[:-1])
    assert (last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.total_tokens) == (
        len(PROMPT), len(refs.greedy), len(PROMPT) + len(refs.greedy))
    assert all(c.version == "v1" and c.logprob <= 0 and math.isfinite(c.logprob) for c in chunks)
    assert "".join(c.text for c in chunks) == refs.text_decoded
    assert await stack.active_sessions() == {w: 0 for w in stack.running_workers}  # closed before the stream ended


async def test_text_prompt_uses_the_models_tokenizer(stack: Stack, refs: References) -> None:
    assert refs.text_ids[0] == 1  # the checkpoint's template adds <s>
    chunks = await generate(stack, model=LLM, version="latest", text=TEXT, max_tokens=8, temperature=0.0)
    assert [c.token_id for c in chunks] == refs.text_greedy
    assert chunks[-1].usage.prompt_tokens == len(refs.text_ids)


async def test_seeded_sampling_is_reproducible_and_stop_sequences_cut(stack: Stack) -> None:
    fields = dict(model=LLM, token_ids=common_pb2.TokenIds(ids=PROMPT), max_tokens=12, temperature=1.0, top_p=0.9,
                  top_k=50, seed=1234)
    first, second = await generate(stack, **fields), await generate(stack, **fields)
    assert [c.token_id for c in first] == [c.token_id for c in second]
    text = "".join(c.text for c in first)
    cut = next((i for i in range(2, len(text)) if text[i].isprintable() and text[i].strip()), None)
    if cut is not None:  # stop at a character of the sampled text: the output ends just before it
        stopped = await generate(stack, stop=[text[cut]], **fields)
        assert "".join(c.text for c in stopped) == text[: text.index(text[cut])]
        assert stopped[-1].finish_reason == "stop"


BAD_REQUESTS = [
    (dict(model=LLM), grpc.StatusCode.INVALID_ARGUMENT, "prompt is empty"),
    (dict(model=LLM, text=""), grpc.StatusCode.INVALID_ARGUMENT, "prompt is empty"),
    (dict(model=LLM, text="hi", max_tokens=0), grpc.StatusCode.INVALID_ARGUMENT, "max_tokens must be in [1, 4096]"),
    (dict(model=LLM, text="hi", max_tokens=5000), grpc.StatusCode.INVALID_ARGUMENT, "max_tokens must be in"),
    (dict(model=LLM, text="hi", max_tokens=4000), grpc.StatusCode.INVALID_ARGUMENT,
     "exceeds the model's context of 2048"),
    (dict(model=LLM, text="hi", temperature=-1.0), grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
    (dict(model=LLM, text="hi", temperature=float("nan")), grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
    (dict(model=LLM, text="hi", temperature=float("inf")), grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
    (dict(model=LLM, text="hi", top_p=0.0), grpc.StatusCode.INVALID_ARGUMENT, "top_p must be in (0, 1]"),
    (dict(model=LLM, text="hi", top_p=1.5), grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
    (dict(model=LLM, text="hi", top_k=-1), grpc.StatusCode.INVALID_ARGUMENT, "top_k must be >= 0"),
    (dict(model=LLM, token_ids=common_pb2.TokenIds(ids=[1, 512])), grpc.StatusCode.INVALID_ARGUMENT, "[0, 512)"),
    (dict(model=LLM, token_ids=common_pb2.TokenIds(ids=[1] * 8193)), grpc.StatusCode.INVALID_ARGUMENT, "at most 8192"),
    (dict(model=LLM, text="hi", stop=["a", "b", "c", "d", "e"]), grpc.StatusCode.INVALID_ARGUMENT, "at most 4 stop"),
    (dict(model=LLM, text="hi", stop=[""]), grpc.StatusCode.INVALID_ARGUMENT, "stop[0]"),
    (dict(model="../x", text="hi"), grpc.StatusCode.INVALID_ARGUMENT, "model name '../x' is invalid"),
    (dict(model="Bad Name", text="hi"), grpc.StatusCode.INVALID_ARGUMENT, "model name"),
    (dict(model="no-such-model", text="hi"), grpc.StatusCode.NOT_FOUND, "no-such-model"),
    (dict(model=LLM, version="v9", text="hi"), grpc.StatusCode.NOT_FOUND, "v9"),
    (dict(model=BERT, text="hi"), grpc.StatusCode.FAILED_PRECONDITION, "use Embed"),
]


@pytest.mark.parametrize("fields,code,message", BAD_REQUESTS, ids=[m for _, _, m in BAD_REQUESTS])
async def test_bad_generate_requests(stack: Stack, fields: dict, code: grpc.StatusCode, message: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await generate(stack, **fields)
    assert info.value.code() == code, info.value.details()
    assert message in info.value.details()


async def test_cancelled_stream_frees_the_session_on_every_worker(stack: Stack) -> None:
    call = stack.gateway.Generate(gateway_pb2.GenerateRequest(
        model=LLM, token_ids=common_pb2.TokenIds(ids=PROMPT), max_tokens=1500, temperature=0.0))
    received = 0
    async for _ in call:
        received += 1
        if received == 3:
            break
    assert sum((await stack.active_sessions()).values()) == 2  # one per stage, mid-stream
    call.cancel()
    await stack.wait_no_sessions()


async def test_deadline_ends_the_stream_and_frees_the_session(stack: Stack) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await generate(stack, timeout=0.5, model=LLM, token_ids=common_pb2.TokenIds(ids=PROMPT), max_tokens=1500,
                       temperature=0.0)  # greedy: deterministic, and no EOS comes before the deadline
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await stack.wait_no_sessions()


async def test_embed_matches_transformers_mean_pooling(stack: Stack, refs: References) -> None:
    await stack.placed(BERT)
    reply = await stack.gateway.Embed(gateway_pb2.EmbedRequest(model=BERT, texts=refs.embed_texts), timeout=60)
    ours = np.array([e.values for e in reply.embeddings])  # one padded batch
    np.testing.assert_allclose(ours, refs.embeddings, atol=1e-4)
    assert reply.version == "v1" and reply.usage.prompt_tokens == refs.embed_tokens


@pytest.mark.parametrize("fields,code,message", [
    (dict(model=BERT, texts=[]), grpc.StatusCode.INVALID_ARGUMENT, "1 to 256"),
    (dict(model=BERT, texts=["x"] * 257), grpc.StatusCode.INVALID_ARGUMENT, "1 to 256"),
    (dict(model=BERT, texts=["ok", ""]), grpc.StatusCode.INVALID_ARGUMENT, "texts[1] is empty"),
    (dict(model=LLM, texts=["ok"]), grpc.StatusCode.FAILED_PRECONDITION, "use Generate"),
    (dict(model="nope", texts=["ok"]), grpc.StatusCode.NOT_FOUND, "nope"),
])
async def test_bad_embed_requests(stack: Stack, fields: dict, code: grpc.StatusCode, message: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stack.gateway.Embed(gateway_pb2.EmbedRequest(**fields), timeout=30)
    assert info.value.code() == code and message in info.value.details()


async def test_admin_calls_are_proxied(stack: Stack) -> None:
    models = await stack.gateway.ListModels(common_pb2.ListModelsRequest())
    assert {m.name for m in models.models} == {LLM, BERT}
    model = await stack.gateway.GetModel(common_pb2.GetModelRequest(name=LLM))
    assert model.num_stages == 2 and model.aliases["latest"] == "v1"
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stack.gateway.GetModel(common_pb2.GetModelRequest(name="ghost"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND and "ghost" in info.value.details()
    version = await stack.gateway.SetAlias(common_pb2.SetAliasRequest(model=LLM, alias="prod", version="v1"))
    assert "prod" in version.aliases
    chunks = await generate(stack, model=LLM, version="prod", text="hi", max_tokens=2, temperature=0.0)
    assert chunks[-1].version == "v1"
    assert (await stack.gateway.SetReplicas(common_pb2.SetReplicasRequest(model=LLM, replicas=1))).replicas == 1
    workers = await stack.gateway.ListWorkers(common_pb2.ListWorkersRequest())
    assert {w.worker_id for w in workers.workers} == set(stack.running_workers)


async def test_a_refused_upload_keeps_the_registrys_code_and_message(stack: Stack, llama_dir: Path) -> None:
    chunks = list(iter_upload_chunks(plan_upload(llama_dir), "broken"))
    header = chunks[0].header
    header.files[0].sha256 = "0" * 64  # the registry checks every file's hash
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stack.gateway.RegisterModel(upload(chunks), timeout=60)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert header.files[0].path in info.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stack.gateway.GetModel(common_pb2.GetModelRequest(name="broken"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_worker_dying_mid_stream_is_replaced_and_the_stream_continues(stack: Stack, refs: References) -> None:
    """Runs last: it kills a worker. The scheduler re-places its stage on the spare worker, the gateway
    replays the session there, and the client sees exactly the greedy tokens."""
    hops = await stack.placed(LLM)
    victim = hops[-1]
    call = stack.gateway.Generate(gateway_pb2.GenerateRequest(
        model=LLM, token_ids=common_pb2.TokenIds(ids=PROMPT), max_tokens=GREEDY_TOKENS, temperature=0.0), timeout=120)
    tokens = []
    async for chunk in call:
        tokens.append(chunk.token_id)
        if len(tokens) == 5:
            running, app = stack.running_workers.pop(victim)
            await stop_worker(running, app)
    assert tokens == refs.greedy
    new_hops = await stack.placed(LLM)
    assert victim not in new_hops
    await stack.wait_no_sessions()
