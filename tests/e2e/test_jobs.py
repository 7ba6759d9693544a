"""Batch jobs on real processes (tests/e2e/cluster.py): Redis, registry, scheduler, gateway and 4 CPU workers; a
random BERT registered with the CLI as 2 stages x 2 replicas. One corpus of 10,000 different texts, and as the
independent reference one Gateway.Embed call per text. Every job below must give back, for every input in
input order with its id, the reference vector (allclose 1e-5):

  1. test_cli_job_of_10000_texts_equals_single_embeds: `modelgrid jobs submit --wait --output` (progress bar,
     results file); a malformed JSONL line fails the submission (exit 1, the line named) and no job starts.
  2. test_kill_9_a_worker_mid_job: a worker holding a stage is killed with SIGKILL while the job runs; its tasks
     run again on the other replica; no item is lost or duplicated (count and ids).
  3. test_scheduler_killed_and_restarted_mid_job: the job resumes from Redis and the registry and completes.
  4. test_cli_status_list_cancel: `jobs status`, `jobs list`, `jobs cancel` (finished items stay, and say so).
  5. test_async_sdk: modelgrid.AsyncClient's job calls.
"""

from __future__ import annotations

import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

import modelgrid
from modelgrid.errors import FailedPrecondition, NotFound
from modelgrid.model import write_random_checkpoint
from modelgrid.v1 import gateway_pb2, jobs_pb2
from tests.e2e.cluster import Cluster
from tests.support import word_texts

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

MODEL = "jobs-bert"
N = 10_000


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("jobs")
    platform = Cluster(root, workers=4)
    try:
        platform.start()
        checkpoint = write_random_checkpoint(root / "bert", "bert", num_layers=2, hidden_size=32, num_heads=4,
                                             vocab_size=300, max_position_embeddings=64, seed=3)
        platform.register(checkpoint, MODEL, replicas=2, stages=2)
        platform.wait_replicated(MODEL, 2)
        yield platform
    finally:
        platform.stop()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], list[str], Path]:
    """(ids, texts, the JSONL file): 10,000 different texts of 1-24 words."""
    texts = word_texts(N)
    ids = [f"doc-{i:05d}" for i in range(N)]
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    path.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in zip(ids, texts)))
    return ids, texts, path


@pytest.fixture(scope="module")
def reference(cluster: Cluster, corpus: tuple[list[str], list[str], Path]) -> np.ndarray:
    """One Gateway.Embed call per text (8 clients at once)."""
    _, texts, _ = corpus
    stub = cluster.gateway_stub
    started = time.monotonic()

    def one(text: str) -> list[float]:
        return list(stub.Embed(gateway_pb2.EmbedRequest(model=MODEL, texts=[text]), timeout=60).embeddings[0].values)

    with ThreadPoolExecutor(8) as pool:
        vectors = np.asarray(list(pool.map(one, texts, chunksize=64)), dtype=np.float32)
    print(f"\n[reference] {N} single Embed calls in {time.monotonic() - started:.1f} s")
    return vectors


def check_results(cluster: Cluster, job_id: str, ids: list[str], reference: np.ndarray) -> None:
    got = list(cluster.gateway_stub.GetJobResults(jobs_pb2.GetJobResultsRequest(job_id=job_id), timeout=120))
    assert len(got) == N  # nothing lost, nothing duplicated
    assert [r.index for r in got] == list(range(N)) and [r.id for r in got] == ids
    assert not any(r.error for r in got)
    np.testing.assert_allclose(np.asarray([r.embedding for r in got], dtype=np.float32), reference, atol=1e-5, rtol=0)


def submit(cluster: Cluster, path: Path, task_items: int) -> str:
    request = jobs_pb2.SubmitJobRequest(model=MODEL, kind="embed", jsonl=path.read_bytes(),
                                        params=jobs_pb2.JobParams(task_items=task_items))
    return cluster.gateway_stub.SubmitJob(request, timeout=60).job_id


def wait_done(cluster: Cluster, job_id: str, done: int, timeout_s: float = 120) -> jobs_pb2.Job:
    """Until at least `done` items finished (or the job ended)."""
    for job in cluster.gateway_stub.WatchJob(jobs_pb2.WatchJobRequest(job_id=job_id, interval_s=0.1),
                                             timeout=timeout_s):
        if job.done >= done or job.state in ("succeeded", "failed", "cancelled"):
            return job
    raise AssertionError("the watch ended before the job did")


def test_cli_job_of_10000_texts_equals_single_embeds(cluster: Cluster, corpus, reference: np.ndarray,
                                                      tmp_path: Path) -> None:
    ids, _, path = corpus
    out = tmp_path / "vectors.jsonl"
    started = time.monotonic()
    run = cluster.cli("jobs", "submit", "--model", MODEL, "--kind", "embed", "--input", str(path), "--output",
                      str(out), "--wait", "--json", timeout_s=300)
    elapsed = time.monotonic() - started
    assert run.returncode == 0, run.stderr + cluster.logs_tail()
    job = json.loads(run.stdout)
    assert (job["state"], job["done"], job["failed"], job["total"]) == ("succeeded", N, 0, N)
    assert f"wrote {N} results to {out}" in run.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["id"] for line in lines] == ids
    np.testing.assert_allclose(np.asarray([line["embedding"] for line in lines], dtype=np.float32), reference,
                               atol=1e-5, rtol=0)
    print(f"\n[job] {N} texts over 2 replicas: {elapsed:.1f} s with the CLI, {job['items_per_s']:.0f} items/s")

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "text": "fine"}\n{"id": "b", "text": "fine too"}\n{"id": "c", "text": }\n')
    before = cluster.gateway_stub.ListJobs(jobs_pb2.ListJobsRequest(), timeout=10).jobs
    run = cluster.cli("jobs", "submit", "--model", MODEL, "--kind", "embed", "--input", str(bad), "--wait")
    assert run.returncode == 1
    assert "error: INVALID_ARGUMENT: line 3: not valid JSON" in run.stderr, run.stderr
    assert len(cluster.gateway_stub.ListJobs(jobs_pb2.ListJobsRequest(), timeout=10).jobs) == len(before)


def test_kill_9_a_worker_mid_job(cluster: Cluster, corpus, reference: np.ndarray) -> None:
    ids, _, path = corpus
    failed_before = cluster.metric("modelgrid_gateway_job_tasks_total", outcome="failed")
    job_id = submit(cluster, path, task_items=50)
    at_kill = wait_done(cluster, job_id, N // 5)
    assert at_kill.state == "running", "the job ended before the kill"
    victim = "w0"
    cluster.workers[victim].kill()  # SIGKILL, mid-job
    final = wait_done(cluster, job_id, N, timeout_s=300)
    assert (final.state, final.done, final.failed) == ("succeeded", N, 0), final.error
    assert cluster.metric("modelgrid_gateway_job_tasks_total", outcome="failed") > failed_before  # tasks re-ran
    check_results(cluster, job_id, ids, reference)
    print(f"\n[kill -9] {victim} killed at {at_kill.done}/{N}; the job completed at {final.items_per_s:.0f} items/s")
    Cluster.start_services([cluster.workers[victim]])
    cluster.wait_replicated(MODEL, 2)


def test_scheduler_killed_and_restarted_mid_job(cluster: Cluster, corpus, reference: np.ndarray) -> None:
    ids, _, path = corpus
    job_id = submit(cluster, path, task_items=50)
    at_kill = wait_done(cluster, job_id, N // 5)
    assert at_kill.state == "running", "the job ended before the kill"
    cluster.scheduler.kill()  # SIGKILL: leases and queued tasks stay in Redis
    time.sleep(1.0)
    cluster.scheduler.start()
    final = wait_done(cluster, job_id, N, timeout_s=300)
    assert (final.state, final.done, final.failed) == ("succeeded", N, 0), final.error
    check_results(cluster, job_id, ids, reference)


def test_cli_status_list_cancel(cluster: Cluster, corpus) -> None:
    _, _, path = corpus
    job_id = submit(cluster, path, task_items=20)
    wait_done(cluster, job_id, 100)
    run = cluster.cli("jobs", "cancel", job_id)
    assert run.returncode == 0, run.stderr
    done = int(run.stdout.split(": ")[1].split(" of ")[0])
    assert run.stdout.startswith(f"cancelled {job_id}: ") and 100 <= done < N
    time.sleep(1.0)  # tasks in flight at the cancel end now; their results must not count
    status = json.loads(cluster.cli("jobs", "status", job_id, "--json").stdout)
    assert (status["state"], status["done"]) == ("cancelled", done)
    listed = json.loads(cluster.cli("jobs", "list", "--state", "cancelled", "--json").stdout)
    assert job_id in [j["job_id"] for j in listed]
    again = cluster.cli("jobs", "cancel", job_id)
    assert again.returncode == 1 and "FAILED_PRECONDITION" in again.stderr and "already" in again.stderr
    results = cluster.cli("jobs", "results", job_id)
    assert results.returncode == 0 and len(results.stdout.splitlines()) == done


def test_async_sdk(cluster: Cluster, corpus, reference: np.ndarray) -> None:
    ids, texts, _ = corpus

    async def run() -> None:
        async with modelgrid.AsyncClient(cluster.gateway.address, timeout=120) as client:
            items = [{"id": i, "text": t} for i, t in zip(ids[:300], texts[:300])]
            job = await client.submit_job(MODEL, "embed", items=items, task_items=32)
            seen = [j async for j in client.watch_job(job.job_id, interval_s=0.1)]
            assert seen[-1].state == "succeeded" and seen[-1].done == 300 and seen[-1].ended
            results = [r async for r in client.job_results(job.job_id, start=100)]
            assert [r.id for r in results] == ids[100:300]
            np.testing.assert_allclose(np.asarray([r.embedding for r in results], dtype=np.float32),
                                       reference[100:300], atol=1e-5, rtol=0)
            assert job.job_id in [j.job_id for j in await client.list_jobs(states=["succeeded"])]
            with pytest.raises(FailedPrecondition, match="already"):
                await client.cancel_job(job.job_id)
            with pytest.raises(NotFound, match="no job"):
                await client.get_job("job_0000")

    asyncio.run(run())
