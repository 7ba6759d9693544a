from modelgrid.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JobItem(_message.Message):
    __slots__ = ("id", "text", "prompt", "max_tokens")
    ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    id: str
    text: str
    prompt: str
    max_tokens: int
    def __init__(self, id: _Optional[str] = ..., text: _Optional[str] = ..., prompt: _Optional[str] = ..., max_tokens: _Optional[int] = ...) -> None: ...

class JobItems(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[JobItem]
    def __init__(self, items: _Optional[_Iterable[_Union[JobItem, _Mapping]]] = ...) -> None: ...

class JobParams(_message.Message):
    __slots__ = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "task_items")
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    TASK_ITEMS_FIELD_NUMBER: _ClassVar[int]
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    task_items: int
    def __init__(self, max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., seed: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., task_items: _Optional[int] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("job_id", "model", "version", "kind", "state", "total", "done", "failed", "created_unix_ms", "started_unix_ms", "finished_unix_ms", "error", "params", "progress", "items_per_s", "eta_s", "owner")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    STARTED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    ITEMS_PER_S_FIELD_NUMBER: _ClassVar[int]
    ETA_S_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    model: str
    version: str
    kind: str
    state: str
    total: int
    done: int
    failed: int
    created_unix_ms: int
    started_unix_ms: int
    finished_unix_ms: int
    error: str
    params: JobParams
    progress: float
    items_per_s: float
    eta_s: float
    owner: str
    def __init__(self, job_id: _Optional[str] = ..., model: _Optional[str] = ..., version: _Optional[str] = ..., kind: _Optional[str] = ..., state: _Optional[str] = ..., total: _Optional[int] = ..., done: _Optional[int] = ..., failed: _Optional[int] = ..., created_unix_ms: _Optional[int] = ..., started_unix_ms: _Optional[int] = ..., finished_unix_ms: _Optional[int] = ..., error: _Optional[str] = ..., params: _Optional[_Union[JobParams, _Mapping]] = ..., progress: _Optional[float] = ..., items_per_s: _Optional[float] = ..., eta_s: _Optional[float] = ..., owner: _Optional[str] = ...) -> None: ...

class JobResult(_message.Message):
    __slots__ = ("index", "id", "embedding", "text", "token_ids", "finish_reason", "error")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    index: int
    id: str
    embedding: _containers.RepeatedScalarFieldContainer[float]
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    finish_reason: str
    error: str
    def __init__(self, index: _Optional[int] = ..., id: _Optional[str] = ..., embedding: _Optional[_Iterable[float]] = ..., text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., finish_reason: _Optional[str] = ..., error: _Optional[str] = ...) -> None: ...

class SubmitJobRequest(_message.Message):
    __slots__ = ("model", "version", "kind", "items", "jsonl", "params")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    JSONL_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    kind: str
    items: JobItems
    jsonl: bytes
    params: JobParams
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ..., kind: _Optional[str] = ..., items: _Optional[_Union[JobItems, _Mapping]] = ..., jsonl: _Optional[bytes] = ..., params: _Optional[_Union[JobParams, _Mapping]] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class WatchJobRequest(_message.Message):
    __slots__ = ("job_id", "interval_s")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    interval_s: float
    def __init__(self, job_id: _Optional[str] = ..., interval_s: _Optional[float] = ...) -> None: ...

class CancelJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ("states", "limit")
    STATES_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    states: _containers.RepeatedScalarFieldContainer[str]
    limit: int
    def __init__(self, states: _Optional[_Iterable[str]] = ..., limit: _Optional[int] = ...) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs",)
    JOBS_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[Job]
    def __init__(self, jobs: _Optional[_Iterable[_Union[Job, _Mapping]]] = ...) -> None: ...

class GetJobResultsRequest(_message.Message):
    __slots__ = ("job_id", "start")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    start: int
    def __init__(self, job_id: _Optional[str] = ..., start: _Optional[int] = ...) -> None: ...

class CreateJobRequest(_message.Message):
    __slots__ = ("model", "version", "kind", "params", "items", "owner")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    kind: str
    params: JobParams
    items: _containers.RepeatedCompositeFieldContainer[JobItem]
    owner: str
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ..., kind: _Optional[str] = ..., params: _Optional[_Union[JobParams, _Mapping]] = ..., items: _Optional[_Iterable[_Union[JobItem, _Mapping]]] = ..., owner: _Optional[str] = ...) -> None: ...

class StoreListJobsRequest(_message.Message):
    __slots__ = ("states", "limit", "owner")
    STATES_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    states: _containers.RepeatedScalarFieldContainer[str]
    limit: int
    owner: str
    def __init__(self, states: _Optional[_Iterable[str]] = ..., limit: _Optional[int] = ..., owner: _Optional[str] = ...) -> None: ...

class UpdateJobStateRequest(_message.Message):
    __slots__ = ("job_id", "state", "error")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    state: str
    error: str
    def __init__(self, job_id: _Optional[str] = ..., state: _Optional[str] = ..., error: _Optional[str] = ...) -> None: ...

class FetchJobItemsRequest(_message.Message):
    __slots__ = ("job_id", "start", "end")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    start: int
    end: int
    def __init__(self, job_id: _Optional[str] = ..., start: _Optional[int] = ..., end: _Optional[int] = ...) -> None: ...

class IndexedItem(_message.Message):
    __slots__ = ("index", "item")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    ITEM_FIELD_NUMBER: _ClassVar[int]
    index: int
    item: JobItem
    def __init__(self, index: _Optional[int] = ..., item: _Optional[_Union[JobItem, _Mapping]] = ...) -> None: ...

class FetchJobItemsResponse(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[IndexedItem]
    def __init__(self, items: _Optional[_Iterable[_Union[IndexedItem, _Mapping]]] = ...) -> None: ...

class PutJobResultsRequest(_message.Message):
    __slots__ = ("job_id", "results")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    results: _containers.RepeatedCompositeFieldContainer[JobResult]
    def __init__(self, job_id: _Optional[str] = ..., results: _Optional[_Iterable[_Union[JobResult, _Mapping]]] = ...) -> None: ...

class PendingItems(_message.Message):
    __slots__ = ("starts", "ends")
    STARTS_FIELD_NUMBER: _ClassVar[int]
    ENDS_FIELD_NUMBER: _ClassVar[int]
    starts: _containers.RepeatedScalarFieldContainer[int]
    ends: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, starts: _Optional[_Iterable[int]] = ..., ends: _Optional[_Iterable[int]] = ...) -> None: ...

class EnqueueJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class EnqueueJobResponse(_message.Message):
    __slots__ = ("tasks",)
    TASKS_FIELD_NUMBER: _ClassVar[int]
    tasks: int
    def __init__(self, tasks: _Optional[int] = ...) -> None: ...

class LeaseTaskRequest(_message.Message):
    __slots__ = ("executor_id", "wait_s")
    EXECUTOR_ID_FIELD_NUMBER: _ClassVar[int]
    WAIT_S_FIELD_NUMBER: _ClassVar[int]
    executor_id: str
    wait_s: float
    def __init__(self, executor_id: _Optional[str] = ..., wait_s: _Optional[float] = ...) -> None: ...

class TaskLease(_message.Message):
    __slots__ = ("job_id", "task", "lease_id", "start", "end", "model", "version", "kind", "params", "route", "attempt", "lease_s")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    LEASE_S_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    task: int
    lease_id: str
    start: int
    end: int
    model: str
    version: str
    kind: str
    params: JobParams
    route: _common_pb2.Route
    attempt: int
    lease_s: float
    def __init__(self, job_id: _Optional[str] = ..., task: _Optional[int] = ..., lease_id: _Optional[str] = ..., start: _Optional[int] = ..., end: _Optional[int] = ..., model: _Optional[str] = ..., version: _Optional[str] = ..., kind: _Optional[str] = ..., params: _Optional[_Union[JobParams, _Mapping]] = ..., route: _Optional[_Union[_common_pb2.Route, _Mapping]] = ..., attempt: _Optional[int] = ..., lease_s: _Optional[float] = ...) -> None: ...

class LeaseTaskResponse(_message.Message):
    __slots__ = ("lease",)
    LEASE_FIELD_NUMBER: _ClassVar[int]
    lease: TaskLease
    def __init__(self, lease: _Optional[_Union[TaskLease, _Mapping]] = ...) -> None: ...

class TaskRef(_message.Message):
    __slots__ = ("job_id", "task", "lease_id")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    task: int
    lease_id: str
    def __init__(self, job_id: _Optional[str] = ..., task: _Optional[int] = ..., lease_id: _Optional[str] = ...) -> None: ...

class ExtendLeaseResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class FinishTaskResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class FailTaskRequest(_message.Message):
    __slots__ = ("task", "reason", "workers")
    TASK_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    task: TaskRef
    reason: str
    workers: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, task: _Optional[_Union[TaskRef, _Mapping]] = ..., reason: _Optional[str] = ..., workers: _Optional[_Iterable[str]] = ...) -> None: ...

class FailTaskResponse(_message.Message):
    __slots__ = ("requeued",)
    REQUEUED_FIELD_NUMBER: _ClassVar[int]
    requeued: bool
    def __init__(self, requeued: _Optional[bool] = ...) -> None: ...

class CancelJobResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
