"""Batch jobs through the whole stack, in-process (registry on SQLite, scheduler on a real Redis,
the gateway; 2 stages x 2 replicas on four CPU workers): the issue's "Must show" lines that need no process to die.

  1. test_tasks_run_on_both_replicas_and_come_back_in_order: one result per input, in input order, with its id,
     each equal (allclose 1e-5) to a single Gateway.Embed of that text; both replicas did tasks. (The 10,000-text
     job, a worker killed and the scheduler restarted mid-job are in tests/e2e/test_jobs.py, real processes.)
  2. test_malformed_jsonl_fails_before_any_work: INVALID_ARGUMENT naming the line; no job recorded.
  3. test_cancel_stops_handing_out_tasks: the cancelled job says how many items finished, and that stays so.
  4. test_generate_job_equals_single_generates: greedy generations equal single Gateway.Generate calls.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import AsyncIterator

import grpc
import numpy as np
import pytest
import pytest_asyncio

from modelgrid.model import write_random_checkpoint
from modelgrid.v1 import common_pb2, gateway_pb2, jobs_pb2
from tests.stack import Stack, decisive_llama, running_stack
from tests.support import word_texts as texts

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(400)]

BERT, LLM = "job-bert", "job-llama"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory, redis_server) -> AsyncIterator[Stack]:
    import redis

    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    bert = write_random_checkpoint(tmp_path_factory.mktemp("bert"), "bert", num_layers=2, hidden_size=32,
                                   num_heads=4, vocab_size=300, max_position_embeddings=64, seed=3)
    llama = decisive_llama(tmp_path_factory.mktemp("llama"), seed=5)
    async with running_stack(tmp_path_factory.mktemp("stack"), redis_server.url, {BERT: bert, LLM: llama},
                             workers=4, num_stages=2) as stack:
        for model in (BERT, LLM):
            await stack.gateway.SetReplicas(common_pb2.SetReplicasRequest(model=model, replicas=2))
        for model in (BERT, LLM):
            await wait_replicated(stack, model, replicas=2)
        yield stack


async def wait_replicated(stack: Stack, model: str, replicas: int) -> None:
    deadline = time.monotonic() + 120
    while True:
        placement = await stack.gateway.GetPlacement(common_pb2.GetPlacementRequest(model=model))
        if placement.state == "ready" and all(sum(r.ready for r in s.replicas) == replicas for s in placement.stages):
            return
        assert time.monotonic() < deadline, f"{model} not replicated: {placement}"
        await asyncio.sleep(0.1)


async def wait_ended(stack: Stack, job_id: str, timeout_s: float = 300) -> jobs_pb2.Job:
    """The WatchJob stream to its end; the progress it reported never goes back."""
    last = None
    async for job in stack.gateway.WatchJob(jobs_pb2.WatchJobRequest(job_id=job_id, interval_s=0.2),
                                            timeout=timeout_s):
        if last is not None:
            assert job.done + job.failed >= last.done + last.failed
        last = job
    assert last is not None
    return last


async def results(stack: Stack, job_id: str) -> list[jobs_pb2.JobResult]:
    return [r async for r in stack.gateway.GetJobResults(jobs_pb2.GetJobResultsRequest(job_id=job_id), timeout=120)]


async def single_embeds(stack: Stack, inputs: list[str], concurrency: int = 8) -> np.ndarray:
    """One Gateway.Embed call per text (a few in flight at once)."""
    out: list[np.ndarray | None] = [None] * len(inputs)
    next_index = iter(range(len(inputs)))

    async def client() -> None:
        for i in next_index:
            reply = await stack.gateway.Embed(gateway_pb2.EmbedRequest(model=BERT, texts=[inputs[i]]), timeout=60)
            out[i] = np.asarray(reply.embeddings[0].values, dtype=np.float32)

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return np.stack(out)


async def test_tasks_run_on_both_replicas_and_come_back_in_order(
        stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    """Data parallel: the tasks of one job went through both copies of each stage; every result is the single
    Embed of its text. (Each task's results are written in 3 calls here, as a big task's are.)"""
    from prometheus_client import REGISTRY

    from services.gateway import job_runner

    monkeypatch.setattr(job_runner, "WRITE_CHUNK", 7)

    def worker_tasks() -> dict[str, float]:
        return {w: REGISTRY.get_sample_value("modelgrid_gateway_job_worker_tasks_total", {"worker": w}) or 0.0
                for w in ("w0", "w1", "w2", "w3")}

    before = worker_tasks()
    inputs = texts(400)
    job = await stack.gateway.SubmitJob(jobs_pb2.SubmitJobRequest(
        model=BERT, kind="embed", items=jobs_pb2.JobItems(items=[jobs_pb2.JobItem(text=t) for t in inputs]),
        params=jobs_pb2.JobParams(task_items=20)))
    assert (await wait_ended(stack, job.job_id)).state == "succeeded"
    ran = {w: n - before[w] for w, n in worker_tasks().items()}
    assert sum(ran.values()) == 2 * 20 and all(n >= 2 for n in ran.values()), ran  # 20 tasks x 2 hops, on all 4
    got = await results(stack, job.job_id)
    assert [r.id for r in got] == [str(i) for i in range(400)]
    reference = await single_embeds(stack, inputs)
    np.testing.assert_allclose(np.asarray([r.embedding for r in got], dtype=np.float32), reference, atol=1e-5, rtol=0)


async def test_malformed_jsonl_fails_before_any_work(stack: Stack) -> None:
    before = (await stack.gateway.ListJobs(jobs_pb2.ListJobsRequest())).jobs
    bad = b'{"id": 1, "text": "fine"}\n\n{"id": 2, "text": "also fine"}\n{"id": 3, "text": "broken\n'
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stack.gateway.SubmitJob(jobs_pb2.SubmitJobRequest(model=BERT, kind="embed", jsonl=bad))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("line 4: not valid JSON"), err.value.details()
    for jsonl, message in (
        (b'{"id": "a", "txt": "x"}', "line 1: unknown field 'txt'"),
        (b'{"id": "a", "text": "x"}\n{"id": "a", "text": "y"}', "line 2: id 'a' is used twice (first at line 1)"),
        (b'["a"]', "line 1: expected a JSON object"),
        (b"\n\n", "no items"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stack.gateway.SubmitJob(jobs_pb2.SubmitJobRequest(model=BERT, kind="embed", jsonl=jsonl))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in err.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stack.gateway.SubmitJob(jobs_pb2.SubmitJobRequest(model=BERT, kind="generate", jsonl=b'{"prompt":"x"}'))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "generate jobs run on decoder models" in err.value.details()
    assert len((await stack.gateway.ListJobs(jobs_pb2.ListJobsRequest())).jobs) == len(before)  # nothing recorded


async def test_cancel_stops_handing_out_tasks(stack: Stack) -> None:
    items = [jobs_pb2.JobItem(text=t) for t in texts(3000, seed=11)]
    job = await stack.gateway.SubmitJob(jobs_pb2.SubmitJobRequest(
        model=BERT, kind="embed", items=jobs_pb2.JobItems(items=items), params=jobs_pb2.JobParams(task_items=10)))
    async for progress in stack.gateway.WatchJob(jobs_pb2.WatchJobRequest(job_id=job.job_id, interval_s=0.1)):
        if progress.done >= 50:
            break
    cancelled = await stack.gateway.CancelJob(jobs_pb2.CancelJobRequest(job_id=job.job_id))
    assert cancelled.state == "cancelled" and 50 <= cancelled.done < 3000
    await asyncio.sleep(1.0)  # tasks in flight at the cancel end; none of their results may land
    later = await stack.gateway.GetJob(jobs_pb2.GetJobRequest(job_id=job.job_id))
    assert (later.state, later.done) == ("cancelled", cancelled.done)
    got = await results(stack, job.job_id)
    assert len(got) == cancelled.done and len({r.index for r in got}) == cancelled.done
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stack.gateway.CancelJob(jobs_pb2.CancelJobRequest(job_id=job.job_id))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "already" in err.value.details()


async def test_generate_job_equals_single_generates(stack: Stack) -> None:
    prompts = ["The river", "A pipeline splits", "What is the capital", "Rain fell", "Numbers such as"]
    lines = [json.dumps({"id": f"p{i}", "prompt": p, "max_tokens": 4 + i}) for i, p in enumerate(prompts)]
    job = await stack.gateway.SubmitJob(jobs_pb2.SubmitJobRequest(
        model=LLM, kind="generate", jsonl="\n".join(lines).encode(), params=jobs_pb2.JobParams(task_items=2)))
    final = await wait_ended(stack, job.job_id)
    assert (final.state, final.done, final.params.temperature) == ("succeeded", 5, 0.0)
    got = await results(stack, job.job_id)
    assert [r.id for r in got] == [f"p{i}" for i in range(5)]
    for i, (prompt, result) in enumerate(zip(prompts, got)):
        chunks = [c async for c in stack.gateway.Generate(gateway_pb2.GenerateRequest(
            model=LLM, text=prompt, max_tokens=4 + i, temperature=0.0))]
        assert list(result.token_ids) == [c.token_id for c in chunks]
        assert result.text == "".join(c.text for c in chunks)
        assert result.finish_reason == chunks[-1].finish_reason
