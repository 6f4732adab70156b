"""state/events.jsonl: the durable log of lifecycle events and alerts.

Each event is one fsynced JSON line with a time, a kind (one of KINDS), a level
and a human sentence, so `traind status` and the TUI can show what happened and
why, after any crash. The daemon appends to it through its storage layer: an event the
disk refuses is kept in memory and written, in order, once space returns. A
command that changes the workspace with no daemon running (`traind snapshot`,
`rollback`, `promote`...) appends its own line with `log_offline`, under the
workspace lock, so every change is in the log.

Listeners (the metrics' counters, the alert hooks) are given each event after
it is appended; they must return at once: one that raises is a bug, said on the
console, and never stops the event or the others.
"""

from __future__ import annotations

import json
import time
import traceback
from collections.abc import Callable
from typing import Any, Protocol

from engine.core.atomic import append_json_line, dumps, read_tail
from engine.core.console import console, plain
from engine.store.storage import Storage
from engine.store.workspace import Workspace

LEVELS = ("info", "warning", "error")

# Every kind the daemon and the commands record (tests/test_hooks.py checks this against engine/): `traind events
# --kind` refuses a name outside them; a hooks.on name outside them is kept (kinds grow) but warned about.
KINDS = frozenset({
    "accepted", "attempt_failed", "blocked", "claim_failed", "command", "config_invalid", "config_no_effect",
    "config_reloaded", "cuda_oom", "daemon_started", "daemon_stopped", "eval_source_invalid", "file_changed", "held",
    "ignored", "internal_error", "job_done", "job_failed", "job_held", "job_interrupted", "job_skipped",
    "job_started", "metrics_failed", "metrics_serving", "model_unavailable", "promoted", "quality_warning",
    "prompt_invalid", "quarantined", "rebased", "recovered", "rejected", "requeued", "restarted", "rollback", "rolled_back",
    "rolled_back_model", "shutdown", "snapshot", "snapshot_corrupt", "snapshot_failed", "snapshot_kept",
    "snapshot_removed", "snapshot_verified", "snapshots_verified", "unblocked", "version_pruned", "worker_killed",
    "worker_start_failed",
})


class Reporter(Protocol):
    """What a part of the daemon says happened: an event, or an alert (an event the status shows as the last
    error). The daemon's reporter may be called from any thread (engine/supervisor/report.py)."""

    def emit(self, kind: str, message: str, level: str = "info", **fields: Any) -> None: ...

    def alert(self, kind: str, message: str, level: str = "error", **fields: Any) -> None: ...


class EventLog:
    def __init__(self, ws: Workspace, storage: Storage, echo: bool = True):
        self.path = ws.events_path
        self.storage = storage
        self.echo = echo
        self.listeners: list[Callable[[dict[str, Any]], None]] = []

    def emit(self, kind: str, message: str, level: str = "info", **fields: Any) -> dict[str, Any]:
        assert level in LEVELS
        event = {"time": time.time(), "kind": kind, "level": level, "message": message, **fields}
        self.storage.append(self.path, (dumps(event) + "\n").encode())
        if self.echo:
            console(message, level, kind, event["time"])
        for listener in self.listeners:
            try:
                listener(event)
            except Exception:  # a listener's bug must not become the daemon's
                console(f"internal error in an event listener:\n{traceback.format_exc().rstrip()}", "error",
                        "internal_error")
        return event


def log_offline(ws: Workspace, kind: str, message: str, level: str = "info", **fields: Any) -> None:
    """One event from a command run without a daemon (it holds the lock). A refused write is said, not raised:
    the change itself is made."""
    assert level in LEVELS
    try:
        append_json_line(ws.events_path, {"time": time.time(), "kind": kind, "level": level, "message": message,
                                          "offline": True, **fields})
    except OSError as e:
        plain(f"traind: warning: {ws.relative(ws.events_path)} not written ({e}): {message}")


def recent(ws: Workspace, limit: int = 20, window: int = 1 << 20) -> list[dict[str, Any]]:
    """The last events, read from the end of the log: the log grows for as long as the workspace lives."""
    data = read_tail(ws.events_path, window)
    events = []
    for line in data.splitlines(keepends=True):
        if line.endswith(b"\n"):
            try:
                events.append(json.loads(line))
            except ValueError:
                continue
    return events[-limit:]
