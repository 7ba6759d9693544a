"""Batch jobs under API keys (a real registry and gateway with auth required; the scheduler is a dead port, so
jobs stay queued): a job belongs to the key that submitted it; another user key sees NOT_FOUND for it and does
not list it; an admin key sees every job. A job recorded while the scheduler is down is kept (queued)."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from modelgrid.model import write_random_checkpoint
from modelgrid.upload import aiter_upload_chunks, plan_upload
from modelgrid.v1 import common_pb2, jobs_pb2
from tests.integration.test_auth import BOOT, bearer, platform

pytestmark = pytest.mark.timeout(120)


async def test_jobs_belong_to_their_key(tmp_path: Path) -> None:
    bert = write_random_checkpoint(tmp_path / "bert", "bert", num_layers=2, hidden_size=32, num_heads=4,
                                   vocab_size=300, max_position_embeddings=64, seed=3)
    async with platform(tmp_path) as plat:
        gw, admin = plat.stub(), bearer(BOOT)
        await gw.RegisterModel(aiter_upload_chunks(plan_upload(bert), "enc"), metadata=admin)
        keys = {}
        for name in ("alice", "bob"):
            created = await gw.CreateKey(common_pb2.CreateKeyRequest(name=name), metadata=admin)
            keys[name] = bearer(created.secret)
        request = jobs_pb2.SubmitJobRequest(model="enc", kind="embed", items=jobs_pb2.JobItems(
            items=[jobs_pb2.JobItem(text="one"), jobs_pb2.JobItem(text="two")]))
        job = await gw.SubmitJob(request, metadata=keys["alice"])
        assert (job.state, job.total) == ("queued", 2)  # the scheduler is down: it takes the job when it is back

        assert (await gw.GetJob(jobs_pb2.GetJobRequest(job_id=job.job_id), metadata=keys["alice"])).total == 2
        for call in (gw.GetJob(jobs_pb2.GetJobRequest(job_id=job.job_id), metadata=keys["bob"]),
                     gw.CancelJob(jobs_pb2.CancelJobRequest(job_id=job.job_id), metadata=keys["bob"])):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as err:
            _ = [r async for r in gw.GetJobResults(jobs_pb2.GetJobResultsRequest(job_id=job.job_id),
                                                   metadata=keys["bob"])]
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert not (await gw.ListJobs(jobs_pb2.ListJobsRequest(), metadata=keys["bob"])).jobs
        assert [j.job_id for j in (await gw.ListJobs(jobs_pb2.ListJobsRequest(), metadata=admin)).jobs] == [job.job_id]
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await gw.GetJob(jobs_pb2.GetJobRequest(job_id=job.job_id))  # no key at all
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED

        cancelled = await gw.CancelJob(jobs_pb2.CancelJobRequest(job_id=job.job_id), metadata=keys["alice"])
        assert (cancelled.state, cancelled.done) == ("cancelled", 0)
