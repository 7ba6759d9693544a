"""Per-session KV caches, keyed by (session id, stage), with last-used times for idle eviction.

Steps touch the store from the torch thread while CloseSession and the eviction task touch it
from the event loop, so every method takes one lock (each holds it for a dict operation only).
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
    cache: Any  # modelgrid.model.KVCache: .length, .nbytes, .max_tokens
    last_used: float  # clock() of the last step


class SessionStore:
    """Sessions of this worker. clock is injectable so eviction is testable without sleeping."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._sessions: dict[tuple[str, StageKey], Session] = {}

    def get(self, session_id: str, stage: StageKey) -> Session | None:
        """The session's state on stage (marking it used), or None."""
        with self._lock:
            session = self._sessions.get((session_id, stage))
            if session is not None:
                session.last_used = self._clock()
            return session

    def put(self, session_id: str, stage: StageKey, cache: Any) -> Session:
        with self._lock:
            session = Session(session_id, stage, cache, self._clock())
            self._sessions[(session_id, stage)] = session
            return session

    def known(self, session_id: str) -> bool:
        """Whether the session holds state on any stage of this worker."""
        with self._lock:
            return any(sid == session_id for sid, _ in self._sessions)

    def drop(self, session_id: str, stage: StageKey | None = None) -> int:
        """Forget the session on one stage, or on every stage when stage is None; returns how many."""
        with self._lock:
            keys = [k for k in self._sessions if k[0] == session_id and (stage is None or k[1] == stage)]
            for key in keys:
                del self._sessions[key]
            return len(keys)

    def drop_stage(self, stage: StageKey) -> int:
        """Forget every session on a stage (it is being unloaded)."""
        with self._lock:
            keys = [k for k in self._sessions if k[1] == stage]
            for key in keys:
                del self._sessions[key]
            return len(keys)

    def evict_idle(self, idle_s: float) -> list[Session]:
        """Remove and return the sessions not used for idle_s seconds."""
        with self._lock:
            cutoff = self._clock() - idle_s
            stale = [k for k, s in self._sessions.items() if s.last_used <= cutoff]
            return [self._sessions.pop(k) for k in stale]

    def active_sessions(self) -> int:
        """Distinct session ids holding state here (a session on two local stages counts once)."""
        with self._lock:
            return len({sid for sid, _ in self._sessions})

    def kv_bytes(self) -> int:
        with self._lock:
            return sum(int(s.cache.nbytes) for s in self._sessions.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)
