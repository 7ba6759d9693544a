"""Plain dataclasses the SDK returns to users (no protobuf, no grpc, no torch).

Layer ranges follow the protos: `start_layer` inclusive, `end_layer` exclusive; `last_layer`
(= end_layer - 1) is there for people who read ranges inclusively.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


@dataclass(frozen=True)
class GenerateChunk:
    """One generated token as it streams in."""

    text: str  # may be "" while a multi-byte character or a possible stop sequence is held back
    token_id: int
    logprob: float
    index: int  # 0-based index of the generated token
    version: str  # model version that served the request
    finish_reason: str | None = None  # last chunk only: "stop" | "length"
    usage: Usage | None = None  # last chunk only


@dataclass(frozen=True)
class Completion:
    """A whole generation, collected from its chunks."""

    text: str
    token_ids: list[int]  # new tokens only (not the prompt)
    finish_reason: str  # "stop" | "length"
    usage: Usage
    version: str = ""
    logprobs: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class FileInfo:
    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class VersionInfo:
    """One registered, immutable version of a model."""

    model: str
    version: str
    architecture: str
    kind: str  # "decoder" | "encoder"
    num_layers: int
    vocab_size: int
    max_context: int
    aliases: list[str]
    files: list[FileInfo]
    layer_bytes: list[int]
    embed_bytes: int
    head_bytes: int
    kv_bytes_per_token_per_layer: int
    created_unix_ms: int

    @property
    def total_bytes(self) -> int:
        """Bytes of every uploaded file."""
        return sum(f.size for f in self.files)


@dataclass(frozen=True)
class ModelInfo:
    name: str
    versions: list[VersionInfo]
    aliases: dict[str, str]  # alias -> version
    replicas: int
    num_stages: int  # 0 = the scheduler chooses

    @property
    def latest(self) -> VersionInfo | None:
        """The version "latest" points at (or the newest one)."""
        target = self.aliases.get("latest")
        for v in self.versions:
            if v.version == target:
                return v
        return self.versions[-1] if self.versions else None


@dataclass(frozen=True)
class LoadedStage:
    model: str
    version: str
    start_layer: int
    end_layer: int  # exclusive
    param_bytes: int
    epoch: int


@dataclass(frozen=True)
class WorkerInfo:
    worker_id: str
    address: str
    device: str
    total_memory: int
    free_memory: int
    stages: list[LoadedStage]
    heartbeat_age_s: float
    state: str  # "serving" | "draining"
    active_sessions: int
    kv_cache_bytes: int


@dataclass(frozen=True)
class Replica:
    worker_id: str
    address: str
    ready: bool


@dataclass(frozen=True)
class PlacedStage:
    start_layer: int
    end_layer: int  # exclusive
    replicas: list[Replica]

    @property
    def first_layer(self) -> int:
        return self.start_layer

    @property
    def last_layer(self) -> int:
        """Inclusive: the last layer this stage runs."""
        return self.end_layer - 1


@dataclass(frozen=True)
class Placement:
    model: str
    version: str
    epoch: int
    stages: list[PlacedStage]
    state: str  # "ready" | "loading" | "unplaceable"
    message: str = ""

    @property
    def ready(self) -> bool:
        """Every stage has at least one ready replica."""
        return self.state == "ready" and bool(self.stages) and all(
            any(r.ready for r in s.replicas) for s in self.stages
        )
