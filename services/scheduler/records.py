"""Plain data the scheduler keeps in Redis (as JSON) and hands to its policies. No I/O, no protobuf."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any, TypeVar

from services.scheduler.placement import ModelSizes, StagePlan

READY, LOADING, UNPLACEABLE = "ready", "loading", "unplaceable"

T = TypeVar("T")


def _known(cls: type[T], data: dict[str, Any]) -> T:
    """Build cls from the keys it knows, so records written by a newer scheduler still load."""
    names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class LoadedStageRecord:
    """A stage a worker reports holding in memory."""

    model: str
    version: str
    start: int
    end: int
    param_bytes: int = 0
    epoch: int = 0


@dataclass
class WorkerRecord:
    """What a worker told us in its last registration or heartbeat."""

    worker_id: str
    address: str
    device: str = ""
    total_memory: int = 0
    free_memory: int = 0
    stages: list[LoadedStageRecord] = field(default_factory=list)
    state: str = "serving"  # "serving" | "draining"
    active_sessions: int = 0
    kv_cache_bytes: int = 0
    last_seen_ms: int = 0  # unix ms of the last registration/heartbeat, for heartbeat_age_s

    @property
    def serving(self) -> bool:
        """Draining workers keep what they hold for in-flight sessions but get no new stages or routes."""
        return self.state in ("", "serving")

    def holds(self, model: str, version: str, start: int, end: int) -> bool:
        return any((s.model, s.version, s.start, s.end) == (model, version, start, end) for s in self.stages)

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> WorkerRecord:
        data = json.loads(text)
        data["stages"] = [_known(LoadedStageRecord, s) for s in data.get("stages", [])]
        return _known(cls, data)


@dataclass
class ReplicaRecord:
    worker_id: str
    address: str
    ready: bool = False  # set once the worker's LoadStage returned OK


@dataclass
class PlacedStageRecord:
    start: int
    end: int
    replicas: list[ReplicaRecord]
    bytes: int = 0  # memory one copy reserves on its worker (weights + KV reserve)

    def replica(self, worker_id: str) -> ReplicaRecord | None:
        return next((r for r in self.replicas if r.worker_id == worker_id), None)


@dataclass
class PlacementRecord:
    """Where one model version runs. Stored as JSON {epoch, stages, state, message, ...} in Redis."""

    model: str
    version: str
    epoch: int = 0
    stages: list[PlacedStageRecord] = field(default_factory=list)
    state: str = LOADING
    message: str = ""

    @property
    def key(self) -> tuple[str, str]:
        return (self.model, self.version)

    @property
    def label(self) -> str:
        return f"model '{self.model}' {self.version}"

    def stages_ready(self) -> int:
        return sum(1 for s in self.stages if any(r.ready for r in s.replicas))

    def refresh_state(self) -> None:
        """ready once every stage has a ready copy; unplaceable is decided by placement and kept."""
        if self.state != UNPLACEABLE:
            self.state = READY if self.stages and self.stages_ready() == len(self.stages) else LOADING

    def assignment(self) -> list[tuple[int, int, list[tuple[str, str]]]]:
        """Who holds what, ignoring readiness: a change here is a placement change (new epoch)."""
        return [(s.start, s.end, [(r.worker_id, r.address) for r in s.replicas]) for s in self.stages]

    def plans(self) -> list[StagePlan]:
        return [StagePlan(s.start, s.end, tuple(r.worker_id for r in s.replicas), s.bytes) for s in self.stages]

    def stage_on(self, worker_id: str, start: int, end: int) -> PlacedStageRecord | None:
        for s in self.stages:
            if (s.start, s.end) == (start, end) and s.replica(worker_id) is not None:
                return s
        return None

    def body_json(self) -> str:
        """JSON without the epoch; the atomic write prepends the epoch it allocates."""
        data = asdict(self)
        del data["epoch"]
        return json.dumps(data, separators=(",", ":"))

    def to_json(self) -> str:
        """Epoch first, as the Redis scripts expect to read it."""
        return f'{{"epoch":{int(self.epoch)},' + self.body_json()[1:]

    @classmethod
    def from_json(cls, text: str | bytes) -> PlacementRecord:
        data: dict[str, Any] = json.loads(text)
        data["stages"] = [
            PlacedStageRecord(
                start=s["start"], end=s["end"], bytes=s.get("bytes", 0),
                replicas=[_known(ReplicaRecord, r) for r in s.get("replicas", [])],
            )
            for s in data.get("stages", [])
        ]
        return _known(cls, data)


@dataclass(frozen=True)
class Deployment:
    """A version the registry wants served, with what placement needs to know about it."""

    model: str
    version: str
    sizes: ModelSizes
    replicas: int = 1
    num_stages: int = 0  # 0 = as few as fit

    @property
    def key(self) -> tuple[str, str]:
        return (self.model, self.version)


@dataclass(frozen=True)
class RouteHop:
    start: int
    end: int
    worker_id: str
    address: str


@dataclass(frozen=True)
class Route:
    model: str
    version: str
    epoch: int
    hops: tuple[RouteHop, ...]
