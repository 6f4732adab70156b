"""The daemon's side of the fork server (engine/worker/forkserver.py): start it, and ask it for workers.

The server imports torch and transformers once; each worker it forks is ready
in a fraction of a second instead of 6-9 s. Until its socket exists (it binds
only once its imports are done) or after it died, workers start as plain
processes, as they always could: the server saves time, nothing depends on it.
`jobs.fork_server = false` turns it off. This module never imports torch.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from engine.core import testing


class ForkRefused(Exception):
    """The server could not fork a worker (it said why, or it is gone): start a plain process instead. `expected`:
    a request it must not serve (another environment), not a fault of the server."""

    def __init__(self, message: str, expected: bool = False):
        super().__init__(message)
        self.expected = expected


class ForkedWorker:
    """A worker the fork server started (not our child: the server reports its exit), as subprocess.Popen has it.

    Should the server die first, the kernel sends the worker SIGTERM (it asked for that); its exit is then
    watched through a pidfd, and reported as that signal, since no one can read its real status."""

    def __init__(self, conn: socket.socket, pid: int, early: bytes = b""):
        self.conn = conn
        self.pid = pid
        self.returncode: int | None = None
        self.buffer = b""
        self.pidfd: int | None = None
        self.stdin = self.stdout = None  # the caller's ends of the worker's pipes, where it keeps them here
        if early:
            self.take(early)

    def fileno(self) -> int:
        """What to wait on for the next news: the server's connection, or the pidfd once the server is gone."""
        return self.pidfd if self.pidfd is not None else self.conn.fileno()

    def poll(self) -> int | None:
        self.check(0.0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.returncode is None:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise subprocess.TimeoutExpired(f"worker {self.pid}", timeout)
            self.check(left)
        return self.returncode

    def check(self, timeout: float | None) -> None:
        if self.returncode is not None or not select.select([self.fileno()], [], [], timeout)[0]:
            return
        if self.pidfd is not None:
            self.gone()
            return
        chunk = self.conn.recv(4096)
        self.take(chunk)
        if self.returncode is None and not chunk:  # the server died before the worker
            self.conn.close()
            try:
                self.pidfd = os.pidfd_open(self.pid)
            except ProcessLookupError:
                self.gone()

    def take(self, chunk: bytes) -> None:
        self.buffer += chunk
        while b"\n" in self.buffer and self.returncode is None:
            line, self.buffer = self.buffer.split(b"\n", 1)
            message = json.loads(line)
            if "exit" in message:
                self.returncode = int(message["exit"])
                self.conn.close()

    def gone(self) -> None:
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None
        self.returncode = -signal.SIGTERM

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def fork(path: Path, argv: list[str], env: dict[str, str], cwd: Path, stdin: int, stdout: int,
         pass_fds: tuple[int, ...] = (), stderr: int | None = None) -> ForkedWorker:
    """`python ARGV` forked by the server at `path`, in a session of its own, with stdin, stdout, stderr (stdout's
    unless given) and pass_fds as subprocess would give them. Raises ForkRefused when it cannot."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.settimeout(10.0)
        conn.connect(str(path))
        request = json.dumps({"argv": argv, "env": env, "cwd": str(cwd), "pass_fds": list(pass_fds)}) + "\n"
        fds = array.array("i", [stdin, stdout, stdout if stderr is None else stderr, *pass_fds])
        conn.sendmsg([request.encode()], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
        answer = b""
        while b"\n" not in answer:
            chunk = conn.recv(4096)
            if not chunk:
                break
            answer += chunk
        line, _, early = answer.partition(b"\n")
        message = json.loads(line) if line else {"error": "the fork server closed the connection"}
    except (OSError, ValueError) as e:
        conn.close()
        raise ForkRefused(f"{type(e).__name__}: {e}") from None
    if "pid" not in message:
        conn.close()
        raise ForkRefused(message.get("error", f"unexpected answer {message!r}"), bool(message.get("expected")))
    return ForkedWorker(conn, int(message["pid"]), early)


class ForkedProcess:
    """A ForkedWorker as asyncio's subprocess.Process has it: `await wait()`, any number of waiters."""

    def __init__(self, worker: ForkedWorker, stdin: asyncio.StreamWriter | None):
        self.worker = worker
        self.stdin = stdin
        loop = asyncio.get_running_loop()
        self.exited: asyncio.Future[int] = loop.create_future()
        self.fd = worker.fileno()
        loop.add_reader(self.fd, self.on_readable)

    @property
    def pid(self) -> int:
        return self.worker.pid

    @property
    def returncode(self) -> int | None:
        return self.exited.result() if self.exited.done() else None

    def on_readable(self) -> None:
        code = self.worker.poll()
        if code is not None or self.worker.fileno() != self.fd:
            loop = asyncio.get_running_loop()
            loop.remove_reader(self.fd)
            if code is not None:
                self.exited.set_result(code)
            else:
                self.fd = self.worker.fileno()
                loop.add_reader(self.fd, self.on_readable)

    async def wait(self) -> int:
        return await asyncio.shield(self.exited)


class ForkServer:
    """The server process this daemon started (or, in tests, one it was pointed at)."""

    def __init__(self, path: Path, proc: subprocess.Popen | None):
        self.path = path
        self.proc = proc
        self.refused: str | None = None  # why the last fork failed, said once

    @classmethod
    def start(cls, path: Path, log_path: Path, env: dict[str, str], cwd: Path) -> "ForkServer":
        """Start the server; it serves once its imports are done (seconds), workers spawn meanwhile."""
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # we hold the workspace lock: a socket here is an earlier daemon's server's
        with open(log_path, "ab") as log:
            proc = subprocess.Popen([sys.executable, "-m", "engine.worker.forkserver", "--socket", str(path)],
                                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True, env=env, cwd=cwd)
        return cls(path, proc)

    @property
    def problem(self) -> str | None:
        """Why workers cannot come from this server now: a refused fork, or the server's exit."""
        if self.refused:
            return f"it could not start a worker: {self.refused}"
        if self.proc is not None and self.proc.poll() is not None:
            return f"it exited with code {self.proc.returncode}"
        return None

    @property
    def serving(self) -> bool:
        return (self.proc is None or self.proc.poll() is None) and self.path.exists()

    async def until_serving(self, timeout: float = 300.0) -> bool:
        """Whether it serves, once it has finished starting: waiting costs nothing a new python would not."""
        deadline = asyncio.get_running_loop().time() + timeout
        while not self.serving and self.problem is None and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        return self.serving

    def close(self) -> None:
        """End the server (its idle workers get SIGTERM from the kernel as it goes)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5.0)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()


async def start_worker(server: ForkServer, argv: list[str], env: dict[str, str], cwd: Path, log_fd: int,
                       pass_fds: tuple[int, ...], with_stdin: bool = True) -> ForkedProcess:
    """A worker forked by `server`, as asyncio.create_subprocess_exec would give it: its stdin a pipe we write to,
    or /dev/null (the launcher of several ranks, which talks over a socket)."""
    loop = asyncio.get_running_loop()
    read_fd, write_fd = os.pipe() if with_stdin else (os.open(os.devnull, os.O_RDONLY), None)
    try:
        worker = await asyncio.to_thread(fork, server.path, argv, env, cwd, read_fd, log_fd, pass_fds)
    except BaseException:
        if write_fd is not None:
            os.close(write_fd)
        raise
    finally:
        os.close(read_fd)
    if write_fd is None:
        return ForkedProcess(worker, None)
    transport, protocol = await loop.connect_write_pipe(lambda: asyncio.StreamReaderProtocol(asyncio.StreamReader()),
                                                        os.fdopen(write_fd, "wb", 0))
    return ForkedProcess(worker, asyncio.StreamWriter(transport, protocol, None, loop))


def for_daemon(root: Path, socket_path: Path, log_path: Path, wanted: bool, env: dict[str, str]) -> ForkServer | None:
    """The daemon's fork server: none when `jobs.fork_server` is off or for the scripted fake worker (it needs no
    torch), else the one a test pointed it at (the `fork_server` switch: one per test process, started with the
    environment the daemon's workers get), or a new one."""
    if not wanted or testing.get("worker_module"):
        return None
    if testing.get("fork_server"):
        return ForkServer(Path(testing.get("fork_server")), None)
    return ForkServer.start(socket_path, log_path, env, root)


# ---------------------------------------------------------------------------------------------
# The commands' worker-side processes (preview, eval, export): forked too where a server serves


def server_for(state_socket: Path) -> Path | None:
    """The server a command may ask: a test's, or the workspace daemon's while it runs (a stale socket is
    refused at connect, and the command starts its own python)."""
    path = testing.get("fork_server") or state_socket
    return Path(path) if path and Path(path).exists() else None


def run_python(argv: list[str], env: dict[str, str], server: Path | None, input: str = "",
               cwd: Path | None = None) -> subprocess.CompletedProcess:
    """subprocess.run([python, *argv], input=…, capture_output=True, text=True), forked by `server` if it can."""
    cwd = cwd or Path.cwd()
    if server is not None:
        with tempfile.TemporaryFile() as stdin, tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            stdin.write(input.encode())
            stdin.seek(0)
            try:
                worker = fork(server, argv, env, cwd, stdin.fileno(), out.fileno(), stderr=err.fileno())
            except ForkRefused:
                pass
            else:
                code = worker.wait()
                out.seek(0)
                err.seek(0)
                return subprocess.CompletedProcess(argv, code, out.read().decode(errors="replace"),
                                                   err.read().decode(errors="replace"))
    return subprocess.run([sys.executable, *argv], input=input, capture_output=True, text=True, env=env, cwd=cwd)


def stream_python(argv: list[str], env: dict[str, str], server: Path | None, input: str = ""):
    """A process whose output (stderr with stdout) is read as it comes, as subprocess.Popen(…, stdout=PIPE,
    stderr=STDOUT, text=True) gives it, forked by `server` if it can; `input` is its whole stdin."""
    if server is not None:
        with tempfile.TemporaryFile() as stdin:
            stdin.write(input.encode())
            stdin.seek(0)
            read_fd, write_fd = os.pipe()
            try:
                worker = fork(server, argv, env, Path.cwd(), stdin.fileno(), write_fd)
            except ForkRefused:
                os.close(read_fd)
            else:
                worker.stdout = os.fdopen(read_fd, "r", errors="replace")
                return worker
            finally:
                os.close(write_fd)
    proc = subprocess.Popen([sys.executable, *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    try:
        proc.stdin.write(input)
        proc.stdin.close()
    except BrokenPipeError:
        pass  # it died at start: its exit status and output say why
    return proc
