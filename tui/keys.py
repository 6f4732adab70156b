"""The main screen's keys: the bindings, each key's name as typed, and the daemon's words made into keys.

One list (`KEYS`) feeds the key bar, `?` and the command palette, so the three
never disagree. The daemon's replies and state reasons are written for a shell
("'traind start' resumes"); `for_keys` names the key instead, for text shown in
the UI. Nothing here sends anything.
"""

from __future__ import annotations

import re

from textual.binding import Binding
from textual.keys import format_key

READ_ONLY = "read-only: started with --no-start"

# (key, action, label, what it does). The key bar shows the ones with show=True, in this order.
KEYS = [
    Binding("p", "pause", "pause", id="pause", tooltip="pause training at the next step, or resume it"),
    Binding("s", "stop", "stop", id="stop", tooltip="stop (confirm): checkpoint, end the worker, hold the queue"),
    Binding("S", "start", "start", id="start", tooltip="start: release a stopped queue, or start the daemon if none runs"),
    Binding("c", "checkpoint", "checkpoint", id="checkpoint", tooltip="save a checkpoint now; training goes on"),
    Binding("n", "snapshot", "snapshot", id="snapshot", tooltip="snapshot the current model now"),
    Binding("v", "verify", "verify", id="verify", tooltip="verify the selected snapshot"),
    Binding("r", "restore", "restore", id="restore", tooltip="restore the selected snapshot (confirm)"),
    Binding("x", "skip", "skip", id="skip", tooltip="skip the active file (confirm): it moves to queue/failed/"),
    # A held file's two answers; out of the key bar (it would take a second row at 120 columns): the queue
    # panel names them when a held file is highlighted.
    Binding("P", "promote", "promote", id="promote", show=False,
            tooltip="promote the selected held file (confirm): its model, which the quality gate held, becomes current"),
    Binding("R", "requeue", "requeue", id="requeue", show=False,
            tooltip="requeue the selected held file (confirm): it trains again, as a new job, on today's model"),
    Binding("e", "quality", "quality", id="quality",
            tooltip="quality: eval loss per source and the forgetting matrix, in the chart's place (e again: the chart)"),
    Binding("tab", "next_panel(1)", "panels", id="next_panel", tooltip="move to the next panel"),
    Binding("shift+tab", "next_panel(-1)", "previous panel", id="previous_panel", show=False,
            tooltip="move to the previous panel"),
    Binding("l", "chart_scope", "chart scope", id="chart_scope", show=False,
            tooltip="loss chart: this job, or every job of the run"),
    Binding("g", "chart_view", "chart view", id="chart_view", show=False,
            tooltip="loss chart: the loss, or the learning rate"),
    Binding("right_square_bracket", "smoothing(1)", "smoother", id="smoother", show=False,
            tooltip="loss chart: smooth the EMA line more"),
    Binding("left_square_bracket", "smoothing(-1)", "rougher", id="rougher", show=False,
            tooltip="loss chart: smooth the EMA line less"),
    Binding("question_mark", "help", "help", id="help", tooltip="this list of keys"),
    Binding("q", "app.quit", "quit", id="quit", tooltip="quit the UI; training goes on (the daemon keeps running)"),
]

# What the key bar calls them where room is short; `?` and the palette use the whole label.
SHORT = {"checkpoint": "ckpt", "snapshot": "snap"}

# Actions that change something (send a command, or start a daemon): refused when read-only.
CHANGES = {"pause", "stop", "start", "checkpoint", "snapshot", "verify", "restore", "skip", "promote", "requeue"}

# The CLI commands the daemon names, and the key that does the same here.
KEY_FOR_COMMAND = {"pause": "p", "resume": "p", "stop": "s", "start": "S", "checkpoint": "c", "snapshot": "n",
                   "skip": "x", "verify": "v", "rollback": "r"}
_COMMAND = re.compile(r"'traind (" + "|".join(KEY_FOR_COMMAND) + r")'")


def typed(key: str) -> str:
    """A binding's keys as a user types them: `?`, `[`, `shift+tab`, not `question_mark`."""
    return ", ".join(format_key(k.strip()) for k in key.split(","))


def key_of(action: str) -> str:
    """The key of a main-screen action, as typed."""
    return next((typed(b.key) for b in KEYS if b.action == action), action)


def for_keys(text: str) -> str:
    """Text from the daemon with its `'traind CMD'` hints made into the key that does it here."""
    return _COMMAND.sub(lambda m: f"key {KEY_FOR_COMMAND[m.group(1)]}", text)
