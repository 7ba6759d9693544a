"""Continuous batching and the KV-cache budget through the REAL stack, in-process on port 0: registry,
scheduler (real Redis), two CPU workers holding one stage each of a random Llama, the gateway.

The workers run passes of at most 16 tokens (so prompts are prefilled in chunks between other sessions'
decode steps) and have a KV budget of exactly 16 sessions of 64 tokens.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import AsyncIterator

import grpc
import pytest
import pytest_asyncio
import torch
from prometheus_client import REGISTRY

from modelgrid.v1 import common_pb2, worker_pb2
from tests.stack import Stack, decisive_llama, generate, hf_greedy_many, running_stack

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(300)]

LLM = "batch-llama"
KV_PER_TOKEN = 2 * 2 * 2 * 16 * 4  # per stage: 2 layers x (k, v) x 2 kv heads x head_dim 16 x float32
SESSION_TOKENS = 64
BUDGET = 16 * SESSION_TOKENS * KV_PER_TOKEN
MAX_BATCH_TOKENS = 16
# 16 prompts of 3 to 48 tokens for the batching test; 64 streams of 40 + 24 tokens for the budget test
PROMPTS = [[1] + [(7 * i + 13 * j) % 500 + 3 for j in range(2 + 3 * i)] for i in range(16)]
NEW_TOKENS = 12
CROWD_PROMPTS = [[1] + [(11 * i + 5 * j) % 500 + 3 for j in range(39)] for i in range(4)]
CROWD_NEW_TOKENS = SESSION_TOKENS - 40


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return decisive_llama(tmp_path_factory.mktemp("llama"), seed=11)


@pytest.fixture(scope="module")
def references(llama_dir: Path) -> dict[tuple[int, ...], list[int]]:
    """transformers' greedy continuations, computed before the stack starts (it shares this event loop)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    out = dict(zip(map(tuple, PROMPTS), hf_greedy_many(model, PROMPTS, NEW_TOKENS)))
    out.update(zip(map(tuple, CROWD_PROMPTS), hf_greedy_many(model, CROWD_PROMPTS, CROWD_NEW_TOKENS)))
    return out


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory, redis_server, llama_dir: Path,
                references: dict) -> AsyncIterator[Stack]:
    import redis

    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    # a long admission timeout: how many of the crowd finish must not depend on this machine's speed (64
    # sessions take 4-5 s on a slow 2-core box, so 3 s refused up to half of them); the refusal at the
    # timeout is tested in tests/unit/test_worker_budget.py
    settings = dict(kv_budget_bytes=BUDGET, kv_admission_timeout_s=30.0, max_batch_tokens=MAX_BATCH_TOKENS,
                    batch_wait_ms=2.0)
    async with running_stack(tmp_path_factory.mktemp("stack"), redis_server.url, {LLM: llama_dir}, workers=2,
                             worker_settings=settings) as stack:
        assert sorted(await stack.placed(LLM)) == ["w0", "w1"]
        yield stack


async def tokens_of(stack: Stack, prompt: list[int], max_tokens: int) -> list[int]:
    chunks = await generate(stack, timeout=120, model=LLM, token_ids=common_pb2.TokenIds(ids=prompt),
                            max_tokens=max_tokens, temperature=0.0)
    return [c.token_id for c in chunks]


async def test_concurrent_sessions_are_batched_and_change_no_token(stack: Stack, references: dict) -> None:
    runtimes = [stack.running_workers[w][1].runtime for w in ("w0", "w1")]
    alone = [await tokens_of(stack, p, NEW_TOKENS) for p in PROMPTS]
    assert alone == [references[tuple(p)] for p in PROMPTS]
    before = [(rt.stats.batched_passes, rt.stats.prefill_chunks) for rt in runtimes]

    together = await asyncio.gather(*(tokens_of(stack, p, NEW_TOKENS) for p in PROMPTS))

    assert together == alone
    for rt, (batched, chunks) in zip(runtimes, before):
        assert rt.stats.batched_passes > batched, f"{rt.worker_id} never ran two sessions in one pass"
        assert rt.stats.prefill_chunks > chunks  # prompts of up to 48 tokens in passes of 16
        assert max(rt.stats.batch_sizes) > 1
    await stack.wait_no_sessions()
    # the last worker started is the one whose figures Prometheus shows
    w1 = runtimes[1]
    assert REGISTRY.get_sample_value("modelgrid_worker_batched_passes_total") == w1.stats.batched_passes
    assert REGISTRY.get_sample_value("modelgrid_worker_kv_budget_bytes") == BUDGET
    assert REGISTRY.get_sample_value("modelgrid_worker_kv_cache_bytes") == 0


async def test_a_crowd_stays_within_the_kv_budget_and_the_excess_queues_or_is_refused(
    stack: Stack, references: dict
) -> None:
    runtimes = {w: stack.running_workers[w][1].runtime for w in ("w0", "w1")}
    waits_before = {w: rt.admission.stats.waited for w, rt in runtimes.items()}
    refused_before = sum(rt.admission.stats.refused for rt in runtimes.values())
    samples: dict[str, list[int]] = {w: [] for w in runtimes}
    done = asyncio.Event()

    async def sample() -> None:  # what the workers report (GetStatus, as in heartbeats), all along
        while not done.is_set():
            for worker_id, stub in stack.workers.items():
                samples[worker_id].append((await stub.GetStatus(worker_pb2.GetStatusRequest())).kv_cache_bytes)
            await asyncio.sleep(0.005)

    async def one(i: int) -> tuple[str, object]:
        prompt = CROWD_PROMPTS[i % len(CROWD_PROMPTS)]
        try:
            return "ok", (prompt, await tokens_of(stack, prompt, CROWD_NEW_TOKENS))
        except grpc.aio.AioRpcError as err:
            return err.code().name, err.details()

    sampler = asyncio.create_task(sample())
    started = time.monotonic()
    outcomes = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(64))), 180)
    done.set()
    await sampler

    completed = [value for kind, value in outcomes if kind == "ok"]
    refused = [value for kind, value in outcomes if kind != "ok"]
    print(f"64 streams in {time.monotonic() - started:.1f} s: {len(completed)} completed, {len(refused)} refused; "
          f"max KV bytes reported {[max(s) for s in samples.values()]} of {BUDGET}")
    assert len(completed) + len(refused) == 64
    # the first 16 fit at once; the rest wait for the memory of those ahead of them, which go on decoding
    # meanwhile (a step waiting for memory must not hold back the running sessions coalesced with it)
    assert len(completed) >= 48
    for prompt, tokens in completed:
        assert tokens == references[tuple(prompt)]
    assert {kind for kind, _ in outcomes} <= {"ok", "RESOURCE_EXHAUSTED"}, outcomes
    for details in refused:
        assert "no KV-cache memory" in details and f"of the {BUDGET}-byte KV budget" in details, details
    assert sum(rt.admission.stats.refused for rt in runtimes.values()) - refused_before == len(refused)
    for worker_id, values in samples.items():
        assert len(values) > 10 and 0 < max(values) <= BUDGET, (worker_id, max(values))
    first = (await stack.placed(LLM))[0]  # the worker of stage 0, where sessions arrive first
    assert max(samples[first]) == BUDGET  # the budget filled up: the rest had to queue
    assert runtimes[first].admission.stats.waited - waits_before[first] >= 64 - 16
    await stack.wait_no_sessions()
    assert all(rt.sessions.kv_bytes() == 0 and rt.admission.queued == 0 for rt in runtimes.values())
