"""`traind` with no arguments: the terminal UI on a workspace.

A client of the daemon: it reads what the daemon writes and sends commands on
the control socket. Quitting it never stops training. It never imports torch or
transformers (tests/test_tui_app.py checks), so its first frame is quick.
"""

from __future__ import annotations

import time
from pathlib import Path
from collections.abc import Callable, Iterable
from functools import partial

from textual.app import App, SystemCommand
from textual.screen import Screen

from engine.store.workspace import Workspace
from tui.keys import typed
from tui.screens.main import MainScreen, Source, WorkspaceSource


class TraindApp(App[None]):
    CSS_PATH = Path(__file__).with_name("app.tcss")  # absolute: subclasses elsewhere find it too
    TITLE = "traind"
    ENABLE_COMMAND_PALETTE = True

    def __init__(self, ws: Workspace, start_daemon: bool = True, *, read_only: bool = False,
                 source: Source | None = None, clock: Callable[[], float] = time.time) -> None:
        """`read_only` (`--no-start`): keys that would change anything say so instead. `source` and
        `clock` are for tests: frozen data and a fixed "now" for ages."""
        super().__init__()
        self.ws = ws
        self.start_daemon = start_daemon
        self.read_only = read_only
        self.source = source or WorkspaceSource(ws)
        self.clock = clock

    def get_default_screen(self) -> Screen:
        return MainScreen(self.ws, self.source, self.clock, read_only=self.read_only)

    def on_mount(self) -> None:
        self.title = f"traind {self.ws.root}"
        if self.start_daemon:
            self.screen.start_daemon()  # a thread worker: the first frame does not wait for it

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        if isinstance(screen, MainScreen):
            for b in screen.BINDINGS:
                if b.action.startswith("app."):
                    continue
                yield SystemCommand(f"{b.description} ({typed(b.key)})", b.tooltip or b.description,
                                    partial(screen.run_action, b.action))


def run(ws: Workspace, start_daemon: bool = True) -> int:
    """Open the UI on `ws`, starting a detached daemon first; with `start_daemon` False (`--no-start`) it
    starts none and is read-only, as nvitop's --readonly. 0 on quit."""
    TraindApp(ws, start_daemon, read_only=not start_daemon).run()
    print(f"traind: the UI closed; training goes on. 'traind status -w {ws.root}' shows it, 'traind' reopens the UI.")
    return 0
