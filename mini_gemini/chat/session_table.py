"""The conversations an engine holds: created on first use, least recently used ones dropped beyond a bound.

An id the table dropped is remembered (boundedly), so that the conversation that comes back with it is told it
had expired. Dropped and ended sessions are returned to the caller, who closes them outside the table's lock.
"""
from __future__ import annotations

import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

S = TypeVar("S")


class SessionTable(Generic[S]):
    """Args:
        max_sessions: conversations kept at most.
        make: make(session_id, expired) -> a new session (expired: the id was dropped before).
    """

    def __init__(self, max_sessions: int, make: Callable[[str, bool], S]):
        self.max_sessions, self.make = max(1, max_sessions), make
        self._sessions: OrderedDict[str, S] = OrderedDict()
        self._expired: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._sessions)

    def ids(self) -> list[str]:
        """Held ids, least recently used first."""
        with self._lock:
            return list(self._sessions)

    def values(self) -> list[S]:
        with self._lock:
            return list(self._sessions.values())

    def get(self, session_id: str | None) -> tuple[S, list[S]]:
        """(the session with this id, created on first use and marked most recently used; the sessions dropped
        to make room)."""
        session_id = session_id or uuid.uuid4().hex
        with self._lock:
            s = self._sessions.pop(session_id, None)
            if s is None:
                s = self.make(session_id, session_id in self._expired)
                self._expired.pop(session_id, None)
            self._sessions[session_id] = s
            return s, self._evict()

    def lookup(self, session_id: str) -> S | None:
        """The session with this id, if held (never creates one)."""
        with self._lock:
            return self._sessions.get(session_id)

    def remove(self, session_id: str) -> S | None:
        with self._lock:
            return self._sessions.pop(session_id, None)

    def touch(self, session_id: str, session: S) -> list[S]:
        """Mark `session` as used; a session whose id is free again (it was dropped or ended) is held again.
        Returns the sessions dropped to make room."""
        with self._lock:
            current = self._sessions.get(session_id)
            if current is session:
                self._sessions.move_to_end(session_id)
                return []
            if current is not None:  # the id went to a new session meanwhile: this one runs unheld
                return []
            self._sessions[session_id] = session
            self._expired.pop(session_id, None)
            return self._evict()

    def _evict(self) -> list[S]:
        evicted = []
        while len(self._sessions) > self.max_sessions:
            sid, old = self._sessions.popitem(last=False)
            self._expired[sid] = None
            evicted.append(old)
        while len(self._expired) > 4 * self.max_sessions + 64:
            self._expired.popitem(last=False)
        return evicted
