"""Per-session KV caches, keyed by (session id, stage), with last-used times for idle eviction.

A session's entry also carries the KV bytes admitted for it (its reservation): admission creates the
entry before the step allocates the cache, and the cache never outgrows the reservation, so the
sum of reservations is the KV memory the worker has committed. Dropping entries frees reservations
and calls on_release, which lets waiting admissions in.

Steps touch the store from the torch thread while CloseSession, admission and the eviction task touch
it from the event loop, so every method takes one lock (each holds it for a dict operation only).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple


class StageKey(NamedTuple):
    """Which stage: model, concrete version, layers [start, end)."""

    model: str
    version: str
    start: int
    end: int

    def __str__(self) -> str:
        return f"stage {self.model} {self.version} [{self.start},{self.end})"


@dataclass
class Session:
    session_id: str
    stage: StageKey
    cache: Any  # modelgrid.model.KVCache (.length, .nbytes, .max_tokens); None while admitted, not yet allocated
    last_used: float  # clock() of the last step
    reserved: int = 0  # KV bytes admitted for the session on this stage

    @property
    def kv_bytes(self) -> int:
        """Bytes committed to the session: its reservation, or its cache if that is larger."""
        return max(self.reserved, int(self.cache.nbytes) if self.cache is not None else 0)


class SessionStore:
    """Sessions of this worker. clock is injectable so eviction is testable without sleeping."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._sessions: dict[tuple[str, StageKey], Session] = {}
        self.on_release: Callable[[], None] = lambda: None  # entries were dropped (called from any thread)

    def get(self, session_id: str, stage: StageKey) -> Session | None:
        """The session's state on stage (marking it used), or None."""
        with self._lock:
            session = self._sessions.get((session_id, stage))
            if session is not None:
                session.last_used = self._clock()
            return session

    def peek(self, session_id: str, stage: StageKey) -> Session | None:
        """The session's state on stage, without marking it used."""
        with self._lock:
            return self._sessions.get((session_id, stage))

    def put(self, session_id: str, stage: StageKey, cache: Any, reserved: int = 0) -> Session:
        with self._lock:
            session = Session(session_id, stage, cache, self._clock(), reserved)
            self._sessions[(session_id, stage)] = session
            return session

    def try_reserve(self, session_id: str, stage: StageKey, nbytes: int, limit: int) -> bool:
        """Admit nbytes of KV for the session on stage if all sessions' bytes stay within limit.

        Replaces the session's previous reservation there (a replay may need more); the entry is
        created (with no cache yet) when the session is new. False, and nothing changes, when it
        does not fit.
        """
        key = (session_id, stage)
        with self._lock:
            current = self._sessions.get(key)
            others = sum(s.kv_bytes for k, s in self._sessions.items() if k != key)
            if others + nbytes > limit:
                return False
            if current is None:
                self._sessions[key] = Session(session_id, stage, None, self._clock(), nbytes)
            else:
                current.reserved = nbytes
                current.last_used = self._clock()
            return True

    def known(self, session_id: str) -> bool:
        """Whether the session holds state on any stage of this worker."""
        with self._lock:
            return any(sid == session_id for sid, _ in self._sessions)

    def drop(self, session_id: str, stage: StageKey | None = None) -> int:
        """Forget the session on one stage, or on every stage when stage is None; returns how many."""
        return len(self._remove(lambda k, _: k[0] == session_id and (stage is None or k[1] == stage)))

    def drop_stage(self, stage: StageKey) -> int:
        """Forget every session on a stage (it is being unloaded)."""
        return len(self._remove(lambda k, _: k[1] == stage))

    def evict_idle(self, idle_s: float) -> list[Session]:
        """Remove and return the sessions not used for idle_s seconds."""
        cutoff = self._clock() - idle_s
        return self._remove(lambda _, s: s.last_used <= cutoff)

    def _remove(self, which: Callable[[tuple[str, StageKey], Session], bool]) -> list[Session]:
        with self._lock:
            keys = [k for k, s in self._sessions.items() if which(k, s)]
            removed = [self._sessions.pop(k) for k in keys]
        if removed:
            self.on_release()
        return removed

    def count(self, stage: StageKey) -> int:
        """Sessions holding state (or a reservation) on the stage."""
        with self._lock:
            return sum(1 for _, st in self._sessions if st == stage)

    def active_sessions(self) -> int:
        """Distinct session ids holding state here (a session on two local stages counts once)."""
        with self._lock:
            return len({sid for sid, _ in self._sessions})

    def kv_bytes(self) -> int:
        """KV bytes committed to sessions (reserved or allocated, whichever is larger, per session)."""
        with self._lock:
            return sum(s.kv_bytes for s in self._sessions.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)
