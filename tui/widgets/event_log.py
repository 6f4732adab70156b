"""Event log: alerts and lifecycle events from state/events.jsonl, newest last, bounded in memory."""

from __future__ import annotations

import time
from collections import deque
from typing import Any

from rich.text import Text
from textual.events import Resize
from textual.widgets import RichLog

LEVEL = {"info": "", "warning": "yellow", "error": "bold red"}
MAX_LINES = 500


class EventLog(RichLog):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(max_lines=MAX_LINES, wrap=True, min_width=20, markup=False, highlight=False, **kwargs)
        self.entries: deque[Text] = deque(maxlen=MAX_LINES)  # kept to wrap again at a new width
        self._wrapped_at = 0

    def on_mount(self) -> None:
        self.border_title = "Events"

    def add_events(self, events: list[dict[str, Any]]) -> None:
        for e in events[-MAX_LINES:]:
            stamp = time.strftime("%H:%M:%S", time.localtime(e.get("time") or 0))
            level = e.get("level") or "info"
            entry = Text.assemble((stamp + " ", "dim"), (e.get("message") or e.get("kind") or "", LEVEL.get(level, "")))
            self.entries.append(entry)
            self.write(entry)

    def on_resize(self, event: Resize) -> None:
        """A log wraps its lines when written: at a new width, write them again (the layout can
        change the panel's width after the first lines came in)."""
        width = self.scrollable_content_region.width
        if self._wrapped_at and width and width != self._wrapped_at:
            self.clear()
            for entry in self.entries:
                self.write(entry)
        self._wrapped_at = width

    def note(self, message: str, level: str = "info") -> None:
        """A line from the UI itself (the daemon went away, it came back)."""
        self.add_events([{"time": time.time(), "level": level, "message": message}])
