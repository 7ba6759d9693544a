"""Batch-job tasks in Redis: what is queued, who holds which lease until when. All job Redis I/O is here.

Key layout (prefix `modelgrid:jobs:`):
  active               zset job id -> created unix ms: the jobs with tasks, oldest served first
  job:<id>             hash meta (JobMeta JSON), state ("running" | "failed"), error, tasks (count), finished
  job:<id>:tasks       hash task number -> {"s": start, "e": end, "st": queued|leased|done|failed, "a": attempts,
                       "l": lease id, "x": [workers to avoid]}
  job:<id>:queue       list of queued task numbers
  leases               zset "<job id>|<task>" -> lease expiry unix ms
  lease_workers        hash "<job id>|<task>" -> comma-separated worker ids of the lease's route (the load)

Every change of a task is one Lua script, so two schedulers (or a scheduler and its restart) never hand out
a task twice under the same lease, and a finish, a failure and an expiry of one task never interleave.
A finished task stays finished: the results are in the registry already, whoever wrote them.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import redis.asyncio as aioredis

from services.scheduler.records import Route
from services.scheduler.state import redis_errors

log = logging.getLogger(__name__)

PREFIX = "modelgrid:jobs:"
MAX_AVOID = 16  # workers remembered per task

# KEYS: job, tasks, queue, active. ARGV: job id, created ms, meta JSON, then one task JSON per task.
_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local n = #ARGV - 3
redis.call('HSET', KEYS[1], 'meta', ARGV[3], 'state', 'running', 'error', '', 'tasks', n, 'finished', 0)
for i = 1, n do
  redis.call('HSET', KEYS[2], i - 1, ARGV[i + 3])
  redis.call('RPUSH', KEYS[3], i - 1)
end
redis.call('ZADD', KEYS[4], ARGV[2], ARGV[1])
return n
"""

# KEYS: job, tasks, queue, leases. ARGV: job id, lease id, expiry ms. The next queued task, now leased.
_POP = """
if redis.call('HGET', KEYS[1], 'state') ~= 'running' then return false end
while true do
  local idx = redis.call('LPOP', KEYS[3])
  if not idx then return false end
  local raw = redis.call('HGET', KEYS[2], idx)
  if raw then
    local t = cjson.decode(raw)
    if t.st == 'queued' then
      t.st = 'leased'; t.a = t.a + 1; t.l = ARGV[2]
      local out = cjson.encode(t)
      redis.call('HSET', KEYS[2], idx, out)
      redis.call('ZADD', KEYS[4], ARGV[3], ARGV[1] .. '|' .. idx)
      return {idx, out}
    end
  end
end
"""

# KEYS: tasks, queue, leases, lease_workers. ARGV: task, lease id, member, workers ('' = give the task back
# to the front of the queue, not counted as an attempt).
_ROUTE = """
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then return 0 end
local t = cjson.decode(raw)
if t.st ~= 'leased' or t.l ~= ARGV[2] then return 0 end
if ARGV[4] ~= '' then
  redis.call('HSET', KEYS[4], ARGV[3], ARGV[4])
  return 1
end
t.st = 'queued'; t.a = t.a - 1; t.l = ''
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(t))
redis.call('LPUSH', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[3])
return 1
"""

# KEYS: tasks, leases. ARGV: task, lease id, member, new expiry ms.
_EXTEND = """
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then return 0 end
local t = cjson.decode(raw)
if t.st ~= 'leased' or t.l ~= ARGV[2] then return 0 end
redis.call('ZADD', KEYS[2], 'XX', ARGV[4], ARGV[3])
return 1
"""

# KEYS: job, tasks, queue, leases, lease_workers, active. ARGV: job id, task, member.
# -1 unknown task, 0 finished before, 1 finished now, 2 finished now and it was the job's last task (removed).
_FINISH = """
local raw = redis.call('HGET', KEYS[2], ARGV[2])
if not raw then return -1 end
local t = cjson.decode(raw)
if t.st == 'done' then return 0 end
t.st = 'done'; t.l = ''
redis.call('HSET', KEYS[2], ARGV[2], cjson.encode(t))
redis.call('LREM', KEYS[3], 0, ARGV[2])
redis.call('ZREM', KEYS[4], ARGV[3])
redis.call('HDEL', KEYS[5], ARGV[3])
local finished = redis.call('HINCRBY', KEYS[1], 'finished', 1)
if finished < tonumber(redis.call('HGET', KEYS[1], 'tasks')) then return 1 end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
redis.call('ZREM', KEYS[6], ARGV[1])
return 2
"""

# KEYS: job, tasks, queue, leases, lease_workers. ARGV: task, member, lease id ('' = only if the lease expired
# by ARGV[4] = now ms), now ms, max attempts, workers to avoid (JSON list), reason.
# -1 stale (another lease, or not expired), 1 queued again, 0 out of attempts: the job failed.
_RELEASE = """
local raw = redis.call('HGET', KEYS[2], ARGV[1])
if not raw then return -1 end
local t = cjson.decode(raw)
if t.st ~= 'leased' then return -1 end
if ARGV[3] == '' then
  local score = redis.call('ZSCORE', KEYS[4], ARGV[2])
  if score and tonumber(score) > tonumber(ARGV[4]) then return -1 end
elseif t.l ~= ARGV[3] then
  return -1
end
redis.call('ZREM', KEYS[4], ARGV[2])
redis.call('HDEL', KEYS[5], ARGV[2])
if type(t.x) ~= 'table' then t.x = {} end
for _, w in ipairs(cjson.decode(ARGV[6])) do
  if #t.x < tonumber(ARGV[8]) then table.insert(t.x, w) end
end
t.l = ''
if t.a >= tonumber(ARGV[5]) then
  t.st = 'failed'
  redis.call('HSET', KEYS[2], ARGV[1], cjson.encode(t))
  redis.call('HSET', KEYS[1], 'state', 'failed', 'error', ARGV[7])
  return 0
end
t.st = 'queued'
redis.call('HSET', KEYS[2], ARGV[1], cjson.encode(t))
redis.call('RPUSH', KEYS[3], ARGV[1])
return 1
"""

# KEYS: job, tasks, queue, leases, lease_workers, active. ARGV: job id. Forget a job and its leases.
_DROP = """
local n = tonumber(redis.call('HGET', KEYS[1], 'tasks') or '0')
for i = 0, n - 1 do
  local m = ARGV[1] .. '|' .. i
  redis.call('ZREM', KEYS[4], m)
  redis.call('HDEL', KEYS[5], m)
end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
return redis.call('ZREM', KEYS[6], ARGV[1])
"""


@dataclass(frozen=True)
class JobMeta:
    """What a lease needs to know of its job (copied from the registry's record when the tasks are made)."""

    job_id: str
    model: str
    version: str
    kind: str
    params: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> JobMeta:
        return cls(**json.loads(text))


@dataclass(frozen=True)
class JobStatus:
    meta: JobMeta
    state: str  # "running" | "failed"
    error: str
    tasks: int
    finished: int


@dataclass(frozen=True)
class LeasedTask:
    job_id: str
    task: int
    lease_id: str
    start: int
    end: int
    attempt: int
    avoid: tuple[str, ...]

    @property
    def member(self) -> str:
        return member(self.job_id, self.task)


@dataclass(frozen=True)
class StoredJob:
    """A job as the registry records it (what the scheduler needs of it)."""

    meta: JobMeta
    state: str
    created_ms: int
    total: int


@dataclass(frozen=True)
class Lease:
    """A leased task with its job and the route it must run on."""

    meta: JobMeta
    task: LeasedTask
    route: Route
    lease_s: float


def member(job_id: str, task: int) -> str:
    return f"{job_id}|{task}"


class JobTasks:
    """Tasks of batch jobs over one redis.asyncio client. Redis outages raise Unavailable."""

    def __init__(self, client: aioredis.Redis, prefix: str = PREFIX) -> None:
        self._redis = client
        self._prefix = prefix
        self._active = prefix + "active"
        self._leases = prefix + "leases"
        self._lease_workers = prefix + "lease_workers"
        self._create = client.register_script(_CREATE)
        self._pop = client.register_script(_POP)
        self._route = client.register_script(_ROUTE)
        self._extend = client.register_script(_EXTEND)
        self._finish = client.register_script(_FINISH)
        self._release = client.register_script(_RELEASE)
        self._drop = client.register_script(_DROP)

    @classmethod
    def from_url(cls, url: str) -> JobTasks:
        return cls(aioredis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5))

    async def close(self) -> None:
        await self._redis.aclose()

    def _keys(self, job_id: str) -> tuple[str, str, str]:
        job = f"{self._prefix}job:{job_id}"
        return job, job + ":tasks", job + ":queue"

    async def create(self, meta: JobMeta, created_ms: int, spans: Sequence[tuple[int, int]]) -> int:
        """Queue one task per span unless the job has tasks already; how many were created (0: it had)."""
        tasks = [json.dumps({"s": s, "e": e, "st": "queued", "a": 0, "l": "", "x": []}) for s, e in spans]
        if not tasks:
            return 0
        job, task_hash, queue = self._keys(meta.job_id)
        async with redis_errors():
            return int(await self._create(keys=[job, task_hash, queue, self._active],
                                          args=[meta.job_id, created_ms, meta.to_json(), *tasks]))

    async def active(self) -> list[str]:
        """Job ids with tasks in Redis, oldest first."""
        async with redis_errors():
            return [j.decode() for j in await self._redis.zrange(self._active, 0, -1)]

    async def status(self, job_id: str) -> JobStatus | None:
        return (await self.statuses([job_id]))[0]

    async def statuses(self, job_ids: Sequence[str]) -> list[JobStatus | None]:
        """status() of each job, in one round trip."""
        async with redis_errors():
            async with self._redis.pipeline(transaction=False) as pipe:
                for job_id in job_ids:
                    pipe.hgetall(self._keys(job_id)[0])
                raws = await pipe.execute()
        return [_status(raw) for raw in raws]

    async def active_and_routes(self) -> tuple[list[str], list[list[str]]]:
        """What a lease looks at, in one round trip: active() and the worker ids of every live lease's route."""
        async with redis_errors():
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.zrange(self._active, 0, -1)
                pipe.hvals(self._lease_workers)
                job_ids, routes = await pipe.execute()
        return [j.decode() for j in job_ids], [v.decode().split(",") for v in routes]

    async def pop(self, job_id: str, lease_id: str, expiry_ms: int) -> LeasedTask | None:
        job, task_hash, queue = self._keys(job_id)
        async with redis_errors():
            got = await self._pop(keys=[job, task_hash, queue, self._leases], args=[job_id, lease_id, expiry_ms])
        if not got:
            return None
        task = json.loads(got[1])
        avoid = task.get("x") if isinstance(task.get("x"), list) else []
        return LeasedTask(job_id, int(got[0]), lease_id, int(task["s"]), int(task["e"]), int(task["a"]), tuple(avoid))

    async def set_route(self, task: LeasedTask, workers: Sequence[str]) -> bool:
        """Record the lease's route (its load on the workers); with no workers, give the task back unused."""
        _, task_hash, queue = self._keys(task.job_id)
        async with redis_errors():
            return bool(await self._route(
                keys=[task_hash, queue, self._leases, self._lease_workers],
                args=[task.task, task.lease_id, task.member, ",".join(workers)],
            ))

    async def extend(self, job_id: str, task: int, lease_id: str, expiry_ms: int) -> bool:
        _, task_hash, _ = self._keys(job_id)
        async with redis_errors():
            return bool(await self._extend(keys=[task_hash, self._leases],
                                           args=[task, lease_id, member(job_id, task), expiry_ms]))

    async def finish(self, job_id: str, task: int) -> int:
        """-1 unknown, 0 finished before, 1 finished, 2 finished and the job's last (its keys are gone)."""
        job, task_hash, queue = self._keys(job_id)
        async with redis_errors():
            return int(await self._finish(keys=[job, task_hash, queue, self._leases, self._lease_workers, self._active],
                                          args=[job_id, task, member(job_id, task)]))

    async def release(
        self, job_id: str, task: int, lease_id: str, now_ms: int, max_attempts: int, avoid: Sequence[str], reason: str
    ) -> int:
        """Give a leased task back (lease_id '' = only if its lease expired by now_ms): 1 queued again,
        0 out of attempts (the job is marked failed with reason), -1 stale."""
        job, task_hash, queue = self._keys(job_id)
        async with redis_errors():
            return int(await self._release(
                keys=[job, task_hash, queue, self._leases, self._lease_workers],
                args=[task, member(job_id, task), lease_id, now_ms, max_attempts, json.dumps(list(avoid)), reason,
                      MAX_AVOID],
            ))

    async def expired(self, now_ms: int) -> list[tuple[str, int]]:
        """(job id, task) of every lease that expired by now_ms."""
        async with redis_errors():
            members = await self._redis.zrangebyscore(self._leases, "-inf", now_ms)
        out = []
        for m in members:
            job_id, _, task = m.decode().rpartition("|")
            out.append((job_id, int(task)))
        return out

    async def drop(self, job_id: str) -> bool:
        """Forget a job's tasks and leases (cancelled, failed or ended elsewhere)."""
        job, task_hash, queue = self._keys(job_id)
        async with redis_errors():
            return bool(await self._drop(keys=[job, task_hash, queue, self._leases, self._lease_workers, self._active],
                                         args=[job_id]))


def _status(raw: dict[bytes, bytes]) -> JobStatus | None:
    if not raw or b"meta" not in raw:
        return None
    return JobStatus(JobMeta.from_json(raw[b"meta"]), raw[b"state"].decode(), raw[b"error"].decode(),
                     int(raw[b"tasks"]), int(raw[b"finished"]))
