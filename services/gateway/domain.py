"""Plain data the gateway works with: resolved versions, routes, generated chunks, embeddings."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class VersionInfo:
    """What the gateway needs of a registered version (from Registry.ResolveVersion)."""

    model: str
    version: str
    architecture: str
    kind: str  # "decoder" | "encoder"
    vocab_size: int
    max_context: int  # prompt + generated tokens at most
    config: dict[str, Any] = field(default_factory=dict, compare=False)  # the HF config.json
    files: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        return f"{self.model} {self.version}"

    @property
    def eos_ids(self) -> frozenset[int]:
        """config.json's eos_token_id: one id or a list of ids (any of them ends generation)."""
        eos = self.config.get("eos_token_id")
        if eos is None:
            return frozenset()
        if isinstance(eos, int):
            return frozenset((eos,))
        return frozenset(int(e) for e in eos if isinstance(e, int))

    @property
    def hidden_size(self) -> int:
        return int(self.config.get("hidden_size") or 0)

    @staticmethod
    def parse_config(config_json: str) -> dict[str, Any]:
        try:
            value = json.loads(config_json) if config_json else {}
        except ValueError:
            return {}
        return value if isinstance(value, dict) else {}


@dataclass(frozen=True)
class Hop:
    """The replica chosen for one stage: a worker that runs layers [start_layer, end_layer)."""

    start_layer: int
    end_layer: int
    worker_id: str
    address: str


@dataclass(frozen=True)
class Route:
    model: str
    version: str
    epoch: int
    hops: tuple[Hop, ...]

    @property
    def worker_ids(self) -> tuple[str, ...]:
        return tuple(h.worker_id for h in self.hops)


@dataclass(frozen=True)
class Sampling:
    """How the last stage picks each token; seed + step index give every step its own generator."""

    temperature: float  # 0 = greedy
    top_k: int  # 0 = off
    top_p: float  # 1.0 = off
    seed: int


@dataclass(frozen=True)
class Chunk:
    """One generated token as the client sees it; the last one carries finish_reason and usage."""

    text: str  # "" while a multi-byte character or a possible stop sequence is held back
    token_id: int
    logprob: float
    index: int  # 0-based index of the generated token
    finish_reason: str | None = None  # last chunk only: "stop" | "length"
    prompt_tokens: int = 0  # last chunk only
    completion_tokens: int = 0  # last chunk only


@dataclass(frozen=True)
class Embeddings:
    vectors: Any  # numpy (B, hidden) float32, L2-normalised by the last stage
    prompt_tokens: int  # real (unpadded) tokens embedded, all texts together


# ---- batch jobs (services/gateway/jobs.py, job_runner.py) -----------------------------------------

@dataclass(frozen=True)
class JobSettings:
    """A job's parameters (JobParams); None = not set."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    task_items: int = 0  # 0 = the scheduler's default


@dataclass(frozen=True)
class TaskLease:
    """A task the scheduler leased to this gateway: items [start, end) of a job, to run on `route`."""

    job_id: str
    task: int
    lease_id: str
    start: int
    end: int
    kind: str  # "embed" | "generate"
    settings: JobSettings
    route: Route
    attempt: int
    lease_s: float

    @property
    def label(self) -> str:
        return f"job {self.job_id} task {self.task} (items {self.start}-{self.end - 1}, attempt {self.attempt})"


@dataclass(frozen=True)
class ItemOutput:
    """What one item of a task produced, or its own error."""

    index: int
    embedding: Any = None  # numpy (hidden,) float32
    text: str = ""
    token_ids: tuple[int, ...] = ()
    finish_reason: str = ""
    error: str = ""
