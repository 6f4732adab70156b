"""SVG snapshots of the main screen with frozen data (fixed times, a fixed "now"): CPU mode and a
fake two-GPU status, at 80x24 and 160x48, and two GPUs at 200x60; the quality view at 80x24 and 160x48. Update with `pytest tests/test_tui_snapshots.py --snapshot-update`
after a deliberate change of the look, and review the SVGs."""

from __future__ import annotations

import time

import pytest

from engine.store.workspace import Workspace
from fake_daemon import NOW, FrozenSource
from pilot_waits import screen_loaded


from tui.app import TraindApp  # noqa: E402


@pytest.fixture(autouse=True)
def utc(monkeypatch):
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.mark.parametrize("gpus,size", [(0, (80, 24)), (2, (80, 24)), (0, (160, 48)), (2, (160, 48)), (2, (200, 60))],
                         ids=["cpu-80x24", "2gpu-80x24", "cpu-160x48", "2gpu-160x48", "2gpu-200x60"])
def test_main_screen(snap_compare, gpus, size):
    ws = Workspace.at("/srv/traind")  # never touched: the data is frozen; the path only shows in the header
    app = TraindApp(ws, start_daemon=False, source=FrozenSource(ws, gpus=gpus), clock=lambda: NOW)
    assert snap_compare(app, terminal_size=size, run_before=screen_loaded)


def test_daemon_gone(snap_compare):
    ws = Workspace.at("/srv/traind")
    app = TraindApp(ws, start_daemon=False, source=FrozenSource(ws, running=False), clock=lambda: NOW)

    async def settle(pilot):
        await screen_loaded(pilot)
        pilot.app.clear_notifications()  # the toast is tested in test_tui_app.py; the header is what stays
        await pilot.pause(0.1)

    assert snap_compare(app, terminal_size=(80, 24), run_before=settle)


@pytest.mark.parametrize("size", [(80, 24), (160, 48)], ids=["80x24", "160x48"])
def test_quality_view(snap_compare, size):
    ws = Workspace.at("/srv/traind")
    app = TraindApp(ws, start_daemon=False, source=FrozenSource(ws), clock=lambda: NOW)

    async def open_quality(pilot):
        await screen_loaded(pilot)
        await pilot.press("e")
        await pilot.pause(0.1)

    assert snap_compare(app, terminal_size=size, run_before=open_quality)
