"""Event log: alerts and lifecycle events from state/events.jsonl, newest last, bounded in memory."""

from __future__ import annotations

import time
from typing import Any

from rich.text import Text
from textual.widgets import RichLog

LEVEL = {"info": "", "warning": "yellow", "error": "bold red"}
MAX_LINES = 500


class EventLog(RichLog):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(max_lines=MAX_LINES, wrap=True, min_width=20, markup=False, highlight=False, **kwargs)

    def on_mount(self) -> None:
        self.border_title = "Events"

    def add_events(self, events: list[dict[str, Any]]) -> None:
        for e in events[-MAX_LINES:]:
            stamp = time.strftime("%H:%M:%S", time.localtime(e.get("time") or 0))
            level = e.get("level") or "info"
            self.write(Text.assemble((stamp + " ", "dim"), (e.get("message") or e.get("kind") or "", LEVEL.get(level, ""))))

    def note(self, message: str, level: str = "info") -> None:
        """A line from the UI itself (the daemon went away, it came back)."""
        self.add_events([{"time": time.time(), "level": level, "message": message}])
