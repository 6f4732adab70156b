"""Disk panel: the workspace filesystem's use as a bar with the reserve marked, and how many
more checkpoints of the last one's size fit above the reserve."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.widget import Widget

from engine.core.resources import format_bytes
from tui.widgets.gpu_panel import bar, joined, repaint


class DiskPanel(Widget):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.disk: dict[str, Any] | None = None

    def show(self, disk: dict[str, Any]) -> None:
        """New disk figures; repaints only if what shows changed, reflows only if its height did."""
        width = max(20, self.content_size.width)
        before = self.lines(self.disk, width) if self.disk is not None else None
        self.disk = disk
        if disk.get("total") and disk.get("free") is not None:
            self.set_class(disk["free"] < (disk.get("reserve") or 0), "-low")
        repaint(self, before, self.lines(disk, width))

    def render(self) -> Text:
        return joined(self.lines(self.disk or {}, max(20, self.content_size.width)))

    @staticmethod
    def lines(disk: dict[str, Any], width: int) -> list[Text]:
        total, free = disk.get("total"), disk.get("free")
        if not total or free is None:
            return [Text("no disk data yet", "dim")]
        reserve = disk.get("reserve") or 0
        suffix = f"{format_bytes(free)} free"
        room = max(4, min(width - len(suffix) - 1, 30))
        # The reserve is the last stretch of the bar: the mark is where writing stops.
        mark = min(room - 1, int((total - reserve) / total * room)) if reserve else None
        lines = [Text.assemble(bar((total - free) / total, room, {mark: "┃"} if mark is not None else None), " " + suffix),
                 Text.assemble(("┃", "bold magenta"), f" reserve {format_bytes(reserve)} of {format_bytes(total)}")]
        ckpt = disk.get("last_checkpoint_bytes")
        if ckpt:
            fit = max(0, (free - reserve) // ckpt)
            lines.append(Text.assemble(f"ckpt {format_bytes(ckpt)}: ",
                                       (f"{fit} more fit", "bold red" if fit < 2 else "bold")))
        return lines
