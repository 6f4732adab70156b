"""Waiting in Pilot tests for what the UI does on its own schedule (reader thread, listing poll,
chart redraws): poll until a condition holds, with a deadline generous enough for a loaded machine."""

from __future__ import annotations

import time


async def until(pilot, predicate, timeout: float = 10.0, what: str = "condition"):
    """The predicate's first truthy value; AssertionError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        await pilot.pause(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


async def screen_loaded(pilot) -> None:
    """The main screen shows its (frozen) status and snapshot listing, and the chart has redrawn."""
    from tui.widgets.loss_chart import REDRAW_INTERVAL
    from tui.widgets.snapshot_panel import SnapshotPanel

    screen = pilot.app.screen
    await until(pilot, lambda: screen.status and screen.query_one(SnapshotPanel).row_count, what="status and listings")
    await pilot.pause(REDRAW_INTERVAL + 0.1)  # the chart's redraw after its data (tui/widgets/loss_chart.py)
