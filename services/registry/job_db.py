"""The durable side of batch jobs: the `jobs` and `job_items` tables and JobDB, the one class that queries them.

A job row keeps its counts (done, failed) next to its state, updated in the same transaction that writes
results, so GetJob never counts rows. Results are written by primary key (job, index) and only into items
still pending: a task that runs twice (its lease expired, or its worker died after the write) never
yields a duplicate or counts twice. The job row is locked (SELECT ... FOR UPDATE on PostgreSQL; SQLite
transactions are BEGIN IMMEDIATE already) so concurrent writers of one job serialise.

Synchronous, short calls; the servicer runs them in a thread.
"""

from __future__ import annotations

import logging
import secrets
from datetime import datetime
from typing import Any, Iterable, Sequence

from sqlalchemy import JSON, DateTime, ForeignKey, Integer, LargeBinary, SmallInteger, String, Text, insert, select, update
from sqlalchemy.orm import Mapped, Session, mapped_column, sessionmaker

from modelgrid.errors import FailedPrecondition, InvalidArgument, NotFound
from services.registry.db import Base, RegistryDB, _now, _unavailable_on_db_errors, _unix_ms
from services.registry.job_records import (
    CANCELLED,
    DONE,
    ENDED,
    FAILED,
    ITEM_FAILED,
    PENDING,
    QUEUED,
    RUNNING,
    STATES,
    SUCCEEDED,
    ItemInput,
    ItemResult,
    JobRecord,
    ranges,
)

log = logging.getLogger(__name__)

INSERT_BATCH = 5000  # items per INSERT statement
MAX_LIST = 1000


class JobRow(Base):
    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[str] = mapped_column(String(32), unique=True)  # "job_" + 16 hex
    model: Mapped[str] = mapped_column(String(64))
    version: Mapped[str] = mapped_column(String(16))
    kind: Mapped[str] = mapped_column(String(16))
    params: Mapped[dict[str, Any]] = mapped_column(JSON)
    state: Mapped[str] = mapped_column(String(16), index=True)
    total: Mapped[int]
    done: Mapped[int]
    failed: Mapped[int]
    owner: Mapped[str] = mapped_column(String(32), index=True)  # the submitting key's key_id ("" without auth)
    error: Mapped[str] = mapped_column(Text, default="")
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    started: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class JobItemRow(Base):
    """One item of a job: its input, and once it ran its result (or its own error)."""

    __tablename__ = "job_items"

    job_pk: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    idx: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    item_id: Mapped[str] = mapped_column(String(256))
    input: Mapped[dict[str, Any]] = mapped_column(JSON)
    state: Mapped[int] = mapped_column(SmallInteger)  # PENDING, DONE or ITEM_FAILED
    embedding: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)  # float32, little-endian
    output: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)  # {text, token_ids, finish_reason}
    error: Mapped[str | None] = mapped_column(Text, nullable=True)


def _record(row: JobRow) -> JobRecord:
    return JobRecord(
        job_id=row.job_id, model=row.model, version=row.version, kind=row.kind, state=row.state, total=row.total,
        done=row.done, failed=row.failed, params=dict(row.params or {}), owner=row.owner,
        created_unix_ms=_unix_ms(row.created), started_unix_ms=_unix_ms(row.started) if row.started else 0,
        finished_unix_ms=_unix_ms(row.finished) if row.finished else 0, error=row.error or "",
    )


def _result(row: JobItemRow) -> ItemResult:
    output = row.output or {}
    return ItemResult(
        index=row.idx, item_id=row.item_id, embedding=row.embedding or b"", text=output.get("text", ""),
        token_ids=tuple(output.get("token_ids", ())), finish_reason=output.get("finish_reason", ""),
        error=row.error or "",
    )


class JobDB:
    """Jobs and their items in the registry's database. Raises NotFound / InvalidArgument / FailedPrecondition."""

    def __init__(self, db: RegistryDB) -> None:
        for table in (JobRow.__table__, JobItemRow.__table__):
            table.create(db.engine, checkfirst=True)
        self._sessions = sessionmaker(db.engine, expire_on_commit=False)

    @staticmethod
    def _row(s: Session, job_id: str, lock: bool = False) -> JobRow:
        query = select(JobRow).where(JobRow.job_id == job_id)
        row = s.scalar(query.with_for_update() if lock else query)
        if row is None:
            raise NotFound(f"no job {job_id!r}; list jobs with ListJobs (`modelgrid jobs list`)")
        return row

    @_unavailable_on_db_errors
    def create(
        self, model: str, version: str, kind: str, params: dict[str, Any], items: Sequence[ItemInput], owner: str
    ) -> JobRecord:
        with self._sessions() as s:
            row = JobRow(
                job_id="job_" + secrets.token_hex(8), model=model, version=version, kind=kind, params=params,
                state=QUEUED, total=len(items), done=0, failed=0, owner=owner, error="", created=_now(),
            )
            s.add(row)
            s.flush()
            for begin in range(0, len(items), INSERT_BATCH):
                s.execute(insert(JobItemRow), [
                    {"job_pk": row.id, "idx": i, "item_id": item.item_id, "input": item.to_json(), "state": PENDING}
                    for i, item in enumerate(items[begin : begin + INSERT_BATCH], start=begin)
                ])
            s.commit()
            log.info("job %s: %d %s items for %s %s", row.job_id, len(items), kind, model, version)
            return _record(row)

    @_unavailable_on_db_errors
    def get(self, job_id: str) -> JobRecord:
        with self._sessions() as s:
            return _record(self._row(s, job_id))

    @_unavailable_on_db_errors
    def list(self, states: Iterable[str] = (), owner: str | None = None, limit: int = 50) -> list[JobRecord]:
        wanted = list(states)
        unknown = [st for st in wanted if st not in STATES]
        if unknown:
            raise InvalidArgument(f"unknown job state(s) {', '.join(unknown)}; states: {', '.join(STATES)}")
        query = select(JobRow).order_by(JobRow.created.desc(), JobRow.id.desc()).limit(min(max(limit, 1), MAX_LIST))
        if wanted:
            query = query.where(JobRow.state.in_(wanted))
        if owner is not None:
            query = query.where(JobRow.owner == owner)
        with self._sessions() as s:
            return [_record(r) for r in s.scalars(query)]

    @_unavailable_on_db_errors
    def update_state(self, job_id: str, state: str, error: str = "") -> JobRecord:
        """queued -> running (sets started), or -> failed / cancelled (sets finished). An ended job stays as it is."""
        if state not in (RUNNING, FAILED, CANCELLED):
            raise InvalidArgument(f"a job can be set to running, failed or cancelled, not {state!r}")
        with self._sessions() as s:
            row = self._row(s, job_id, lock=True)
            if row.state in ENDED or row.state == state:
                return _record(row)
            now = _now()
            if state == RUNNING:
                row.started = row.started or now
            else:
                row.finished = now
                row.error = error[:2000]
                log.info("job %s %s after %d/%d items%s", job_id, state, row.done + row.failed, row.total,
                         f": {error}" if error else "")
            row.state = state
            s.commit()
            return _record(row)

    @_unavailable_on_db_errors
    def fetch_items(self, job_id: str, start: int, end: int) -> list[tuple[int, ItemInput]]:
        with self._sessions() as s:
            row = self._row(s, job_id)
            if not 0 <= start <= end <= row.total:
                raise InvalidArgument(f"items [{start}, {end}) are outside job {job_id}'s [0, {row.total})")
            query = (select(JobItemRow).where(JobItemRow.job_pk == row.id, JobItemRow.idx >= start,
                                              JobItemRow.idx < end).order_by(JobItemRow.idx))
            return [(r.idx, ItemInput.from_json(r.item_id, r.input)) for r in s.scalars(query)]

    @_unavailable_on_db_errors
    def put_results(self, job_id: str, results: Sequence[ItemResult]) -> JobRecord:
        """Fill pending items with their results; the job's counts grow by what was new. See the module doc."""
        with self._sessions() as s:
            row = self._row(s, job_id, lock=True)
            if row.state in ENDED:
                raise FailedPrecondition(f"job {job_id} is {row.state}: its results are final")
            by_index = {r.index: r for r in results}
            bad = [i for i in by_index if not 0 <= i < row.total]
            if bad:
                raise InvalidArgument(f"item index {bad[0]} is outside job {job_id}'s [0, {row.total})")
            pending = set(s.scalars(select(JobItemRow.idx).where(
                JobItemRow.job_pk == row.id, JobItemRow.idx.in_(sorted(by_index)), JobItemRow.state == PENDING)))
            new = [by_index[i] for i in sorted(pending)]
            if new:
                s.execute(update(JobItemRow), [
                    {"job_pk": row.id, "idx": r.index, "state": ITEM_FAILED if r.failed else DONE,
                     "embedding": r.embedding or None, "error": r.error or None,
                     "output": None if r.failed or r.embedding else
                     {"text": r.text, "token_ids": list(r.token_ids), "finish_reason": r.finish_reason}}
                    for r in new
                ])
            now = _now()
            failed = sum(1 for r in new if r.failed)
            row.done += len(new) - failed
            row.failed += failed
            if row.state == QUEUED:
                row.state, row.started = RUNNING, row.started or now
            if row.done + row.failed >= row.total:
                row.state, row.finished = SUCCEEDED, now
                log.info("job %s succeeded: %d done, %d failed", job_id, row.done, row.failed)
            s.commit()
            return _record(row)

    @_unavailable_on_db_errors
    def pending(self, job_id: str) -> list[tuple[int, int]]:
        with self._sessions() as s:
            row = self._row(s, job_id)
            query = (select(JobItemRow.idx).where(JobItemRow.job_pk == row.id, JobItemRow.state == PENDING)
                     .order_by(JobItemRow.idx))
            return ranges(list(s.scalars(query)))

    @_unavailable_on_db_errors
    def results(self, job_id: str, start: int, limit: int) -> list[ItemResult]:
        """Up to `limit` finished items from index `start` on, in input order."""
        with self._sessions() as s:
            row = self._row(s, job_id)
            query = (select(JobItemRow).where(JobItemRow.job_pk == row.id, JobItemRow.idx >= start,
                                              JobItemRow.state != PENDING)
                     .order_by(JobItemRow.idx).limit(limit))
            return [_result(r) for r in s.scalars(query)]
