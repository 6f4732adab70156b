"""What a user sees in a Pilot test: the screen's characters with their colours, and where a text shows
in which colour."""

from __future__ import annotations

# Colours by their ANSI number, normal and bright, as the app's terminal theme draws them: the alert colour
# (red: a failed file, a corrupt snapshot), the good one (green: a verified snapshot), held (yellow).
RED, GREEN, YELLOW = (1, 9), (2, 10), (3, 11)


def screen_rows(app) -> list[list[tuple[str, object]]]:
    """Each screen row as (character, foreground colour triplet or None) cells."""
    rows = []
    for strip in app.screen._compositor.render_strips():
        row = []
        for seg in strip:
            color = seg.style.color if seg.style else None
            row += [(ch, None if color is None or color.is_default else color.get_truecolor()) for ch in seg.text]
        rows.append(row)
    return rows


def on_screen(app, text: str, region=None) -> list:
    """The foreground colour of `text`'s first character, wherever it shows (within `region`)."""
    found = []
    for y, row in enumerate(screen_rows(app)):
        line = "".join(ch for ch, _ in row)
        x = line.find(text)
        while x >= 0:
            if region is None or region.contains(x, y):
                found.append(row[x][1])
            x = line.find(text, x + 1)
    return found


def shows_in(app, text: str, ansi: tuple[int, ...], region=None) -> bool:
    """`text` is on screen (within `region`), each time in one of the `ansi` colours."""
    colours = {app.ansi_theme.ansi_colors[i] for i in ansi}
    found = on_screen(app, text, region)
    return bool(found) and all(c in colours for c in found)
