"""The key bar at the bottom: every key the footer should show, wrapped onto a second row rather than cut.

Textual's Footer keeps one row and cuts what does not fit (at 80 columns it
hid v, r, x and ^p). This bar lays the same bindings out by width: one row
where they fit, two (or more) where they do not; an item is never split. It
only draws: the keys themselves are the screen's bindings.
"""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.binding import Binding
from textual.geometry import Size
from textual.widget import Widget

from tui.keys import SHORT, typed


class KeyBar(Widget):
    COMPONENT_CLASSES = {"key-bar--key", "key-bar--label"}
    DEFAULT_CSS = """
    KeyBar {
        height: auto;
        background: $footer-background;
        padding: 0 1;
    }
    KeyBar > .key-bar--key {
        color: $footer-key-foreground;
        text-style: bold;
    }
    KeyBar > .key-bar--label {
        color: $footer-description-foreground;
    }
    """

    def __init__(self, bindings: list[Binding], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.items = [(typed(b.key).replace("ctrl+", "^"), SHORT.get(b.description, b.description))
                      for b in bindings if b.show]

    def lines_at(self, width: int) -> list[list[tuple[str, str]]]:
        """The items, greedily in rows of at most `width` cells (single spaces between)."""
        rows: list[list[tuple[str, str]]] = [[]]
        used = 0
        for key, label in self.items:
            size = len(key) + 1 + len(label)
            if rows[-1] and used + 1 + size > width:
                rows.append([])
                used = 0
            used += size + (1 if rows[-1] else 0)
            rows[-1].append((key, label))
        return rows

    def get_content_height(self, container: Size, viewport: Size, width: int) -> int:
        return len(self.lines_at(max(1, width)))

    def render(self) -> Text:
        width = max(1, self.content_size.width)
        key_style = self.get_component_rich_style("key-bar--key")
        label_style = self.get_component_rich_style("key-bar--label")
        rows = []
        for row in self.lines_at(width):
            line = Text()
            for i, (key, label) in enumerate(row):
                line.append(" " if i else "")
                line.append(key, key_style)
                line.append(" " + label, label_style)
            rows.append(line)
        text = Text("\n").join(rows)
        text.no_wrap = True
        return text
