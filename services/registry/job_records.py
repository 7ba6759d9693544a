"""Plain records of batch jobs as the registry stores them, and the progress arithmetic (no I/O)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
STATES = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED)
ENDED = frozenset((SUCCEEDED, FAILED, CANCELLED))
KINDS = ("embed", "generate")

# item states in job_items.state
PENDING, DONE, ITEM_FAILED = 0, 1, 2


@dataclass(frozen=True)
class ItemInput:
    """One item as submitted: its id and its input (text for embed; prompt and max_tokens for generate)."""

    item_id: str
    text: str = ""
    prompt: str = ""
    max_tokens: int = 0

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"text": self.text} if self.text else {"prompt": self.prompt}
        if self.max_tokens:
            out["max_tokens"] = self.max_tokens
        return out

    @classmethod
    def from_json(cls, item_id: str, value: dict[str, Any]) -> ItemInput:
        return cls(item_id, value.get("text", ""), value.get("prompt", ""), int(value.get("max_tokens", 0)))


@dataclass(frozen=True)
class ItemResult:
    """What one item produced: an embedding (float32 bytes), generated text and ids, or an error."""

    index: int
    item_id: str = ""
    embedding: bytes = b""  # little-endian float32
    text: str = ""
    token_ids: tuple[int, ...] = ()
    finish_reason: str = ""
    error: str = ""

    @property
    def failed(self) -> bool:
        return bool(self.error)


@dataclass
class JobRecord:
    job_id: str
    model: str
    version: str
    kind: str
    state: str
    total: int
    done: int
    failed: int
    params: dict[str, Any] = field(default_factory=dict)  # JobParams as JSON (proto field names)
    owner: str = ""
    created_unix_ms: int = 0
    started_unix_ms: int = 0
    finished_unix_ms: int = 0
    error: str = ""


@dataclass(frozen=True)
class Progress:
    fraction: float  # (done + failed) / total
    items_per_s: float
    eta_s: float  # -1 unknown, 0 ended


def progress(job: JobRecord, now_ms: int) -> Progress:
    """Average throughput since the job started (to its end when it ended) and the time left at that rate."""
    finished = job.done + job.failed
    fraction = finished / job.total if job.total else 1.0
    if not job.started_unix_ms:
        return Progress(fraction, 0.0, 0.0 if job.state in ENDED else -1.0)
    until = job.finished_unix_ms or now_ms
    elapsed_s = max(until - job.started_unix_ms, 1) / 1000.0
    rate = finished / elapsed_s
    if job.state in ENDED:
        eta = 0.0
    elif rate > 0:
        eta = (job.total - finished) / rate
    else:
        eta = -1.0
    return Progress(fraction, rate, eta)


def ranges(indices: list[int]) -> list[tuple[int, int]]:
    """Ascending indices -> [start, end) runs: [0, 1, 2, 5] -> [(0, 3), (5, 6)]."""
    out: list[tuple[int, int]] = []
    for i in indices:
        if out and out[-1][1] == i:
            out[-1] = (out[-1][0], i + 1)
        else:
            out.append((i, i + 1))
    return out
