"""`?`: every key of the main screen, what it does, and that quitting leaves training running."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

from tui.keys import typed


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,q,question_mark", "dismiss", "close", id="help.close")]

    def __init__(self, bindings: list[Binding]) -> None:
        super().__init__()
        self.bindings = bindings

    def compose(self) -> ComposeResult:
        table = Table.grid(padding=(0, 2))
        table.add_column(style="bold cyan", no_wrap=True)
        table.add_column()
        for b in self.bindings:
            table.add_row(typed(b.key), b.tooltip or b.description)
        with VerticalScroll(id="help-dialog"):
            yield Static(Text("traind keys", style="bold"))
            yield Static(table)
            yield Static(Text("Every command goes to the daemon over state/control.sock; its answer shows as a "
                              "notification. Quitting the UI (q) never stops training. The command palette "
                              "(ctrl+p) lists every action too. Esc closes this.", style="dim"))
