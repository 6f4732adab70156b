"""Start a daemon for the TUI when none runs, detached, the way tmux starts its server.

The daemon gets its own session (no terminal, no SIGHUP when the TUI's terminal
goes), stdin from /dev/null and its output appended to state/daemon.log. This
module never stops a daemon: quitting the TUI leaves training running.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from engine.store import lock
from engine.store.workspace import Workspace

ROOT = Path(__file__).resolve().parent.parent


def log_path(ws: Workspace) -> Path:
    return ws.state / "daemon.log"


def listening(path: Path) -> bool:
    """Whether a server accepts connections on the unix socket `path` (a file left by a daemon that
    died is not one)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


def ensure_daemon(ws: Workspace, wait: float = 3.0) -> int | None:
    """PID of the workspace's daemon, starting one if none holds the lock; None if none took it within `wait` s."""
    pid = lock.holder(ws.lock_path)
    if pid is not None:
        return pid
    ws.state.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    # The child must find engine/ the way this process did, wherever its cwd is.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    with open(log_path(ws), "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "daemon", "-w", str(ws.root)],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, close_fds=True, cwd=str(ws.root), env=env)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        pid = lock.holder(ws.lock_path)
        if pid is not None and listening(ws.control_socket):  # locked and answering: ready for commands
            return pid
        if proc.poll() is not None:  # it exited: another daemon won the race, or it could not start
            return lock.holder(ws.lock_path)
        time.sleep(0.05)
    return None
