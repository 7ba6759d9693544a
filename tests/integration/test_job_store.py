"""The registry's durable job records (services/registry/job_db.py) on real SQLite and PostgreSQL, and the JobStore
gRPC service on port 0: items in input order, idempotent results (a task run twice counts once), counts and
state transitions, pending ranges for rebuilding tasks, and results refused once a job was cancelled."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest

from modelgrid.channel import aio_channel
from modelgrid.errors import FailedPrecondition, InvalidArgument, NotFound
from modelgrid.v1 import jobs_pb2, jobs_pb2_grpc
from services.registry.app import start_registry
from services.registry.config import RegistryConfig
from services.registry.db import RegistryDB
from services.registry.job_db import JobDB
from services.registry.job_records import ItemInput, ItemResult, progress


@pytest.fixture()
def jobs(db_url: str) -> JobDB:
    db = RegistryDB(db_url)
    yield JobDB(db)
    db.close()


def _texts(n: int) -> list[ItemInput]:
    return [ItemInput(f"id-{i}", text=f"text {i}") for i in range(n)]


def _vec(i: int) -> bytes:
    return np.full(4, i, dtype="<f4").tobytes()


def test_items_results_and_counts(jobs: JobDB) -> None:
    job = jobs.create("m", "v1", "embed", {"task_items": 3}, _texts(10), owner="key_a")
    assert (job.state, job.total, job.done, job.params) == ("queued", 10, 0, {"task_items": 3})
    assert [(i, it.item_id, it.text) for i, it in jobs.fetch_items(job.job_id, 3, 6)] == [
        (3, "id-3", "text 3"), (4, "id-4", "text 4"), (5, "id-5", "text 5")]
    assert jobs.pending(job.job_id) == [(0, 10)]

    after = jobs.put_results(job.job_id, [ItemResult(i, embedding=_vec(i)) for i in (3, 4, 5)])
    assert (after.state, after.done, after.failed) == ("running", 3, 0) and after.started_unix_ms > 0
    # the same task again (a re-run after a lost lease): nothing new, nothing counted twice
    again = jobs.put_results(job.job_id, [ItemResult(i, embedding=_vec(100 + i)) for i in (3, 4, 5)])
    assert again.done == 3
    assert jobs.pending(job.job_id) == [(0, 3), (6, 10)]

    jobs.put_results(job.job_id, [ItemResult(i, embedding=_vec(i)) for i in (0, 1, 2, 6, 7, 8)])
    last = jobs.put_results(job.job_id, [ItemResult(9, error="prompt too long")])
    assert (last.state, last.done, last.failed) == ("succeeded", 9, 1) and last.finished_unix_ms > 0
    assert progress(last, last.finished_unix_ms + 10_000).eta_s == 0.0
    results = jobs.results(job.job_id, 0, 100)
    assert [r.index for r in results] == list(range(10))
    assert [r.item_id for r in results] == [f"id-{i}" for i in range(10)]
    assert np.frombuffer(results[4].embedding, dtype="<f4").tolist() == [4.0] * 4  # the first write stayed
    assert results[9].error == "prompt too long" and not results[9].embedding
    assert [r.index for r in jobs.results(job.job_id, 8, 1)] == [8]


def test_generate_outputs_and_cancel(jobs: JobDB) -> None:
    items = [ItemInput(str(i), prompt=f"p{i}", max_tokens=i + 1) for i in range(4)]
    job = jobs.create("llm", "v2", "generate", {}, items, owner="")
    assert jobs.fetch_items(job.job_id, 0, 4)[2][1] == ItemInput("2", prompt="p2", max_tokens=3)
    jobs.put_results(job.job_id, [ItemResult(0, text="hi", token_ids=(5, 6), finish_reason="length")])
    got = jobs.results(job.job_id, 0, 10)
    assert (got[0].text, got[0].token_ids, got[0].finish_reason) == ("hi", (5, 6), "length")

    cancelled = jobs.update_state(job.job_id, "cancelled")
    assert (cancelled.state, cancelled.done) == ("cancelled", 1)
    with pytest.raises(FailedPrecondition, match="cancelled"):
        jobs.put_results(job.job_id, [ItemResult(1, text="late")])
    assert jobs.get(job.job_id).done == 1
    assert jobs.update_state(job.job_id, "failed", "x").state == "cancelled"  # an ended job stays ended


def test_list_and_errors(jobs: JobDB) -> None:
    a = jobs.create("m", "v1", "embed", {}, _texts(1), owner="key_a")
    b = jobs.create("m", "v1", "embed", {}, _texts(2), owner="key_b")
    jobs.update_state(b.job_id, "running")
    assert [j.job_id for j in jobs.list()] == [b.job_id, a.job_id]
    assert [j.job_id for j in jobs.list(states=["running"])] == [b.job_id]
    assert [j.job_id for j in jobs.list(owner="key_a")] == [a.job_id]
    with pytest.raises(InvalidArgument, match="unknown job state"):
        jobs.list(states=["done"])
    with pytest.raises(NotFound, match="no job 'job_nope'"):
        jobs.get("job_nope")
    with pytest.raises(InvalidArgument, match="outside"):
        jobs.fetch_items(a.job_id, 0, 5)
    with pytest.raises(InvalidArgument, match="running, failed or cancelled"):
        jobs.update_state(a.job_id, "succeeded")


@pytest.mark.asyncio
async def test_job_store_service(tmp_path: Path) -> None:
    registry = await start_registry(RegistryConfig(listen="127.0.0.1:0", metrics_port=-1, data_dir=str(tmp_path)))
    channel = aio_channel(f"127.0.0.1:{registry.port}")
    try:
        stub = jobs_pb2_grpc.JobStoreStub(channel)
        items = [jobs_pb2.JobItem(id=f"x{i}", text=f"t{i}") for i in range(1200)]
        job = await stub.CreateJob(jobs_pb2.CreateJobRequest(model="m", version="v1", kind="embed", items=items,
                                                             params=jobs_pb2.JobParams(task_items=7)))
        assert job.total == 1200 and job.params.task_items == 7 and job.eta_s == -1
        fetched = await stub.FetchJobItems(jobs_pb2.FetchJobItemsRequest(job_id=job.job_id, start=10, end=12))
        assert [(i.index, i.item.id) for i in fetched.items] == [(10, "x10"), (11, "x11")]
        results = [jobs_pb2.JobResult(index=i, embedding=[i, 0.5]) for i in range(1200) if i != 600]
        await stub.PutJobResults(jobs_pb2.PutJobResultsRequest(job_id=job.job_id, results=results))
        pending = await stub.ListPendingItems(jobs_pb2.GetJobRequest(job_id=job.job_id))
        assert (list(pending.starts), list(pending.ends)) == ([600], [601])
        streamed = [r async for r in stub.StreamJobResults(jobs_pb2.GetJobResultsRequest(job_id=job.job_id))]
        assert [r.index for r in streamed] == [i for i in range(1200) if i != 600]  # pages of 512, in order
        assert streamed[700].id == "x701" and list(streamed[700].embedding) == [701.0, 0.5]
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.CreateJob(jobs_pb2.CreateJobRequest(model="m", version="v1", kind="classify", items=items))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        await channel.close()
        await registry.stop(0)
