"""With 16 colours (a terminal Rich detects as "standard", e.g. TERM=xterm without COLORTERM) every
letter, digit and chart dot stays readable, and the colours that carry meaning stay apart.

Textual draws in true colour and the terminal writer downgrades each colour to the nearest of the 16
(`rich.color.Color.downgrade`, as `textual.strip.Strip.render` does on output); this applies the same
downgrade to every cell of the composed screen.
"""

from __future__ import annotations

import pytest
from rich.color import Color, ColorSystem

from engine.store.workspace import Workspace
from fake_daemon import NOW, FrozenSource
from pilot_waits import screen_loaded
from tui.app import TraindApp

RAW, EMA = "⢀", "⣿"  # any braille: the chart's dots


def sixteen(color: Color | None) -> int | None:
    """The terminal colour number a 16-colour terminal gets; None for the terminal's default."""
    if color is None or color.is_default:
        return None
    return color.downgrade(ColorSystem.STANDARD).number


def cells(app, region=None) -> list[tuple[str, int | None, int | None]]:
    """(character, foreground, background) of every cell on screen (or in `region`), as a 16-colour
    terminal shows them."""
    out = []
    for y, strip in enumerate(app.screen._compositor.render_strips()):
        x = 0
        for seg in strip:
            style = seg.style
            fg, bg = (sixteen(style.color), sixteen(style.bgcolor)) if style else (None, None)
            if style and style.reverse:
                fg, bg = bg, fg
            for ch in seg.text:
                if region is None or region.contains(x, y):
                    out.append((ch, fg, bg))
                x += 1
    return out


def readable(ch: str) -> bool:
    return ch.isalnum() or 0x2801 <= ord(ch) <= 0x28FF


@pytest.mark.parametrize("gpus,running,size", [(0, True, (120, 40)), (2, True, (80, 24)), (0, False, (80, 24)),
                                               (2, True, (200, 60))],
                         ids=["cpu-120x40", "2gpu-80x24", "offline-80x24", "2gpu-200x60"])
async def test_every_letter_and_dot_stays_visible_with_16_colours(gpus, running, size):
    ws = Workspace.at("/srv/traind")
    app = TraindApp(ws, start_daemon=False, source=FrozenSource(ws, gpus=gpus, running=running), clock=lambda: NOW)
    async with app.run_test(size=size) as pilot:
        await screen_loaded(pilot)
        app.clear_notifications()
        await pilot.pause(0.1)
        screen = cells(app)
        hidden = sorted({ch for ch, fg, bg in screen if readable(ch) and fg is not None and fg == bg})
        assert not hidden, f"characters drawn in their background's colour: {''.join(hidden)}"
        assert sum(1 for ch, _, _ in screen if 0x2801 <= ord(ch) <= 0x28FF) > 50, "no loss chart on screen"

        if not running:
            return
        chart = app.screen.query_one("#chart")
        styles = chart._styles()
        assert sixteen(styles.raw.color) != sixteen(styles.ema.color), "raw and EMA lines in one colour"

        await pilot.press("tab", "tab")  # the snapshot panel, then r: the confirm dialog
        await pilot.press("r")
        await pilot.pause(0.3)
        dialog = cells(app, app.screen.query_one("#confirm-dialog").region)  # the dimmed screen behind is meant to fade
        assert any(ch == "R" for ch, _, _ in dialog)
        hidden = sorted({ch for ch, fg, bg in dialog if readable(ch) and fg is not None and fg == bg})
        assert not hidden, f"the confirm dialog hides: {''.join(hidden)}"


@pytest.mark.parametrize("size", [(120, 40), (80, 24)], ids=["120x40", "80x24"])
async def test_the_quality_view_stays_readable_with_16_colours(size):
    ws = Workspace.at("/srv/traind")
    app = TraindApp(ws, start_daemon=False, source=FrozenSource(ws), clock=lambda: NOW)
    async with app.run_test(size=size) as pilot:
        await screen_loaded(pilot)
        app.clear_notifications()
        await pilot.press("e")
        await pilot.pause(0.2)
        panel = cells(app, app.screen.query_one("#quality").region)
        assert "00006-faq" in "".join(ch for ch, _, _ in panel), "the quality view is on screen"
        hidden = sorted({ch for ch, fg, bg in panel if readable(ch) and fg is not None and fg == bg})
        assert not hidden, f"the quality view hides: {''.join(hidden)}"
