"""Snapshot panel: each snapshot with its verification state, age, size, source and how good its model
was on the eval suite (its own held-out change, its worst forgetting: in the alert colour past
`eval.max_forgetting`); the current model's origin marked. The highlighted row is what `v` verifies
and `r` restores.

`read_snapshots` reads manifests and verify.json only (engine.store.snapshots.list_snapshots);
call it from a thread worker, never on the event loop.
"""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.widgets import DataTable

from engine.quality.forgetting import percent
from engine.core.resources import format_bytes
from engine.store.workspace import Workspace
from engine.api.status import format_duration
from tui.quality import BAD, GOOD, VERDICT_STYLE

STATE = {"ok": ("verified", "green"), "corrupt": ("CORRUPT", "bold red"), "pending": ("pending", "yellow")}


def read_snapshots(ws: Workspace) -> tuple[list[dict[str, Any]], str | None]:
    """(snapshots as `traind snapshots --json` entries, oldest first; the current model's source snapshot)."""
    from engine.store import snapshots

    return [s.to_json() for s in snapshots.list_snapshots(ws)], snapshots.current_source_snapshot(ws)


def age(seconds: float) -> str:
    """A snapshot's age to the minute: it changes rarely, so the table seldom repaints."""
    return "<1m" if seconds < 60 else format_duration(seconds - seconds % 60).replace("m00s", "m")


def _source(src: dict[str, Any]) -> str:
    parts = [str(src.get("job_id") or src.get("model_version") or "?")]
    if src.get("step") is not None:
        parts.append(f"@{src['step']}")
    if isinstance(src.get("loss"), (int, float)):
        parts.append(f"loss {src['loss']:.3f}")
    return " ".join(parts)


def _eval(evaluated: dict[str, Any] | None, max_forgetting: float) -> Text:
    """'own -12% · worst +3% on 00005-docs' from the snapshot's eval summary (engine/quality/gate.py `summary`)."""
    out = Text()
    if not evaluated:
        return Text("-", "dim")
    if (own := evaluated.get("own_change")) is not None:
        out.append(f"own {percent(own)}", VERDICT_STYLE[GOOD] if own < 0 else "")
    elif evaluated.get("own_loss") is not None:
        out.append(f"own {evaluated['own_loss']:.3f}")
    if (worst := evaluated.get("worst_change")) is not None:
        out.append(" · " if out else "")
        out.append(f"worst {percent(worst)} on {evaluated.get('worst_source')}",
                   VERDICT_STYLE[BAD] if worst > max_forgetting else "")
    return out or Text("-", "dim")


class SnapshotPanel(DataTable):
    """Newest first, so the one most likely wanted is at the top."""

    shown: list[tuple] = []  # what is on screen, to skip repainting an unchanged listing

    def on_mount(self) -> None:
        self.cursor_type = "row"
        self.zebra_stripes = False
        self.add_columns("", "snapshot", "state", "age", "size", "source", "eval")
        self.border_title = "Snapshots"

    def show(self, snapshots: list[dict[str, Any]], current_from: str | None, now: float,
             max_forgetting: float = 0.05) -> None:
        rows = [(s["name"], s["verification"]["state"], age(now - s["created_at"]), s["size"],
                 _source(s.get("source") or {}), _eval((s.get("source") or {}).get("eval"), max_forgetting),
                 s["name"] == current_from) for s in reversed(snapshots)]
        if rows == self.shown:  # the listing is polled: repaint only what changed
            return
        self.shown = rows
        selected = self.selected_name
        self.clear()
        for name, state, shown_age, size, source, evaluated, is_origin in rows:
            label, style = STATE.get(state, (state, ""))
            mark = Text("◆", "bold cyan") if is_origin else Text(" ")
            self.add_row(mark, name, Text(label, style), shown_age, format_bytes(size), source, evaluated, key=name)
        self.border_subtitle = f"◆ current model's origin: {current_from}" if current_from else ""
        if selected is not None and selected in {s["name"] for s in snapshots}:
            self.move_cursor(row=self.get_row_index(selected))

    @property
    def selected_name(self) -> str | None:
        if not self.row_count:
            return None
        try:
            key, _ = self.coordinate_to_cell_key(self.cursor_coordinate)
        except Exception:
            return None
        return key.value
