"""One daemon per workspace (and one `traind node` per name): an flock on a file that is never deleted.

The kernel drops the lock when its holder dies, however it dies, so a killed
daemon never blocks the next start. The holder writes its PID into the file so
a refused start can name it; on a full disk that write may wait (the lock holds
without it).
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from engine.core.atomic import writing


class AlreadyRunning(Exception):
    def __init__(self, pid: int | None, workspace: Path, what: str = "traind daemon"):
        self.pid = pid
        who = f"PID {pid}" if pid else "PID unknown"
        super().__init__(f"another {what} ({who}) is running on {workspace}")


def _read_pid(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).split()[0])
    except (ValueError, IndexError, OSError):
        return None


class DaemonLock:
    def __init__(self, path: Path, workspace: Path, what: str = "traind daemon"):
        self.path = path
        self.workspace = workspace
        self.what = what
        self.fd: int | None = None

    def acquire(self, write_pid: bool = True) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _read_pid(fd)
            os.close(fd)
            raise AlreadyRunning(pid, self.workspace, self.what) from None
        self.fd = fd
        if write_pid:
            self.write_pid()

    def write_pid(self) -> None:
        """Overwrite in place, then trim: a reader sees the old PID or the new one, never nothing."""
        assert self.fd is not None
        data = f"{os.getpid()}\n".encode()
        with writing(self.path):
            os.pwrite(self.fd, data, 0)
            os.ftruncate(self.fd, len(data))
            os.fsync(self.fd)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def holder(path: Path) -> int | None:
    """PID of the daemon holding the lock, or None when no daemon runs (the lock is free)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_pid(fd) or -1
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
