"""The TUI's side of the control socket: one request, one reply, without blocking the event loop.

Speaks engine/api/control.py's protocol (newline-delimited JSON, `{"v": 1, "cmd": ...}`)
over `asyncio.open_unix_connection`, so a key handler awaits the daemon's answer in
an async worker while the screen keeps drawing. It never sends anything the CLI
could not send, and it never retries a command on its own.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from engine.api.control import MAX_REQUEST_BYTES, VERSION, NotRunning

__all__ = ["NotRunning", "request", "timeout_for"]

# Commands that wait on hashing or a worker's step boundary get longer; the others answer at once.
SLOW = {"snapshot": 3600.0, "verify": 3600.0, "rollback": 3600.0, "stop": 600.0, "skip": 600.0,
        "checkpoint": 600.0, "shutdown": 600.0}


def timeout_for(cmd: str) -> float:
    return SLOW.get(cmd, 60.0)


async def request(sock_path: Path, cmd: str, timeout: float | None = None, **fields: Any) -> dict[str, Any]:
    """Send `cmd` and return the daemon's reply; NotRunning when no daemon answers, TimeoutError when it is slow."""
    timeout = timeout_for(cmd) if timeout is None else timeout
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_unix_connection(str(sock_path), limit=MAX_REQUEST_BYTES * 16), 5.0)
    except (FileNotFoundError, ConnectionRefusedError):
        raise NotRunning(f"no traind daemon is running on {sock_path.parent.parent}") from None
    try:
        writer.write((json.dumps({"v": VERSION, "cmd": cmd, **fields}) + "\n").encode())
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), timeout)
    except (ConnectionError, BrokenPipeError):
        raise NotRunning(f"the daemon on {sock_path.parent.parent} closed the connection") from None
    finally:
        writer.close()
    if not line:
        raise NotRunning(f"the daemon on {sock_path.parent.parent} closed the connection without a reply")
    return json.loads(line)
