"""The control socket, state/control.sock: commands to a running daemon.

Newline-delimited JSON over a unix socket of mode 0600 that answers only the
daemon's own user (checked from the peer's kernel credentials, SO_PEERCRED).
A request is `{"v": 1, "cmd": "pause", ...}`; every request gets exactly one
reply `{"v": 1, "ok": bool, "cmd": ..., "message": "...", ...}`. Anything
malformed, oversized or unknown gets an error reply, never a crash. The CLI,
the TUI and scripts are all clients of `request()`.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

VERSION = 1
COMMANDS = ("pause", "resume", "stop", "start", "checkpoint", "skip", "shutdown", "status",
            "snapshot", "remove_snapshot", "snapshots", "verify", "rollback")
MAX_REQUEST_BYTES = 64 * 1024

Handler = Callable[[str, dict[str, Any], int | None], Awaitable[dict[str, Any]]]


class NotRunning(Exception):
    """No daemon answers on the socket: the caller may act without one."""


class NoReply(Exception):
    """The daemon took the request and went away before answering: what it did is unknown."""


def reply(ok: bool, cmd: str | None, message: str, **fields: Any) -> dict[str, Any]:
    return {"v": VERSION, "ok": ok, "cmd": cmd, "message": message, **fields}


def parse_request(line: bytes) -> tuple[str | None, dict[str, Any] | None, str | None]:
    """(cmd, request, None) for a well-formed request, else (cmd or None, None, the reason)."""
    try:
        request = json.loads(line)
    except ValueError as e:
        return None, None, f"malformed request: not JSON ({e})"
    if not isinstance(request, dict):
        return None, None, "malformed request: expected a JSON object"
    cmd = request.get("cmd")
    if request.get("v") != VERSION:
        return cmd, None, f"protocol version {request.get('v')!r} not supported: this daemon speaks {VERSION}"
    if cmd not in COMMANDS:
        return cmd, None, f"unknown command {cmd!r}: expected one of {', '.join(COMMANDS)}"
    return cmd, request, None


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end, from the kernel."""
    data = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", data)


class ControlServer:
    def __init__(self, path: Path, handler: Handler):
        self.path = path
        self.handler = handler
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        # We hold the workspace lock, so a socket file here is a dead daemon's.
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        old = os.umask(0o177)  # created 0600: no window in which another user could connect
        try:
            self.server = await asyncio.start_unix_server(self.serve_client, path=str(self.path),
                                                          limit=MAX_REQUEST_BYTES + 1)
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    async def serve_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            pid, uid, _ = peer_credentials(writer.get_extra_info("socket"))
            if uid != os.getuid():
                try:  # let the request arrive, so the refusal is its reply rather than a reset
                    await asyncio.wait_for(reader.readline(), 5.0)
                except (asyncio.TimeoutError, ValueError, asyncio.LimitOverrunError):
                    pass
                await self.send(writer, reply(False, None, f"permission denied: this daemon answers only uid {os.getuid()}"))
                return
            while True:
                try:
                    line = await reader.readline()
                except (ValueError, asyncio.LimitOverrunError):
                    await self.send(writer, reply(False, None, f"request over {MAX_REQUEST_BYTES} bytes"))
                    return  # the rest of that line is unread: the stream cannot be trusted
                if not line:
                    return
                if not line.strip():
                    continue
                cmd, request, error = parse_request(line)
                if error:
                    await self.send(writer, reply(False, cmd, error))
                    continue
                try:
                    answer = await self.handler(cmd, request, pid)
                except Exception as e:  # a bug in a handler must not take the daemon down
                    answer = reply(False, cmd, f"internal error: {type(e).__name__}: {e}")
                await self.send(writer, answer)
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    @staticmethod
    async def send(writer: asyncio.StreamWriter, answer: dict[str, Any]) -> None:
        writer.write((json.dumps(answer, allow_nan=False) + "\n").encode())
        await writer.drain()


def request(sock_path: Path, cmd: str, timeout: float = 120.0, **fields: Any) -> dict[str, Any]:
    """Send one command and wait for its reply (blocking; for the CLI and scripts)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(sock_path))
        except (FileNotFoundError, ConnectionRefusedError):
            raise NotRunning(f"no traind daemon is running on {sock_path.parent.parent}") from None
        sock.sendall((json.dumps({"v": VERSION, "cmd": cmd, **fields}) + "\n").encode())
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    if not data.endswith(b"\n"):
        raise NoReply(f"the daemon on {sock_path.parent.parent} went away before answering; "
                      "see 'traind status' for what happened")
    return json.loads(data)
