"""The daemon's Reporter: events and alerts from any part of it, on any thread, said on the event loop's.

An alert is an event that status.json also shows as the last error. A part
working in a thread (the intake's pass, a snapshot's retention, a state file
found damaged) reports here like any other: off the loop's thread the report is
posted to the loop (`call_soon_threadsafe`), so the supervisor's state is only
written there, the hooks read the job in hand there, and reports keep their
order.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from typing import Any

from engine.store.eventlog import EventLog
from engine.supervisor.state import SupervisorState


class LoopReporter:
    def __init__(self, events: EventLog, state: SupervisorState):
        self.events = events
        self.state = state
        self.loop: asyncio.AbstractEventLoop | None = None  # until the daemon runs, everything is on one thread
        self.thread = threading.get_ident()

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop, self.thread = loop, threading.get_ident()

    def emit(self, kind: str, message: str, level: str = "info", **fields: Any) -> None:
        if not self._posted(self.emit, kind, message, level, fields):
            self.events.emit(kind, message, level, **fields)

    def alert(self, kind: str, message: str, level: str = "error", **fields: Any) -> None:
        if not self._posted(self.alert, kind, message, level, fields):
            self.events.emit(kind, message, level, **fields)
            self.state.last_error = {"time": time.time(), "kind": kind, "message": message}

    def _posted(self, say, kind: str, message: str, level: str, fields: dict[str, Any]) -> bool:
        """Off the loop's thread: the report goes to the loop instead (True)."""
        loop = self.loop
        if loop is None or threading.get_ident() == self.thread or loop.is_closed():
            return False
        loop.call_soon_threadsafe(functools.partial(say, kind, message, level, **fields))
        return True
