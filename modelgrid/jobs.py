"""Batch jobs in the SDK: what Client.submit_job & co. return, and the requests they send (no torch, no grpc).

    job = client.submit_job("minilm", "embed", jsonl="corpus.jsonl")
    for progress in client.watch_job(job.job_id):
        print(f"{progress.progress:.0%} {progress.items_per_s:.0f} items/s")
    for result in client.job_results(job.job_id):
        print(result.id, result.embedding[:3])
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

from modelgrid.v1 import jobs_pb2

ENDED = ("succeeded", "failed", "cancelled")
Items = Sequence[Union[str, Mapping[str, Any]]]


@dataclass(frozen=True)
class JobInfo:
    job_id: str
    model: str
    version: str
    kind: str  # "embed" | "generate"
    state: str  # "queued" | "running" | "succeeded" | "failed" | "cancelled"
    total: int
    done: int
    failed: int  # items that failed on their own (the job still succeeds)
    progress: float  # (done + failed) / total
    items_per_s: float
    eta_s: float  # -1 unknown, 0 ended
    created_unix_ms: int = 0
    started_unix_ms: int = 0
    finished_unix_ms: int = 0
    error: str = ""
    owner: str = ""

    @property
    def ended(self) -> bool:
        return self.state in ENDED


@dataclass(frozen=True)
class JobResult:
    """One item's result: an embedding, or generated text; or its own error."""

    index: int  # position in the job's input
    id: str
    embedding: list[float] = field(default_factory=list)
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = ""
    error: str = ""

    def to_json(self) -> dict[str, Any]:
        """The JSONL line `modelgrid jobs results` writes: {"id", "embedding"} or {"id", "text", "token_ids",
        "finish_reason"}, or {"id", "error"}."""
        if self.error:
            return {"id": self.id, "error": self.error}
        if self.embedding:
            return {"id": self.id, "embedding": self.embedding}
        return {"id": self.id, "text": self.text, "token_ids": self.token_ids, "finish_reason": self.finish_reason}


def job_from_proto(j: jobs_pb2.Job) -> JobInfo:
    return JobInfo(
        job_id=j.job_id, model=j.model, version=j.version, kind=j.kind, state=j.state, total=j.total, done=j.done,
        failed=j.failed, progress=j.progress, items_per_s=j.items_per_s, eta_s=j.eta_s,
        created_unix_ms=j.created_unix_ms, started_unix_ms=j.started_unix_ms, finished_unix_ms=j.finished_unix_ms,
        error=j.error, owner=j.owner,
    )


def result_from_proto(r: jobs_pb2.JobResult) -> JobResult:
    return JobResult(index=r.index, id=r.id, embedding=list(r.embedding), text=r.text, token_ids=list(r.token_ids),
                     finish_reason=r.finish_reason, error=r.error)


def _item(kind: str, value: str | Mapping[str, Any]) -> jobs_pb2.JobItem:
    if isinstance(value, str):
        return jobs_pb2.JobItem(text=value) if kind == "embed" else jobs_pb2.JobItem(prompt=value)
    fields = dict(value)
    if fields.get("id") is not None:  # an integer id is kept as its decimal string; None (like JSONL null) = position
        fields["id"] = str(fields["id"])
    return jobs_pb2.JobItem(**fields)


def submit_request(
    model: str,
    kind: str,
    items: Items | None = None,
    jsonl: str | os.PathLike[str] | bytes | None = None,
    version: str | None = None,
    max_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    seed: int | None = None,
    stop: str | Sequence[str] | None = None,
    task_items: int = 0,
) -> jobs_pb2.SubmitJobRequest:
    """items: texts (embed) or prompts (generate), or dicts with id/text/prompt/max_tokens. jsonl: a JSONL file's
    path or bytes. Exactly one of the two. The gateway checks every item."""
    if (items is None) == (jsonl is None):
        raise ValueError("pass exactly one of items (a list) or jsonl (a file path or bytes)")
    request = jobs_pb2.SubmitJobRequest(model=model, version=version or "", kind=kind)
    if jsonl is not None:
        request.jsonl = jsonl if isinstance(jsonl, bytes) else Path(jsonl).read_bytes()
    else:
        request.items.items.extend(_item(kind, v) for v in items or ())
    params = {k: v for k, v in (("max_tokens", max_tokens), ("temperature", temperature), ("top_p", top_p),
                                ("top_k", top_k), ("seed", seed)) if v is not None}
    stops = [stop] if isinstance(stop, str) else list(stop or ())
    request.params.CopyFrom(jobs_pb2.JobParams(stop=stops, task_items=task_items, **params))
    return request


def write_results(results: Sequence[JobResult] | Any, out: Any) -> int:
    """Write results as JSONL to a text stream; the number of lines."""
    n = 0
    for result in results:
        out.write(json.dumps(result.to_json(), ensure_ascii=False) + "\n")
        n += 1
    return n
