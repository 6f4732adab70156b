"""The control socket, state/control.sock: commands to a running daemon.

Newline-delimited JSON over a unix socket of mode 0600 that answers only the
daemon's own user (checked from the peer's kernel credentials, SO_PEERCRED).
A request is `{"v": 1, "cmd": "pause", ...}` with the fields FIELDS names for
its command; every request gets exactly one reply
`{"v": 1, "ok": bool, "cmd": ..., "message": "...", ...}`. Anything malformed,
oversized, too deep, unknown or of the wrong type gets an error reply saying
what was wrong, never a crash or a traceback: handlers only ever see a request
whose fields have the types declared here, and a reply is always encodable.
The CLI, the TUI and scripts are all clients of `request()`.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.core.atomic import writing
from engine.store.workspace import WorkspaceError

VERSION = 1
MAX_REQUEST_BYTES = 64 * 1024
MAX_SOCKET_PATH = 107  # bytes in sockaddr_un's sun_path, less its terminating NUL (Linux)
MAX_DEPTH = 16  # a request is one flat object: deeper nesting is refused before the parser recurses into it
MAX_DIGITS = 100  # no field is a number, so a long one is refused before int() gets it
SHOWN_CHARS = 60  # how much of a received value an error message repeats


@dataclass(frozen=True)
class Field:
    kind: type  # str or bool: the only types a field has
    required: bool  # an optional field may be absent or null
    means: str


# The fields each command takes besides "v" and "cmd"; any other field is refused.
FIELDS: dict[str, dict[str, Field]] = {
    "pause": {"toggle": Field(bool, False, "resume instead when paused or a pause is on its way")},
    "resume": {}, "stop": {}, "start": {}, "checkpoint": {}, "skip": {}, "shutdown": {},
    "status": {},
    "snapshot": {"name": Field(str, False, "the new snapshot's name, default manual-TIME")},
    "remove_snapshot": {"name": Field(str, True, "the snapshot to remove")},
    "snapshots": {"verify": Field(bool, False, "verify every snapshot before listing")},
    "verify": {"name": Field(str, False, "the snapshot to verify, default all")},
    "rollback": {"name": Field(str, True, "the snapshot to roll back to")},
    "promote": {"job": Field(str, True, "the held job whose model becomes current"),
                "force": Field(bool, False, "even if the current model holds training accepted after the held "
                               "version's start: that training is dropped")},
    "requeue": {"job": Field(str, True, "the held job whose file goes back to the inbox")},
}
COMMANDS = tuple(FIELDS)
TYPE_NAMES = {(str, True): "a string", (str, False): "a string or null",
              (bool, True): "true or false", (bool, False): "true, false or null"}

Handler = Callable[[str, dict[str, Any], int | None], Awaitable[dict[str, Any]]]


class NotRunning(Exception):
    """No daemon answers on the socket: the caller may act without one."""


class NoReply(Exception):
    """The daemon took the request and went away, or did not answer in time: what it did is unknown."""


class BadRequest(ValueError):
    """A request line that is not a JSON object this daemon can read; the message says why."""


def known_command(cmd: Any) -> str | None:
    """cmd if it names a command, else None: all a reply ever echoes of what was sent."""
    return cmd if isinstance(cmd, str) and cmd in FIELDS else None


def shown(value: Any) -> str:
    """A received value for an error message: repr'd and cut short; never raises."""
    try:
        text = repr(value)
    except (ValueError, RecursionError):  # an int past Python's digit limit, a structure too deep
        text = f"a {type(value).__name__}"
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS - 3] + "..."


def reply(ok: bool, cmd: str | None, message: str, **fields: Any) -> dict[str, Any]:
    return {"v": VERSION, "ok": ok, "cmd": known_command(cmd), "message": message, **fields}


def encode_reply(answer: dict[str, Any]) -> bytes:
    """One JSON line. A reply that cannot be encoded (NaN, a non-JSON type) is a daemon bug: the
    client gets an error reply saying so instead of a closed connection."""
    try:
        return (json.dumps(answer, allow_nan=False) + "\n").encode()
    except (ValueError, TypeError, RecursionError) as e:
        cmd = answer.get("cmd") if isinstance(answer, dict) else None
        fallback = reply(False, cmd, f"internal error: the reply could not be encoded ({type(e).__name__}: {e})")
        return (json.dumps(fallback) + "\n").encode()


# Strings (closed or not) and brackets: what nesting_depth needs to see of a line.
_STRING_OR_BRACKET = re.compile(r'"(?:[^"\\]|\\.)*"?|[\[\]{}]', re.DOTALL)


def nesting_depth(text: str) -> int:
    """How deep arrays and objects nest in text, brackets inside strings not counted; at least as deep
    as the parser would go, and at most MAX_DEPTH + 1 (it stops counting there)."""
    if (opened := text.count("[") + text.count("{")) <= MAX_DEPTH:
        return opened
    depth = deepest = 0
    for m in _STRING_OR_BRACKET.finditer(text):
        c = m.group()
        if c in "[{":
            depth += 1
            deepest = max(deepest, depth)
            if deepest > MAX_DEPTH:
                break
        elif c in "]}":
            depth = max(depth - 1, 0)
    return deepest


def _no_constant(name: str) -> Any:
    raise BadRequest(f"{name} is not a JSON number")


def _bounded_int(digits: str) -> int:
    if len(digits) > MAX_DIGITS:
        raise BadRequest(f"a number of {len(digits)} digits (at most {MAX_DIGITS})")
    return int(digits)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise BadRequest(f"number {shown(text)} is out of range")
    return value


def decode(line: bytes) -> Any:
    """The JSON value of one request line; BadRequest saying why there is none."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRequest(f"not UTF-8 (byte {e.start} is {line[e.start:e.start + 1]!r})") from None
    if nesting_depth(text) > MAX_DEPTH:
        raise BadRequest(f"nested deeper than {MAX_DEPTH} levels")
    try:
        return json.loads(text, parse_constant=_no_constant, parse_int=_bounded_int, parse_float=_finite_float)
    except BadRequest:
        raise
    except ValueError as e:
        raise BadRequest(f"not JSON ({e})") from None


def check_fields(cmd: str, request: dict[str, Any]) -> str | None:
    """Why request's fields do not fit cmd, or None when they do."""
    fields = FIELDS[cmd]
    for key in request:
        if key not in fields and key not in ("v", "cmd"):
            takes = ", ".join(fields) if fields else "no fields"
            return f"{cmd}: unknown field {shown(key)} ({cmd} takes {takes})"
    for key, field in fields.items():
        value = request.get(key)
        expected = TYPE_NAMES[field.kind, field.required]
        if value is None:
            if field.required:
                return f"{cmd}: field {key!r} ({field.means}) is required: {expected}"
        elif type(value) is not field.kind:  # type(), not isinstance: true is not a number here
            return f"{cmd}: field {key!r} ({field.means}) must be {expected}, got {shown(value)}"
    return None


def parse_request(line: bytes) -> tuple[str | None, dict[str, Any] | None, str | None]:
    """(cmd, request, None) for a well-formed request, else (cmd or None, None, the reason). Never raises."""
    try:
        request = decode(line)
    except BadRequest as e:
        return None, None, f"malformed request: {e}"
    if not isinstance(request, dict):
        return None, None, f"malformed request: expected a JSON object, got {shown(request)}"
    cmd = known_command(request.get("cmd"))
    if "v" not in request:
        return cmd, None, f'no protocol version: expected "v": {VERSION}'
    v = request["v"]
    if type(v) is not int or v != VERSION:
        return cmd, None, f"protocol version {shown(v)} not supported: this daemon speaks {VERSION}"
    if cmd is None:
        return None, None, f"unknown command {shown(request.get('cmd'))}: expected one of {', '.join(COMMANDS)}"
    if error := check_fields(cmd, request):
        return cmd, None, error
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
        if len(os.fsencode(self.path)) > MAX_SOCKET_PATH:  # bind() would only say "AF_UNIX path too long"
            raise WorkspaceError(f"{self.path}: {len(os.fsencode(self.path))} bytes, and a unix socket's path has "
                                 f"at most {MAX_SOCKET_PATH}: the daemon cannot listen there; move the workspace to "
                                 "a shorter path")
        # We hold the workspace lock, so a socket file here is a dead daemon's.
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        old = os.umask(0o177)  # created 0600: no window in which another user could connect
        try:
            with writing(self.path):  # a full disk refusing the socket's inode is WriteFailed, as any write
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
                cmd, request, error = parse_request(line.removesuffix(b"\n"))
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
        writer.write(encode_reply(answer))
        await writer.drain()


def request(sock_path: Path, cmd: str, timeout: float = 120.0, **fields: Any) -> dict[str, Any]:
    """Send one command and wait for its reply (blocking; for the CLI and scripts). NotRunning when no daemon
    listens; NoReply when it goes away or gives no answer within `timeout` seconds."""
    data = b""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(sock_path))
            sock.sendall((json.dumps({"v": VERSION, "cmd": cmd, **fields}) + "\n").encode())
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        except (FileNotFoundError, ConnectionRefusedError):
            raise NotRunning(f"no traind daemon is running on {sock_path.parent.parent}") from None
        except (BrokenPipeError, ConnectionResetError):
            pass  # it went away: said below
        except TimeoutError:
            raise NoReply(f"the daemon on {sock_path.parent.parent} gave no answer to {cmd!r} within {timeout:g}s; "
                          "it may still act on it: see 'traind status' and 'traind events'") from None
    if not data.endswith(b"\n"):
        raise NoReply(f"the daemon on {sock_path.parent.parent} went away before answering; "
                      "see 'traind status' for what happened")
    return json.loads(data)
