"""Event log: alerts and lifecycle events from state/events.jsonl and the UI's own notes, in time order,
newest last, bounded in memory. Lines can come in out of order (the UI's note that no daemon runs is
written before the history is read): one older than the newest shown is put in its place."""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable
from typing import Any

from rich.text import Text
from textual.events import Resize
from textual.widgets import RichLog

LEVEL = {"info": "", "warning": "yellow", "error": "bold red"}
MAX_LINES = 500


class EventLog(RichLog):
    def __init__(self, clock: Callable[[], float] = time.time, **kwargs: Any) -> None:
        """`clock` stamps the UI's own notes (the screen's clock: a test's fixed "now")."""
        super().__init__(max_lines=MAX_LINES, wrap=True, min_width=20, markup=False, highlight=False, **kwargs)
        self.clock = clock
        self.entries: list[Text] = []  # in time order, kept to wrap again at a new width
        self.times: list[float] = []  # each entry's time, for placing a late line
        self._wrapped_at = 0

    def on_mount(self) -> None:
        self.border_title = "Events"

    def add_events(self, events: list[dict[str, Any]]) -> None:
        rewrite = False
        for e in events[-MAX_LINES:]:
            when = float(e.get("time") or 0)
            stamp = time.strftime("%H:%M:%S", time.localtime(when))
            level = e.get("level") or "info"
            entry = Text.assemble((stamp + " ", "dim"), (e.get("message") or e.get("kind") or "", LEVEL.get(level, "")))
            at = bisect.bisect_right(self.times, when)
            self.times.insert(at, when)
            self.entries.insert(at, entry)
            if at < len(self.entries) - 1:
                rewrite = True  # older than a line shown: the log is written again, in order
            elif not rewrite:
                self.write(entry)
        if len(self.entries) > MAX_LINES:
            del self.entries[:-MAX_LINES], self.times[:-MAX_LINES]
        if rewrite:
            self._write_all()

    def _write_all(self) -> None:
        self.clear()
        for entry in self.entries:
            self.write(entry)

    def on_resize(self, event: Resize) -> None:
        """A log wraps its lines when written: at a new width, write them again (the layout can
        change the panel's width after the first lines came in)."""
        width = self.scrollable_content_region.width
        if self._wrapped_at and width and width != self._wrapped_at:
            self._write_all()
        self._wrapped_at = width

    def note(self, message: str, level: str = "info") -> None:
        """A line from the UI itself (the daemon went away, it came back)."""
        self.add_events([{"time": self.clock(), "level": level, "message": message}])
