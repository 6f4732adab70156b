"""Event log: alerts and lifecycle events from state/events.jsonl and the UI's own notes, in time order,
newest last, bounded in memory. Lines can come in out of order (the UI's note that no daemon runs is
written before the history is read): one older than the newest shown is put in its place. The entries
are kept and written again at the log's width when it changes or the log shows again: a hidden log (at
80 columns only the focused bottom panel shows) has no width to wrap at, so lines wait for it."""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable
from typing import Any

from rich.text import Text
from textual.events import Resize, Show
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
        self._wrapped_at = 0  # the width the lines shown were wrapped at (0: none written)

    def on_mount(self) -> None:
        self.border_title = "Events"

    def add_events(self, events: list[dict[str, Any]]) -> None:
        in_order = True
        added = []
        for e in events[-MAX_LINES:]:
            when = float(e.get("time") or 0)
            stamp = time.strftime("%H:%M:%S", time.localtime(when))
            level = e.get("level") or "info"
            entry = Text.assemble((stamp + " ", "dim"), (e.get("message") or e.get("kind") or "", LEVEL.get(level, "")))
            at = bisect.bisect_right(self.times, when)
            self.times.insert(at, when)
            self.entries.insert(at, entry)
            in_order = in_order and at == len(self.entries) - 1  # else older than a line shown
            added.append(entry)
        if len(self.entries) > MAX_LINES:
            del self.entries[:-MAX_LINES], self.times[:-MAX_LINES]
        if in_order and self._width() == self._wrapped_at:
            for entry in added:
                self.write(entry)
        else:  # out of order, or the lines shown were wrapped at another width: the log is written again
            self._write_all()

    def _width(self) -> int:
        return self.scrollable_content_region.width

    def _write_all(self) -> None:
        """Every entry, wrapped at the width the log has now. Hidden (at 80 columns the log shows only
        when focused) it has no width: the lines are written when it shows, not wrapped at min_width."""
        width = self._width()
        self._wrapped_at = width
        if not width:
            return
        self.clear()
        for entry in self.entries:
            self.write(entry)

    def on_resize(self, event: Resize) -> None:
        if self._width() != self._wrapped_at:
            self._write_all()

    def on_show(self, event: Show) -> None:
        """Shown again at the width it had when hidden: no Resize comes, but lines may have arrived."""
        if self._width() != self._wrapped_at:
            self._write_all()

    def note(self, message: str, level: str = "info") -> None:
        """A line from the UI itself (the daemon went away, it came back)."""
        self.add_events([{"time": self.clock(), "level": level, "message": message}])
