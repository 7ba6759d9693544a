"""Workers over real gRPC, fed by the REAL registry (in-process, SQLite): stage loading, the local
cache, chained Forward calls matching transformers, epochs, sessions and error codes.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator

import grpc
import pytest
import pytest_asyncio
import torch

from modelgrid.channel import aio_channel
from modelgrid.model import Checkpoint, load_spec, stage_tensor_names, write_random_checkpoint
from modelgrid.v1 import common_pb2, registry_pb2_grpc, worker_pb2, worker_pb2_grpc
from services.common.metrics import REQUESTS
from services.registry.app import start_registry
from services.registry.config import RegistryConfig
from modelgrid.upload import iter_upload_chunks
from services.worker.app import WorkerApp, start_worker, stop_worker
from services.worker.config import WorkerConfig
from services.worker.tensors import decode, encode
from tests.stack import hf_greedy_many
from tests.support import free_port

pytestmark = pytest.mark.asyncio(loop_scope="module")

PROMPT = [1, 17, 250, 3, 999, 42, 7]  # 7 tokens
DECODE_STEPS = 8
MODEL = "llama"


# ---- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_checkpoint(tmp_path_factory.mktemp("llama"), "llama", num_layers=4, hidden_size=64,
                                   num_heads=4, num_kv_heads=2, vocab_size=1000, seed=3,
                                   init_std=0.2, random_norms_and_biases=True)  # decisive logits


@pytest.fixture(scope="module")
def reference_tokens(llama_dir: Path) -> list[int]:
    """transformers' greedy continuation of PROMPT: 1 token from the prefill + DECODE_STEPS more."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # compare every step, even past an EOS
    with torch.no_grad():
        out = model.generate(torch.tensor([PROMPT]), max_new_tokens=DECODE_STEPS + 1, do_sample=False,
                             attention_mask=torch.ones(1, len(PROMPT), dtype=torch.long), pad_token_id=0)
    return out[0, len(PROMPT):].tolist()


@dataclass
class RegistryService:
    address: str
    data_dir: Path


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def registry(tmp_path_factory: pytest.TempPathFactory, llama_dir: Path) -> AsyncIterator[RegistryService]:
    """The real registry service with the llama checkpoint registered as MODEL v1."""
    data = tmp_path_factory.mktemp("registry-data")
    running = await start_registry(RegistryConfig(listen="127.0.0.1:0", metrics_port=-1, data_dir=str(data)))
    service = RegistryService(f"127.0.0.1:{running.port}", data)
    await upload(service.address, llama_dir, MODEL)
    yield service
    await running.stop(0)


async def upload(address: str, directory: Path, model: str) -> common_pb2.ModelVersion:
    async with aio_channel(address) as channel:
        stub = registry_pb2_grpc.RegistryStub(channel)
        return await stub.UploadVersion(iter(list(iter_upload_chunks(directory, model))))


class Workers:
    """Starts in-process workers on port 0 (the scheduler address is a dead port: they keep retrying)."""

    def __init__(self, registry: str, tmp: Path) -> None:
        self.registry, self.tmp = registry, tmp
        self.started: list[tuple[object, WorkerApp, grpc.aio.Channel]] = []
        self.dead_scheduler = f"127.0.0.1:{free_port()}"

    async def start(self, worker_id: str, **overrides) -> tuple[worker_pb2_grpc.WorkerStub, WorkerApp]:
        settings = dict(listen="127.0.0.1:0", metrics_port=-1, worker_id=worker_id, registry=self.registry,
                        scheduler=self.dead_scheduler, device="cpu", cache_dir=str(self.tmp / f"cache-{worker_id}"))
        settings.update(overrides)
        running, app = await start_worker(WorkerConfig(**settings))
        channel = aio_channel(f"127.0.0.1:{running.port}")
        self.started.append((running, app, channel))
        return worker_pb2_grpc.WorkerStub(channel), app

    async def stop(self, app: WorkerApp) -> None:
        for item in list(self.started):
            if item[1] is app:
                self.started.remove(item)
                await item[2].close()
                await stop_worker(item[0], app)

    async def close(self) -> None:
        for running, app, channel in self.started:
            await channel.close()
            await stop_worker(running, app)


@pytest_asyncio.fixture(loop_scope="module")
async def workers(registry: RegistryService, tmp_path: Path) -> AsyncIterator[Workers]:
    w = Workers(registry.address, tmp_path)
    yield w
    await w.close()


# ---- helpers ----------------------------------------------------------------------------------


def load_req(start: int, end: int, epoch: int = 1, model: str = MODEL) -> worker_pb2.LoadStageRequest:
    return worker_pb2.LoadStageRequest(model=model, version="v1", start_layer=start, end_layer=end, epoch=epoch)


def fwd(session: str, start: int, end: int, position: int, *, tokens: list[int] | None = None,
        hidden: common_pb2.Tensor | None = None, epoch: int = 1, step: int = 0, **kw) -> worker_pb2.ForwardRequest:
    req = worker_pb2.ForwardRequest(session_id=session, model=MODEL, version="v1", start_layer=start,
                                    end_layer=end, epoch=epoch, position=position, step=step, **kw)
    if tokens is not None:
        req.tokens.ids.extend(tokens)
    if hidden is not None:
        req.hidden.CopyFrom(hidden)
    return req


async def generate(first, last, session: str, prompt: list[int], steps: int, *, epoch: int = 1,
                   sampling: common_pb2.SamplingParams | None = None, start_step: int = 0,
                   reset: bool = False) -> list[int]:
    """Prefill `prompt` then decode `steps` tokens through [0,2) on `first` and [2,4) on `last`."""
    out: list[int] = []
    position, inputs, step = 0, prompt, start_step
    for i in range(steps + 1):
        a = await first.Forward(fwd(session, 0, 2, position, tokens=inputs, epoch=epoch, reset=reset and i == 0))
        assert a.WhichOneof("output") == "hidden" and a.cache_length == position + len(inputs)
        b = await last.Forward(fwd(session, 2, 4, position, hidden=a.hidden, epoch=epoch, step=step,
                                   sampling=sampling, reset=reset and i == 0))
        assert b.WhichOneof("output") == "token" and b.cache_length == position + len(inputs)
        out.append(b.token.token_id)
        position += len(inputs)
        inputs = [b.token.token_id]
        step += 1
    return out


async def code_of(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value.code(), info.value.details()


def fetch_count() -> float:
    return REQUESTS.labels("registry", "FetchTensors", "OK")._value.get()


# ---- tests ------------------------------------------------------------------------------------


async def test_two_workers_chain_matches_transformers_greedy(workers: Workers, llama_dir: Path,
                                                             reference_tokens: list[int]) -> None:
    first, _ = await workers.start("w1")
    last, _ = await workers.start("w2")
    s1 = (await first.LoadStage(load_req(0, 2))).stage
    s2 = (await last.LoadStage(load_req(2, 4))).stage

    # reported param bytes = the stage's tensors' bytes in the checkpoint's safetensors header
    spec, ckpt = load_spec(llama_dir), Checkpoint(llama_dir)
    for stage in (s1, s2):
        names = stage_tensor_names(spec, stage.start_layer, stage.end_layer)
        assert stage.param_bytes == sum(ckpt.nbytes(n) for n in names) > 0
        assert (stage.model, stage.version, stage.epoch) == (MODEL, "v1", 1)

    tokens = await generate(first, last, "sess-a", PROMPT, DECODE_STEPS)
    assert tokens == reference_tokens

    status = await last.GetStatus(worker_pb2.GetStatusRequest())
    assert status.worker_id == "w2" and status.state == "serving" and status.device == "cpu"
    assert [(s.start_layer, s.end_layer) for s in status.stages] == [(2, 4)]
    assert status.active_sessions == 1 and status.kv_cache_bytes > 0
    assert status.free_memory == status.total_memory - s2.param_bytes - status.kv_cache_bytes

    for stub in (first, last):
        await stub.CloseSession(worker_pb2.CloseSessionRequest(session_id="sess-a"))
        await stub.CloseSession(worker_pb2.CloseSessionRequest(session_id="sess-a"))  # idempotent
        status = await stub.GetStatus(worker_pb2.GetStatusRequest())
        assert status.active_sessions == 0 and status.kv_cache_bytes == 0
    # the closed session is gone: continuing it is refused, with both numbers in the message
    code, details = await code_of(first.Forward(fwd("sess-a", 0, 2, len(PROMPT) + DECODE_STEPS, tokens=[5])))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "0 tokens cached" in details and f"position {len(PROMPT) + DECODE_STEPS}" in details


async def test_one_worker_holding_every_layer_matches_too(workers: Workers, reference_tokens: list[int]) -> None:
    stub, _ = await workers.start("solo")
    await stub.LoadStage(load_req(0, 4))
    prefill = await stub.Forward(fwd("s", 0, 4, 0, tokens=PROMPT))
    assert prefill.token.token_id == reference_tokens[0] and prefill.token.logprob < 0
    again = await stub.LoadStage(load_req(0, 4))  # idempotent: same stage, session untouched
    assert again.stage.param_bytes > 0
    assert (await stub.GetStatus(worker_pb2.GetStatusRequest())).active_sessions == 1


async def test_second_load_is_a_cache_hit_and_damage_is_refetched(workers: Workers, tmp_path: Path,
                                                                  reference_tokens: list[int]) -> None:
    cache_dir = str(tmp_path / "shared-cache")
    first, app = await workers.start("c1", cache_dir=cache_dir)
    before = fetch_count()
    await first.LoadStage(load_req(0, 2))
    assert fetch_count() == before + 1 and app.runtime.cache.stats.fills == 1
    stage_file = Path(cache_dir) / MODEL / "v1" / "0-2" / "stage.safetensors"
    assert stage_file.is_file()

    # unload + load on the same worker, and a restarted worker on the same cache dir: no FetchTensors
    await first.UnloadStage(worker_pb2.UnloadStageRequest(model=MODEL, version="v1", start_layer=0, end_layer=2,
                                                          epoch=1))
    assert (await first.GetStatus(worker_pb2.GetStatusRequest())).stages == []
    await first.LoadStage(load_req(0, 2))
    await workers.stop(app)
    first, app = await workers.start("c1b", cache_dir=cache_dir)
    await first.LoadStage(load_req(0, 2))
    assert fetch_count() == before + 1
    assert app.runtime.cache.stats.hits == 1 and app.runtime.cache.stats.fills == 0
    await workers.stop(app)

    # flip one byte of weights in the cache: detected, fetched again, and the outputs stay right
    raw = bytearray(stage_file.read_bytes())
    raw[len(raw) // 2] ^= 0x40
    stage_file.write_bytes(bytes(raw))
    first, app = await workers.start("c1c", cache_dir=cache_dir)
    await first.LoadStage(load_req(0, 2))
    assert fetch_count() == before + 2 and app.runtime.cache.stats.corrupt == 1
    assert stage_file.read_bytes() != bytes(raw)
    last, _ = await workers.start("c2")
    await last.LoadStage(load_req(2, 4))
    assert await generate(first, last, "s", PROMPT, 1) == reference_tokens[:2]


async def test_corrupt_registry_copy_is_refused(workers: Workers, registry: RegistryService, llama_dir: Path,
                                                tmp_path: Path) -> None:
    await upload(registry.address, llama_dir, "llama-bad")
    # the registry re-hashes what it serves: damage its stored copy of one layer's weights
    from services.registry.tensors import read_tensor_layout  # the registry's own reader

    stored = registry.data_dir / "artifacts" / "llama-bad" / "v1" / "model.safetensors"
    entry = read_tensor_layout(stored)["model.layers.1.mlp.down_proj.weight"]
    raw = bytearray(stored.read_bytes())
    raw[entry.begin + 3] ^= 0x01
    stored.write_bytes(bytes(raw))
    stub, app = await workers.start("bad")
    code, details = await code_of(stub.LoadStage(load_req(0, 2, model="llama-bad")))
    assert code in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.DATA_LOSS), details
    assert "corrupt" in details or "sha256" in details
    assert not (tmp_path / "cache-bad" / "llama-bad" / "v1" / "0-2").exists()  # nothing half-written kept
    assert (await stub.GetStatus(worker_pb2.GetStatusRequest())).stages == []
    # the healthy layers of the same version still load
    await stub.LoadStage(load_req(2, 4, model="llama-bad"))


async def test_stale_epochs_are_aborted(workers: Workers) -> None:
    stub, app = await workers.start("e1")
    await stub.LoadStage(load_req(0, 2, epoch=5))
    code, details = await code_of(stub.LoadStage(load_req(2, 4, epoch=4)))
    assert code == grpc.StatusCode.ABORTED and "epoch 4" in details and "epoch 5" in details
    code, _ = await code_of(stub.Forward(fwd("s", 0, 2, 0, tokens=[1, 2], epoch=4)))
    assert code == grpc.StatusCode.ABORTED
    assert (await stub.Forward(fwd("s", 0, 2, 0, tokens=[1, 2], epoch=5))).cache_length == 2
    # the scheduler's replies raise the bar too (membership feeds runtime.observe_epoch)
    app.runtime.observe_epoch(9)
    code, _ = await code_of(stub.UnloadStage(worker_pb2.UnloadStageRequest(model=MODEL, version="v1",
                                                                           start_layer=0, end_layer=2, epoch=8)))
    assert code == grpc.StatusCode.ABORTED
    stage = (await stub.LoadStage(load_req(0, 2, epoch=9))).stage  # idempotent, epoch bumped
    assert stage.epoch == 9


async def test_bad_requests_get_the_right_codes(workers: Workers) -> None:
    stub, _ = await workers.start("w1", memory_bytes=10**9)
    code, details = await code_of(stub.Forward(fwd("s", 0, 4, 0, tokens=[1])))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert details == "stage llama v1 [0,4) is not loaded on worker w1"
    code, details = await code_of(stub.LoadStage(load_req(2, 9)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "4 layers" in details
    code, _ = await code_of(stub.LoadStage(load_req(2, 2)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    code, details = await code_of(stub.LoadStage(worker_pb2.LoadStageRequest(model="nope", version="v1",
                                                                             start_layer=0, end_layer=1, epoch=1)))
    assert code == grpc.StatusCode.NOT_FOUND and "nope" in details
    code, _ = await code_of(stub.LoadStage(worker_pb2.LoadStageRequest(model="../x", version="v1",
                                                                       start_layer=0, end_layer=1, epoch=1)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT

    await stub.LoadStage(load_req(0, 2))
    await stub.LoadStage(load_req(2, 4))
    code, details = await code_of(stub.Forward(fwd("s", 0, 2, 0, tokens=[1, 1000])))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "token id 1000" in details and "[0, 1000)" in details
    code, _ = await code_of(stub.Forward(fwd("s", 0, 2, 0, tokens=[-1])))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    code, _ = await code_of(stub.Forward(fwd("s", 0, 2, 0, tokens=[])))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    hidden = (await stub.Forward(fwd("s", 0, 2, 0, tokens=[1, 2, 3]))).hidden
    code, details = await code_of(stub.Forward(fwd("s", 0, 2, 2, tokens=[4])))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "3 tokens cached" in details and "position 2" in details
    # hidden of the wrong width, dtype, or byte count
    wide = encode(torch.zeros(3, 65))
    code, details = await code_of(stub.Forward(fwd("s", 2, 4, 0, hidden=common_pb2.Tensor(
        data=wide.data, dtype=wide.dtype, shape=wide.shape))))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "hidden = 64" in details
    ids = encode(torch.zeros(3, 64, dtype=torch.int64))
    code, _ = await code_of(stub.Forward(fwd("s", 2, 4, 0, hidden=common_pb2.Tensor(
        data=ids.data, dtype=ids.dtype, shape=ids.shape))))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    code, _ = await code_of(stub.Forward(fwd("s", 2, 4, 0, hidden=common_pb2.Tensor(
        data=hidden.data[:-4], dtype=hidden.dtype, shape=hidden.shape))))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    code, _ = await code_of(stub.Forward(fwd("s", 2, 4, 0, tokens=[1])))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    # sampling parameters and session limits
    code, details = await code_of(stub.Forward(fwd("s", 2, 4, 0, hidden=hidden,
                                                   sampling=common_pb2.SamplingParams(temperature=-1))))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "temperature" in details
    code, _ = await code_of(stub.Forward(fwd("s", 2, 4, 0, hidden=hidden,
                                             sampling=common_pb2.SamplingParams(temperature=1, top_p=1.5))))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    code, details = await code_of(stub.Forward(fwd("t", 0, 2, 0, tokens=[1], max_session_tokens=2049)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "2048" in details
    await stub.Forward(fwd("t", 0, 2, 0, tokens=[1, 2], max_session_tokens=3))
    code, details = await code_of(stub.Forward(fwd("t", 0, 2, 2, tokens=[3, 4])))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "limit of 3" in details
    # every failure above left the worker healthy and the good session usable
    ok = await stub.Forward(fwd("s", 2, 4, 0, hidden=hidden))
    assert ok.WhichOneof("output") == "token"


async def test_stage_larger_than_free_memory_is_resource_exhausted(workers: Workers) -> None:
    stub, _ = await workers.start("small", memory_bytes=200_000)  # a stage [0,2) needs ~330 kB in float32
    code, details = await code_of(stub.LoadStage(load_req(0, 2)))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "200000" in details
    await stub.LoadStage(load_req(2, 3))  # one layer (~100 kB) fits
    code, _ = await code_of(stub.LoadStage(load_req(3, 4)))  # the next layer + norm + LM head do not
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_replay_with_reset_rebuilds_the_same_cache(workers: Workers) -> None:
    first, _ = await workers.start("r1")
    last, _ = await workers.start("r2")
    await first.LoadStage(load_req(0, 2))
    await last.LoadStage(load_req(2, 4))
    sampling = common_pb2.SamplingParams(temperature=0.9, top_k=50, top_p=0.95, seed=1234)
    original = await generate(first, last, "s", PROMPT, 6, sampling=sampling)
    # as if stage [2,4) failed after 3 decode steps: replay prompt + generated tokens with reset, on
    # the same session id, and continue sampling from step 4
    replay = PROMPT + original[:4]
    a = await first.Forward(fwd("s", 0, 2, 0, tokens=replay, reset=True))
    b = await last.Forward(fwd("s", 2, 4, 0, hidden=a.hidden, reset=True, step=4, sampling=sampling))
    assert b.cache_length == len(replay) and b.token.token_id == original[4]
    a = await first.Forward(fwd("s", 0, 2, len(replay), tokens=[original[4]]))
    b = await last.Forward(fwd("s", 2, 4, len(replay), hidden=a.hidden, step=5, sampling=sampling))
    assert b.token.token_id == original[5]
    # a different seed samples something else somewhere in 7 steps
    other = await generate(first, last, "u", PROMPT, 6,
                           sampling=common_pb2.SamplingParams(temperature=0.9, top_k=50, top_p=0.95, seed=99))
    assert other != original


async def test_idle_sessions_are_evicted(workers: Workers) -> None:
    stub, _ = await workers.start("idle", session_idle_timeout_s=0.3)
    await stub.LoadStage(load_req(0, 2))
    await stub.Forward(fwd("s", 0, 2, 0, tokens=[1, 2, 3]))
    assert (await stub.GetStatus(worker_pb2.GetStatusRequest())).active_sessions == 1
    deadline = asyncio.get_running_loop().time() + 10
    while (await stub.GetStatus(worker_pb2.GetStatusRequest())).active_sessions:
        assert asyncio.get_running_loop().time() < deadline, "idle session never evicted"
        await asyncio.sleep(0.05)
    assert (await stub.GetStatus(worker_pb2.GetStatusRequest())).kv_cache_bytes == 0


async def test_draining_refuses_new_sessions_but_finishes_open_ones(workers: Workers) -> None:
    stub, app = await workers.start("d1")
    await stub.LoadStage(load_req(0, 2))
    await stub.Forward(fwd("open", 0, 2, 0, tokens=[1, 2]))
    drain = asyncio.create_task(app.drain(grace_s=30))
    await asyncio.sleep(0)
    code, details = await code_of(stub.Forward(fwd("new", 0, 2, 0, tokens=[1])))
    assert code == grpc.StatusCode.UNAVAILABLE and "worker draining" in details
    assert (await stub.GetStatus(worker_pb2.GetStatusRequest())).state == "draining"
    assert (await stub.Forward(fwd("open", 0, 2, 2, tokens=[3]))).cache_length == 3
    assert (await stub.Forward(fwd("open", 0, 2, 0, tokens=[1, 2, 3], reset=True))).cache_length == 3  # replay
    assert not drain.done()
    await stub.CloseSession(worker_pb2.CloseSessionRequest(session_id="open"))
    await asyncio.wait_for(drain, 5)
    code, _ = await code_of(stub.Forward(fwd("open", 0, 2, 0, tokens=[1])))  # closed: now a new session
    assert code == grpc.StatusCode.UNAVAILABLE

    # a session left open does not hold the worker past the grace period
    stub, app = await workers.start("d2")
    await stub.LoadStage(load_req(0, 2))
    await stub.Forward(fwd("stuck", 0, 2, 0, tokens=[1]))
    started = asyncio.get_running_loop().time()
    await asyncio.wait_for(app.drain(grace_s=0.3), 5)
    assert 0.3 <= asyncio.get_running_loop().time() - started < 3
    assert app.runtime.sessions.active_sessions() == 1


async def test_registry_down_is_unavailable(workers: Workers) -> None:
    stub, _ = await workers.start("lonely", registry=f"127.0.0.1:{free_port()}")
    code, details = await code_of(stub.LoadStage(load_req(0, 2)))
    assert code == grpc.StatusCode.UNAVAILABLE and "registry at 127.0.0.1:" in details


async def test_bert_encoder_stages_match_transformers(workers: Workers, registry: RegistryService,
                                                      tmp_path: Path) -> None:
    bert_dir = write_random_checkpoint(tmp_path / "bert", "bert", num_layers=2, hidden_size=32, num_heads=4,
                                       vocab_size=300, max_position_embeddings=64, seed=1)
    await upload(registry.address, bert_dir, "tiny-bert")
    first, _ = await workers.start("b1")
    last, _ = await workers.start("b2")
    for stub, (s, e) in ((first, (0, 1)), (last, (1, 2))):
        await stub.LoadStage(load_req(s, e, model="tiny-bert"))
    ids = torch.tensor([[1, 40, 41, 42, 2], [1, 50, 2, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    m = encode(mask)
    req = worker_pb2.ForwardRequest(model="tiny-bert", version="v1", start_layer=0, end_layer=1, epoch=1,
                                    tokens_shape=[2, 5], attention_mask=common_pb2.Tensor(
                                        data=m.data, dtype=m.dtype, shape=m.shape))
    req.tokens.ids.extend(ids.reshape(-1).tolist())
    a = await first.Forward(req)
    assert list(a.hidden.shape) == [2, 5, 32]
    req2 = worker_pb2.ForwardRequest(model="tiny-bert", version="v1", start_layer=1, end_layer=2, epoch=1,
                                     hidden=a.hidden, attention_mask=req.attention_mask)
    b = await last.Forward(req2)
    got = decode(b.embeddings.data, b.embeddings.dtype, b.embeddings.shape)
    assert got.dtype == torch.float32 and got.shape == (2, 32)

    from transformers import AutoModel

    ref = AutoModel.from_pretrained(bert_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        h = ref(input_ids=ids, attention_mask=mask).last_hidden_state
    w = mask[:, :, None].float()
    expected = torch.nn.functional.normalize((h * w).sum(1) / w.sum(1), dim=1)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    bad = worker_pb2.ForwardRequest(model="tiny-bert", version="v1", start_layer=0, end_layer=1, epoch=1,
                                    tokens_shape=[2, 4])
    bad.tokens.ids.extend(ids.reshape(-1).tolist())
    code, _ = await code_of(first.Forward(bad))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


async def test_concurrent_sessions_are_batched_and_match_one_at_a_time(workers: Workers) -> None:
    stub, app = await workers.start("batch")
    await stub.LoadStage(load_req(0, 4))
    prompts = [[1, 5 + i, 9, 200 + 3 * i, 7][: 2 + i % 4] for i in range(6)]

    async def two_steps(session: str, prompt: list[int]) -> list[tuple[int, float]]:
        a = await stub.Forward(fwd(session, 0, 4, 0, tokens=prompt))
        b = await stub.Forward(fwd(session, 0, 4, len(prompt), tokens=[a.token.token_id], step=1))
        return [(a.token.token_id, a.token.logprob), (b.token.token_id, b.token.logprob)]

    alone = [await two_steps(f"alone-{i}", p) for i, p in enumerate(prompts)]
    assert max(app.runtime.stats.batch_sizes) == 1

    # hold the torch thread so that every session's prefill queues up, then release it
    gate = threading.Event()
    blocker = asyncio.ensure_future(app.runtime.run(gate.wait))
    tasks = [asyncio.ensure_future(two_steps(f"together-{i}", p)) for i, p in enumerate(prompts)]
    deadline = asyncio.get_running_loop().time() + 10
    while sum(len(q) for q in app.runtime._queues.values()) < len(prompts):
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.01)
    gate.set()
    together = await asyncio.gather(*tasks)
    await blocker
    assert len(prompts) in app.runtime.stats.batch_sizes  # all prefills ran as one forward pass
    for got, want in zip(together, alone):
        assert [t for t, _ in got] == [t for t, _ in want]
        assert [lp for _, lp in got] == pytest.approx([lp for _, lp in want], abs=1e-4)


async def test_forward_batch_shares_a_pass_and_each_step_fails_alone(workers: Workers, llama_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    stub, app = await workers.start("coalesced")
    await stub.LoadStage(load_req(0, 4))
    prompts = [[1, 5 + i, 9, 200 + 3 * i][: 2 + i] for i in range(3)]
    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    expected = hf_greedy_many(model, prompts, 2)

    steps = [fwd(f"together-{i}", 0, 4, 0, tokens=p) for i, p in enumerate(prompts)]
    steps.insert(1, fwd("lost", 0, 4, 5, tokens=[3]))  # a session this worker never saw, mid-way
    steps.append(fwd("elsewhere", 0, 2, 0, tokens=[3]))  # a stage this worker does not hold
    steps.append(worker_pb2.ForwardRequest(session_id="", model=MODEL, version="v1", start_layer=0, end_layer=4))
    messages = [m async for m in stub.ForwardBatch(worker_pb2.ForwardBatchRequest(steps=steps))]
    # steps refused before queueing come first; then the pass: the three good prefills ran as one forward
    # pass, and the step at a position this worker never saw failed in it
    assert [sorted(r.index for r in m.results) for m in messages] == [[4, 5], [0, 1, 2, 3]]
    results = {r.index: r for m in messages for r in m.results}
    codes = [results[i].code for i in range(len(steps))]
    assert codes == ["", "FAILED_PRECONDITION", "", "", "FAILED_PRECONDITION", "INVALID_ARGUMENT"]
    assert "position 5" in results[1].message and "not loaded" in results[4].message
    assert len(prompts) in app.runtime.stats.batch_sizes
    firsts = [results[i].response.token.token_id for i in (0, 2, 3)]

    decodes = [fwd(f"together-{i}", 0, 4, len(p), tokens=[firsts[i]], step=1) for i, p in enumerate(prompts)]
    results = {r.index: r for m in [m async for m in stub.ForwardBatch(worker_pb2.ForwardBatchRequest(steps=decodes))]
               for r in m.results}
    assert [[f, results[i].response.token.token_id] for i, f in enumerate(firsts)] == expected
    assert [results[i].response.cache_length for i in range(3)] == [len(p) + 1 for p in prompts]


SESSION_TOKENS = 16
SESSION_KV = SESSION_TOKENS * 4 * 2 * 2 * 16 * 4  # 4 layers x (k, v) x 2 kv heads x head_dim 16 x float32


async def test_a_step_waiting_for_kv_memory_does_not_hold_back_the_rest_of_its_batch(
    workers: Workers, reference_tokens: list[int]
) -> None:
    stub, app = await workers.start("kv-wait", kv_budget_bytes=2 * SESSION_KV, kv_admission_timeout_s=120)
    await stub.LoadStage(load_req(0, 4))
    for session in ("run-0", "run-1"):  # they fill the KV budget
        a = await stub.Forward(fwd(session, 0, 4, 0, tokens=PROMPT, max_session_tokens=SESSION_TOKENS))
        assert a.token.token_id == reference_tokens[0]
    decode = [reference_tokens[0]]
    steps = [fwd("run-0", 0, 4, len(PROMPT), tokens=decode, step=1, max_session_tokens=SESSION_TOKENS),
             fwd("new", 0, 4, 0, tokens=PROMPT, max_session_tokens=SESSION_TOKENS),
             fwd("run-1", 0, 4, len(PROMPT), tokens=decode, step=1, max_session_tokens=SESSION_TOKENS)]
    call = stub.ForwardBatch(worker_pb2.ForwardBatchRequest(steps=steps))
    # the running sessions advance while the new one waits for memory they hold (the bound only ends a
    # failing run: before the fix they waited for the new session's 120 s admission)
    first = await asyncio.wait_for(call.read(), 60)
    assert sorted((r.index, r.code, r.response.token.token_id) for r in first.results) == [
        (0, "", reference_tokens[1]), (2, "", reference_tokens[1])]
    assert app.runtime.admission.queued == 1
    await stub.CloseSession(worker_pb2.CloseSessionRequest(session_id="run-0"))  # frees room for the new one
    (second,) = (await asyncio.wait_for(call.read(), 60)).results
    assert (second.index, second.code, second.response.token.token_id) == (1, "", reference_tokens[0])
    assert await call.read() == grpc.aio.EOF


async def test_closing_a_session_fails_its_queued_step_and_leaves_no_session(
    workers: Workers, reference_tokens: list[int]
) -> None:
    stub, app = await workers.start("close-queued")
    await stub.LoadStage(load_req(0, 4))
    gate = threading.Event()  # holds the torch thread, so that both steps wait in the queue
    blocker = asyncio.ensure_future(app.runtime.run(gate.wait))
    try:
        call = stub.ForwardBatch(worker_pb2.ForwardBatchRequest(
            steps=[fwd("gone", 0, 4, 0, tokens=PROMPT), fwd("kept", 0, 4, 0, tokens=PROMPT)]))
        deadline = asyncio.get_running_loop().time() + 10
        while app.runtime.queued_steps() < 2:
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.01)
        await stub.CloseSession(worker_pb2.CloseSessionRequest(session_id="gone"))
    finally:
        gate.set()
    await blocker
    results = {r.index: r for m in [m async for m in call] for r in m.results}
    assert results[0].code == "FAILED_PRECONDITION" and "closed" in results[0].message
    assert (results[1].code, results[1].response.token.token_id) == ("", reference_tokens[0])
    assert not app.runtime.sessions.known("gone")  # not opened again by its step after the close
    assert app.runtime.sessions.active_sessions() == 1 and app.runtime.queued_steps() == 0


async def test_a_pass_failing_with_a_bug_fails_its_steps_and_the_batch_goes_on(
    workers: Workers, reference_tokens: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    stub, app = await workers.start("pass-bug")
    await stub.LoadStage(load_req(0, 2))
    await stub.LoadStage(load_req(2, 4))
    a = await stub.Forward(fwd("b", 0, 2, 0, tokens=PROMPT))
    last = next(stage.module for key, stage in app.runtime.stages.items() if key.start == 2)

    def broken(*args, **kwargs):
        raise RuntimeError("a bug in the pass")

    monkeypatch.setattr(last, "forward_batch", broken)
    steps = [fwd("a", 0, 2, 0, tokens=PROMPT), fwd("b", 2, 4, 0, hidden=a.hidden)]
    results = {r.index: r for m in [m async for m in stub.ForwardBatch(worker_pb2.ForwardBatchRequest(steps=steps))]
               for r in m.results}
    assert results[1].code == "INTERNAL" and "a bug in the pass" in results[1].message
    assert results[0].code == "" and results[0].response.cache_length == len(PROMPT)
    monkeypatch.undo()
    b = await stub.Forward(fwd("c", 2, 4, 0, hidden=a.hidden))  # the stage still serves
    assert b.token.token_id == reference_tokens[0]


# ---- ForwardStream: the gateway's long-lived step stream ------------------------------------------------------


async def test_forward_stream_numbers_steps_across_messages_and_matches_transformers(
    workers: Workers, reference_tokens: list[int]
) -> None:
    stub, _ = await workers.start("stream")
    await stub.LoadStage(load_req(0, 4))
    call = stub.ForwardStream()
    await call.write(worker_pb2.ForwardBatchRequest(steps=[fwd("a", 0, 4, 0, tokens=PROMPT)]))
    await call.write(worker_pb2.ForwardBatchRequest(steps=[
        fwd("b", 0, 4, 0, tokens=PROMPT), fwd("lost", 0, 4, 3, tokens=[5])]))

    async def answers(count: int) -> dict[int, worker_pb2.ForwardResult]:
        got: dict[int, worker_pb2.ForwardResult] = {}
        while len(got) < count:
            reply = await asyncio.wait_for(call.read(), 60)
            got.update((r.index, r) for r in reply.results)
        return got

    # the steps are numbered across messages: 0 (first message), 1 and 2 (second)
    first = await answers(3)
    assert sorted(first) == [0, 1, 2]
    assert [first[i].response.token.token_id for i in (0, 1)] == [reference_tokens[0]] * 2
    assert first[2].code == "FAILED_PRECONDITION" and "position 3" in first[2].message
    await call.write(worker_pb2.ForwardBatchRequest(steps=[
        fwd(s, 0, 4, len(PROMPT), tokens=[reference_tokens[0]], step=1) for s in ("a", "b")]))
    second = await answers(2)
    assert sorted(second) == [3, 4]
    assert [second[i].response.token.token_id for i in (3, 4)] == [reference_tokens[1]] * 2
    await call.done_writing()
    assert await asyncio.wait_for(call.read(), 30) == grpc.aio.EOF  # everything sent was answered: it ends
    assert (await call.code()) == grpc.StatusCode.OK


async def test_gateway_decode_steps_go_over_one_stream_and_those_a_stopping_worker_drops_fail_retryably(
    workers: Workers, reference_tokens: list[int]
) -> None:
    from modelgrid.errors import Unavailable
    from services.gateway.domain import Hop, Route, Sampling
    from services.gateway.upstream import Channels
    from services.gateway.upstream import Workers as GatewayWorkers

    stub, app = await workers.start("gateway-stream")
    await stub.LoadStage(load_req(0, 4))
    port = workers.started[-1][0].port
    hop = Hop(0, 4, "gateway-stream", f"127.0.0.1:{port}")
    route = Route(MODEL, "v1", 1, (hop,))
    channels = Channels()
    gateway = GatewayWorkers(channels)

    def calls(method: str) -> float:
        return REQUESTS.labels("worker", method, "OK")._value.get()

    async def step(ids: list[int], position: int, index: int) -> int:
        out = await gateway.forward_decoder(
            route, hop, "s", tokens=ids, hidden=None, position=position, reset=False,
            sampling=Sampling(0.0, 0, 1.0, 0), step=index, max_session_tokens=32, timeout=60.0)
        return out.token[0]

    try:
        forwards, batches, streams = calls("Forward"), calls("ForwardBatch"), calls("ForwardStream")
        tokens = [await step(PROMPT, 0, 0)]
        for i in range(1, 4):
            tokens.append(await step([tokens[-1]], len(PROMPT) + i - 1, i))
        assert tokens == reference_tokens[:4]
        # the prompt went as a ForwardBatch call of its own; the decode steps as messages on the stream
        assert (calls("Forward"), calls("ForwardBatch")) == (forwards, batches + 1)

        # the worker ends its streams (it drained) while a step waits in its queue: that step fails as
        # UNAVAILABLE, which the gateway's session replays elsewhere; the worker never runs it
        gate = threading.Event()
        blocker = asyncio.ensure_future(app.runtime.run(gate.wait))
        try:
            lost = asyncio.ensure_future(step([tokens[-1]], len(PROMPT) + 3, 4))
            deadline = asyncio.get_running_loop().time() + 30
            while app.runtime.queued_steps() == 0:
                assert asyncio.get_running_loop().time() < deadline
                await asyncio.sleep(0.01)
            app.end_streams()
            with pytest.raises(Unavailable):
                await asyncio.wait_for(lost, 30)
        finally:
            gate.set()
            await blocker
        assert calls("ForwardStream") == streams + 1  # the stream ended normally (OK) when it was ended
        # the worker is stopping: a stream opened now ends at once, so the step goes elsewhere too
        with pytest.raises(Unavailable):
            await step([tokens[-1]], len(PROMPT) + 3, 4)
        # the session is where it was (the lost step never ran): a plain Forward of that step goes on from it
        again = await stub.Forward(fwd("s", 0, 4, len(PROMPT) + 3, tokens=[tokens[-1]], step=4))
        assert again.token.token_id == reference_tokens[4]
    finally:
        await gateway.close()
        await channels.close()
