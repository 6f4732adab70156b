"""What the workspace reader tells the app: messages that report (past tense), sent from a thread.

The reader thread posts them; handlers in the app and widgets apply them. A
newer message of a kind that only carries "the latest state" replaces a queued
older one (`can_replace`), so a burst of updates costs one redraw.
"""

from __future__ import annotations

import threading
from typing import Any

from textual.message import Message


class StatusChanged(Message):
    """state/status.json as `traind status --json` would show it (daemon liveness from the lock)."""

    def __init__(self, status: dict[str, Any]) -> None:
        super().__init__()
        self.status = status

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, StatusChanged)


class MetricsAdded(Message):
    """New `step` (and `job_start`, `checkpoint`, `anomaly`) events of one job, in order.

    The handler sets `applied` once the events are in the chart: the reader waits for it
    before parsing the next slice of a long history.
    """

    def __init__(self, job_id: str, events: list[dict[str, Any]]) -> None:
        super().__init__()
        self.job_id = job_id
        self.events = events
        self.applied = threading.Event()


class EventsAdded(Message):
    """New lines of state/events.jsonl, oldest first."""

    def __init__(self, events: list[dict[str, Any]]) -> None:
        super().__init__()
        self.events = events


class DaemonLiveness(Message):
    """Whether a daemon holds the workspace lock, sent when it changes (and once at start)."""

    def __init__(self, running: bool, pid: int | None) -> None:
        super().__init__()
        self.running = running
        self.pid = pid

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, DaemonLiveness)
