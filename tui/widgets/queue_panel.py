"""Queue panel: the active file, the pending ones in the order they will be taken, then held (their
model failed the quality gate, in yellow), failed, rejected and done files; the highlighted file's
whole name and reason show underneath, and for a held file the keys that promote or requeue it.

`read_queue` lists folders and reads reason files; call it from a thread worker.
"""

from __future__ import annotations

import json
import os
from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import DataTable, Static

from engine.core import reading
from engine.data import intake
from engine.store.workspace import Workspace
from tui.keys import key_of

DONE_SHOWN = 20  # done files only grow; the newest few are enough here
STYLE = {"active": "bold green", "pending": "cyan", "done": "dim", "held": "bold yellow", "failed": "bold red",
         "rejected": "red"}


def _reason(folder: str, name: str) -> str | None:
    try:
        with open(os.path.join(folder, name + ".reason.json"), "rb") as f:
            return json.loads(f.read()).get("reason")
    except (OSError, ValueError, AttributeError):
        return None


def read_queue(ws: Workspace) -> list[dict[str, Any]]:
    """[{state, name, reason}] in display order."""
    out: list[dict[str, Any]] = []

    def names(folder) -> list[os.DirEntry]:
        try:
            return [e for e in os.scandir(folder) if reading.suffix(e.name) and not e.name.startswith(".")]
        except FileNotFoundError:
            return []

    def arrived(entries: list[os.DirEntry]) -> list[os.DirEntry]:
        """In the order intake will take them (engine/data/intake.py), which is not the files' mtime order."""
        def key(e: os.DirEntry) -> tuple[int, str]:
            try:
                return intake.arrival_key(e.name, e.stat(follow_symlinks=False))
            except OSError:
                return (0, e.name)
        return sorted(entries, key=key)

    out += [{"state": "active", "name": e.name, "reason": None} for e in sorted(names(ws.queue("active")), key=lambda e: e.name)]
    # Claimed (in job-number order, the order they train in), then still in the inbox (in arrival order).
    out += [{"state": "pending", "name": e.name, "reason": None}
            for e in [*sorted(names(ws.queue("pending")), key=lambda e: e.name), *arrived(names(ws.inbox))]]
    for state in ("held", "failed", "rejected"):  # held: its model failed the quality gate (the reason says how)
        folder = ws.queue(state)
        out += [{"state": state, "name": e.name, "reason": _reason(str(folder), e.name)}
                for e in sorted(names(folder), key=lambda e: e.name, reverse=True)]
    done = sorted(names(ws.queue("done")), key=lambda e: e.name, reverse=True)[:DONE_SHOWN]
    out += [{"state": "done", "name": e.name, "reason": None} for e in done]
    return out


class QueueTable(DataTable):
    def on_mount(self) -> None:
        self.cursor_type = "row"
        self.add_columns("state", "file")


class QueuePanel(Vertical):
    """A table of files and a line for the highlighted one's reason."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.entries: list[dict[str, Any]] = []

    def compose(self) -> ComposeResult:
        yield QueueTable(id="queue-table")
        yield Static("", id="queue-reason")

    def on_mount(self) -> None:
        self.border_title = "Queue"
        self.table = self.query_one(QueueTable)
        self.reason = self.query_one("#queue-reason", Static)

    def show(self, entries: list[dict[str, Any]]) -> None:
        if entries == self.entries:
            return
        self.entries = entries
        row = self.table.cursor_row
        self.table.clear()
        for e in entries:
            self.table.add_row(Text(e["state"], STYLE[e["state"]]), e["name"])
        if entries:
            self.table.move_cursor(row=min(row, len(entries) - 1))
        counts = {s: sum(1 for e in entries if e["state"] == s) for s in STYLE}
        held = f" · {counts['held']} held" if counts["held"] else ""  # held: its model waits for promote or requeue
        self.border_subtitle = (f"{counts['pending']} pending{held} · {counts['failed']} failed · "
                                f"{counts['rejected']} rejected")
        self._show_reason()

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        event.stop()
        self._show_reason()

    @property
    def selected(self) -> dict[str, Any] | None:
        """The highlighted entry ({state, name, reason}), if any."""
        row = self.table.cursor_row
        return self.entries[row] if 0 <= row < len(self.entries) else None

    def _show_reason(self) -> None:
        """The highlighted file's whole name (the table cuts long ones), why it is where it is, and for a held
        file what can be done with it."""
        entry = self.selected
        if entry is None:
            self.reason.update("")
            return
        line = Text(entry["name"], "bold")
        if entry["reason"]:
            line.append(f" {entry['state']}: {entry['reason']}", STYLE[entry["state"]])
        if entry["state"] == "held":
            line.append(f" ({key_of('promote')} promote, {key_of('requeue')} requeue)", "dim")
        self.reason.update(line)
