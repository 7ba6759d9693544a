"""The public batch-job calls: submit (check, record in the registry, hand to the scheduler), get, watch, cancel,
list and results, each limited to the caller's own jobs unless the caller is an admin.

Job records pass through as the registry's messages (like ListModels); this module only reads their owner
and state.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from dataclasses import replace
from typing import Any, AsyncIterator, Sequence

from modelgrid.errors import FailedPrecondition, InvalidArgument, ModelGridError, NotFound
from modelgrid.jobs import ENDED
from modelgrid.v1 import jobs_pb2
from services.gateway import convert
from services.gateway.auth import Principal
from services.gateway.job_clients import JobQueueClient, JobStoreClient
from services.gateway.job_inputs import JobSubmission
from services.gateway.upstream import DEFAULT_TIMEOUT_S, VersionCache
from services.gateway.validation import Limits, parse_generate

log = logging.getLogger(__name__)

KIND_NEEDS = {"embed": "encoder", "generate": "decoder"}
WITH_ARTICLE = {"encoder": "an encoder", "decoder": "a decoder", "embed": "an embed", "generate": "a generate"}
MAX_TASK_ITEMS = 100_000
MIN_WATCH_S, DEFAULT_WATCH_S = 0.1, 0.5
DEFAULT_LIST = 50


class JobsApi:
    def __init__(self, store: JobStoreClient, queue: JobQueueClient, versions: VersionCache, limits: Limits) -> None:
        self.store = store
        self.queue = queue
        self._versions = versions
        self._limits = limits

    async def submit(self, sub: JobSubmission, caller: Principal, timeout: float | None) -> jobs_pb2.Job:
        """Record the job (all items in one transaction) and ask the scheduler to split it. When the scheduler
        cannot be reached the job stays queued: the scheduler picks it up from the registry within seconds."""
        version = await self._versions.resolve(sub.model, sub.version, timeout)
        if version.kind != KIND_NEEDS[sub.kind]:
            other = "generate" if sub.kind == "embed" else "embed"
            raise FailedPrecondition(f"{version.label} ({version.architecture}) is {WITH_ARTICLE[version.kind]} model: "
                                     f"{sub.kind} jobs run on {KIND_NEEDS[sub.kind]} models; submit "
                                     f"{WITH_ARTICLE[other]} job instead")
        settings = self._check_settings(sub)
        request = jobs_pb2.CreateJobRequest(
            model=version.model, version=version.version, kind=sub.kind, owner=caller.key_id,
            params=convert.job_settings_to_proto(settings), items=convert.job_items_to_proto(sub.items),
        )
        job = await self.store.create(request, timeout)
        try:
            await self.queue.enqueue(job.job_id, timeout)
        except ModelGridError as err:
            log.warning("job %s recorded, but the scheduler did not take it now (it will from the registry): %s",
                        job.job_id, err.message)
        return job

    def _check_settings(self, sub: JobSubmission) -> Any:
        s = sub.settings
        if not 0 <= s.task_items <= MAX_TASK_ITEMS:
            raise InvalidArgument(f"task_items must be in [0, {MAX_TASK_ITEMS}] (0 = the scheduler's), got {s.task_items}")
        if sub.kind == "embed":
            return s
        temperature = 0.0 if s.temperature is None else s.temperature
        parse_generate(model=sub.model, version=sub.version, text="x", token_ids=None, max_tokens=s.max_tokens,
                       temperature=temperature, top_p=s.top_p, top_k=s.top_k, seed=s.seed, stop=s.stop,
                       limits=self._limits)
        # a fixed seed per job: a task that runs again samples the same tokens (item i uses seed + i)
        return replace(s, temperature=temperature, seed=s.seed if s.seed is not None else secrets.randbits(62))

    async def get(self, job_id: str, caller: Principal, timeout: float | None = DEFAULT_TIMEOUT_S) -> jobs_pb2.Job:
        if not job_id:
            raise InvalidArgument("job_id is required")
        job = await self.store.get(job_id, timeout)
        if not caller.admin and job.owner != caller.key_id:
            raise NotFound(f"no job {job_id!r}; list yours with ListJobs (`modelgrid jobs list`)")
        return job

    async def cancel(self, job_id: str, caller: Principal, timeout: float | None) -> jobs_pb2.Job:
        job = await self.get(job_id, caller, timeout)
        if job.state in ENDED:
            raise FailedPrecondition(f"job {job_id} is {job.state} already ({job.done} of {job.total} items done); "
                                     "nothing to cancel")
        job = await self.store.set_state(job_id, "cancelled", timeout)
        try:
            await self.queue.cancel(job_id, timeout)
        except ModelGridError as err:
            log.warning("job %s cancelled in the registry; the scheduler will drop its tasks later: %s", job_id,
                        err.message)
        log.info("job %s cancelled with %d of %d items done", job_id, job.done, job.total)
        return job

    async def list(self, states: Sequence[str], limit: int, caller: Principal, timeout: float | None) -> Any:
        owner = "" if caller.admin else caller.key_id
        return await self.store.list(states, limit or DEFAULT_LIST, owner, timeout)

    async def watch(self, job_id: str, interval_s: float, caller: Principal) -> AsyncIterator[jobs_pb2.Job]:
        """The job now, then whenever its state or counts change, until it ends."""
        interval = max(interval_s or DEFAULT_WATCH_S, MIN_WATCH_S)
        last = None
        while True:
            job = await self.get(job_id, caller)
            seen = (job.state, job.done, job.failed)
            if seen != last:
                yield job
                last = seen
            if job.state in ENDED:
                return
            await asyncio.sleep(interval)

    async def results(self, job_id: str, start: int, caller: Principal, timeout: float | None
                      ) -> AsyncIterator[jobs_pb2.JobResult]:
        await self.get(job_id, caller, timeout)
        async for result in self.store.results(job_id, start, timeout):
            yield result
