"""What the command families share: the workspace a command names, and a daemon asked or worked around.

A command that changes the workspace asks the running daemon (the one writer) over its socket; with no daemon
running it does the work itself under the workspace lock, and records the change in the event log as the
daemon would have.
"""

from __future__ import annotations

import argparse
import sys

from engine.store.workspace import Workspace, resolve_root


def workspace(args: argparse.Namespace) -> Workspace:
    return Workspace.at(resolve_root(getattr(args, "workspace", None))).require()


def ask_daemon(ws: Workspace, cmd: str, **fields):
    """The daemon's reply, or None when no daemon runs (the caller then works under the lock itself)."""
    from engine.api import control

    try:
        return control.request(ws.control_socket, cmd, timeout=3600, **fields)
    except control.NotRunning:
        return None


def without_daemon(ws: Workspace, work, running: str = "try again") -> int:
    """Run `work()` holding the workspace lock, as the daemon would; refused (saying `running`) if a daemon runs."""
    from engine.store import snapshots
    from engine.tools import rebase
    from engine.store.lock import AlreadyRunning, DaemonLock

    lock = DaemonLock(ws.lock_path, ws.root)
    try:
        lock.acquire()
    except AlreadyRunning as e:
        print(f"traind: {e}; {running}", file=sys.stderr)
        return 1
    try:
        snapshots.clean_temp(ws)
        rebase.clean(ws)
        return work()
    finally:
        lock.release()


def answered(answer) -> int:
    print(answer["message"], file=sys.stdout if answer["ok"] else sys.stderr)
    return 0 if answer["ok"] else 1


def logged(ws: Workspace, kind: str, message: str, level: str = "info", **fields) -> str:
    """A change made with no daemon, in the event log as the daemon would have put it; returns the message."""
    from engine.store.eventlog import log_offline

    log_offline(ws, kind, message, level, **fields)
    return message

