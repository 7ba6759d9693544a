"""The scheduler's soft state in Redis: worker membership, placements and the epoch. All Redis I/O is here.

Key layout (prefix `modelgrid:scheduler:`):
  worker:<id>   string, WorkerRecord JSON, TTL = heartbeat TTL; refreshed by every heartbeat
  workers       set of registered worker ids (a member whose key expired is gone)
  epoch         integer, bumped by every placement change
  placements    hash "<model>/<version>" -> PlacementRecord JSON, epoch first: {"epoch":N,...}
  marker        "1", set by the scheduler; its absence means Redis lost the state (restarted empty, flushed)

Every placement change and its epoch bump happen in one Lua script, which also refuses the write when the
record changed since the caller read it (compare-and-set on the record's epoch), so two schedulers never
interleave. The epoch never goes below a floor the caller passes (what workers and this process have
seen), so fencing survives a Redis flush.
"""

from __future__ import annotations

import contextlib
import logging
import re
from typing import AsyncIterator, Iterable, Sequence

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from modelgrid.errors import Unavailable
from services.scheduler.records import PlacementRecord, WorkerRecord

log = logging.getLogger(__name__)

PREFIX = "modelgrid:scheduler:"

# KEYS: worker key, members set. ARGV: record JSON, ttl ms, worker id, epoch key.
# Refresh only an existing key (SET XX); returns the current epoch, or -1 when the key is gone.
_HEARTBEAT = """
if not redis.call('SET', KEYS[1], ARGV[1], 'XX', 'PX', ARGV[2]) then return -1 end
redis.call('SADD', KEYS[2], ARGV[3])
return tonumber(redis.call('GET', KEYS[3]) or '0')
"""

# KEYS: worker key, members set. ARGV: worker id. Removes the member only if its key is really gone,
# so a worker re-registering at that moment is not dropped.
_PRUNE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
return redis.call('SREM', KEYS[2], ARGV[1])
"""

# KEYS: epoch key. ARGV: floor. Raises the epoch to at least floor; returns it.
_RAISE_EPOCH = """
local e = tonumber(redis.call('GET', KEYS[1]) or '0')
local floor = tonumber(ARGV[1])
if e < floor then redis.call('SET', KEYS[1], floor); e = floor end
return e
"""

# KEYS: placements hash, epoch key. ARGV: field, expected epoch (-1 = must be absent), body JSON without
# epoch ('' deletes), floor. Returns the new epoch, or -1 when the record changed meanwhile.
_WRITE_PLACEMENT = """
local cur = redis.call('HGET', KEYS[1], ARGV[1])
local expected = tonumber(ARGV[2])
if cur then
  if tonumber(string.match(cur, '^{"epoch":(%d+)')) ~= expected then return -1 end
elseif expected ~= -1 then
  return -1
end
local epoch = redis.call('INCR', KEYS[2])
local floor = tonumber(ARGV[4])
if epoch <= floor then epoch = floor + 1; redis.call('SET', KEYS[2], epoch) end
if ARGV[3] == '' then
  redis.call('HDEL', KEYS[1], ARGV[1])
else
  redis.call('HSET', KEYS[1], ARGV[1], '{"epoch":' .. string.format('%d', epoch) .. ',' .. string.sub(ARGV[3], 2))
end
return epoch
"""

# KEYS: placements hash. ARGV: field, expected epoch, full JSON. Same-epoch update (readiness); 1 or 0.
_UPDATE_PLACEMENT = """
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if not cur or tonumber(string.match(cur, '^{"epoch":(%d+)')) ~= tonumber(ARGV[2]) then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
return 1
"""


_REFUSED_FOR_NOW = re.compile(r"\b(READONLY|OOM|LOADING|MASTERDOWN|TRYAGAIN)\b")


@contextlib.asynccontextmanager
async def redis_errors() -> AsyncIterator[None]:
    """A Redis outage becomes Unavailable (retryable), never INTERNAL: unreachable, or refusing writes for a
    while (a replica after a failover: READONLY; out of memory; loading; its primary down)."""
    try:
        yield
    except (RedisConnectionError, RedisTimeoutError, OSError) as err:
        raise Unavailable(f"the scheduler cannot reach Redis: {err}") from err
    except ResponseError as err:  # inside a Lua script these arrive as a plain ResponseError
        if _REFUSED_FOR_NOW.search(str(err)) is None:
            raise
        raise Unavailable(f"Redis refuses the scheduler's writes for now: {err}") from err


class SchedulerState:
    """Membership, placements and epoch over one redis.asyncio client. Redis outages raise Unavailable."""

    def __init__(self, client: aioredis.Redis, prefix: str = PREFIX) -> None:
        self._redis = client
        self._prefix = prefix
        self._members = prefix + "workers"
        self._epoch = prefix + "epoch"
        self._placements = prefix + "placements"
        self._marker = prefix + "marker"
        self._heartbeat = client.register_script(_HEARTBEAT)
        self._prune = client.register_script(_PRUNE)
        self._raise_epoch = client.register_script(_RAISE_EPOCH)
        self._write = client.register_script(_WRITE_PLACEMENT)
        self._update = client.register_script(_UPDATE_PLACEMENT)

    @classmethod
    def from_url(cls, url: str) -> SchedulerState:
        return cls(aioredis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5))

    async def close(self) -> None:
        await self._redis.aclose()

    def _worker_key(self, worker_id: str) -> str:
        return f"{self._prefix}worker:{worker_id}"

    @staticmethod
    def _field(model: str, version: str) -> str:
        return f"{model}/{version}"

    async def claim_marker(self) -> bool:
        """Set the marker; True when it was missing (a fresh, restarted or flushed Redis)."""
        async with redis_errors():
            return bool(await self._redis.set(self._marker, "1", nx=True))

    # -- membership -------------------------------------------------------------------------------

    async def register(self, worker: WorkerRecord, ttl_s: float) -> None:
        async with redis_errors():
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.set(self._worker_key(worker.worker_id), worker.to_json(), px=max(1, int(ttl_s * 1000)))
                pipe.sadd(self._members, worker.worker_id)
                await pipe.execute()

    async def heartbeat(self, worker: WorkerRecord, ttl_s: float) -> int | None:
        """Refresh a registered worker; its epoch, or None when it is not registered (expired or unknown)."""
        async with redis_errors():
            epoch = await self._heartbeat(
                keys=[self._worker_key(worker.worker_id), self._members, self._epoch],
                args=[worker.to_json(), max(1, int(ttl_s * 1000)), worker.worker_id],
            )
        return None if int(epoch) < 0 else int(epoch)

    async def get_worker(self, worker_id: str) -> WorkerRecord | None:
        async with redis_errors():
            raw = await self._redis.get(self._worker_key(worker_id))
        return WorkerRecord.from_json(raw) if raw else None

    async def get_workers(self, worker_ids: Iterable[str]) -> dict[str, WorkerRecord]:
        """The live records of these workers, by id (an expired one is left out)."""
        ids = sorted(set(worker_ids))
        if not ids:
            return {}
        async with redis_errors():
            raws = await self._redis.mget([self._worker_key(i) for i in ids])
        return _records(ids, raws)

    async def workers_and_epoch(self, worker_ids: Iterable[str]) -> tuple[dict[str, WorkerRecord], int]:
        """get_workers and the stored epoch, in one round trip (what a route needs)."""
        ids = sorted(set(worker_ids))
        async with redis_errors():
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.get(self._epoch)
                if ids:
                    pipe.mget([self._worker_key(i) for i in ids])
                epoch, *found = await pipe.execute()
        return _records(ids, found[0] if found else []), int(epoch or 0)

    async def member_ids(self) -> set[str]:
        """Ids in the member set, their key expired or not (who was registered before a restart)."""
        async with redis_errors():
            return {i.decode() for i in await self._redis.smembers(self._members)}

    async def workers(self) -> list[WorkerRecord]:
        """Live members (their key has not expired), by id."""
        async with redis_errors():
            ids = await self._redis.smembers(self._members)
        found = await self.get_workers(i.decode() for i in ids)
        return [found[i] for i in sorted(found)]

    async def prune_expired(self) -> list[str]:
        """Drop members whose key expired; the ids dropped."""
        async with redis_errors():
            ids = sorted(i.decode() for i in await self._redis.smembers(self._members))
            if not ids:
                return []
            async with self._redis.pipeline(transaction=False) as pipe:
                for i in ids:
                    pipe.exists(self._worker_key(i))
                exists = await pipe.execute()
            removed = []
            for i, present in zip(ids, exists):
                if not present and await self._prune(keys=[self._worker_key(i), self._members], args=[i]):
                    removed.append(i)
        return removed

    async def remove_worker(self, worker_id: str) -> bool:
        async with redis_errors():
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.delete(self._worker_key(worker_id))
                pipe.srem(self._members, worker_id)
                deleted, _ = await pipe.execute()
        return bool(deleted)

    # -- epoch and placements ---------------------------------------------------------------------

    async def epoch(self) -> int:
        async with redis_errors():
            raw = await self._redis.get(self._epoch)
        return int(raw or 0)

    async def raise_epoch(self, floor: int) -> int:
        """Make the epoch at least floor (after a Redis flush, workers know newer epochs); returns it."""
        async with redis_errors():
            return int(await self._raise_epoch(keys=[self._epoch], args=[int(floor)]))

    async def placements(self) -> dict[tuple[str, str], PlacementRecord]:
        async with redis_errors():
            raw = await self._redis.hgetall(self._placements)
        records = (PlacementRecord.from_json(v) for v in raw.values())
        return {r.key: r for r in records}

    async def get_placement(self, model: str, version: str) -> PlacementRecord | None:
        async with redis_errors():
            raw = await self._redis.hget(self._placements, self._field(model, version))
        return PlacementRecord.from_json(raw) if raw else None

    async def write_placement(
        self, record: PlacementRecord, expected_epoch: int | None, floor: int = 0
    ) -> PlacementRecord | None:
        """Store record under a new epoch, if the stored one still has expected_epoch (None: absent).

        Returns the record with its new epoch, or None when someone else changed it first.
        """
        epoch = await self._write_script(record.model, record.version, expected_epoch, record.body_json(), floor)
        if epoch is None:
            return None
        record.epoch = epoch
        return record

    async def delete_placement(self, model: str, version: str, expected_epoch: int, floor: int = 0) -> int | None:
        """Remove a version's placement, bumping the epoch; the new epoch, or None on a conflict."""
        return await self._write_script(model, version, expected_epoch, "", floor)

    async def _write_script(self, model: str, version: str, expected: int | None, body: str, floor: int) -> int | None:
        async with redis_errors():
            epoch = int(await self._write(
                keys=[self._placements, self._epoch],
                args=[self._field(model, version), -1 if expected is None else expected, body, int(floor)],
            ))
        return None if epoch < 0 else epoch

    async def update_placement(self, record: PlacementRecord) -> bool:
        """Rewrite a record without a new epoch (readiness); False when its epoch changed meanwhile."""
        async with redis_errors():
            done = await self._update(
                keys=[self._placements],
                args=[self._field(record.model, record.version), record.epoch, record.to_json()],
            )
        return bool(done)


def _records(ids: Sequence[str], raws: Sequence[bytes | None]) -> dict[str, WorkerRecord]:
    """MGET's answers for these worker ids: the live records, by id."""
    return {i: WorkerRecord.from_json(raw) for i, raw in zip(ids, raws) if raw}
