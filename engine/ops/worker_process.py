"""The daemon's side of a worker subprocess: spawn, talk, signal, reap, and clean up orphans.

A worker runs `python -m engine.worker` in its own session and process group,
so the daemon can signal everything it started (data loaders included) with one
`killpg`, and a terminal's Ctrl-C never reaches it directly. One process talks
over an inherited pipe (events) and its stdin (the job spec, then control
lines); several (`training.processes`, `[distributed] nodes`) run under
engine/worker/launch.py, PyTorch's elastic agent, whose rank 0 connects to a
unix socket the daemon listens on (state/worker.sock): events one way, the spec
and control lines the other. Its pid, group and
kernel start time are recorded in state/worker.json so that a daemon started
after a crash can kill a worker group its predecessor left behind, and never a
process that merely reused the pid. This module never imports torch.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import engine
from engine.core import protocol, testing
from engine.ops import forkserver
from engine.store import statefiles
from engine.core.atomic import write_json_atomic
from engine.ops.forkserver import ForkServer
from engine.store.workspace import Workspace

# Events are small; a longer line from a confused worker is dropped, not buffered without bound.
EVENT_LINE_LIMIT = 1 << 20


def process_start_ticks(pid: int) -> int | None:
    """The kernel's start time of a process (field 22 of /proc/PID/stat), or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return int(stat[stat.rindex(b")") + 2:].split()[19])


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def worker_env() -> dict[str, str]:
    env = testing.with_switches(os.environ, faults=None)  # injected write faults are the daemon's; the worker
    # has its own disk gate. The worker must import this very checkout of engine/, whatever the current directory.
    root = str(Path(engine.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    return env


def agent_env(processes: int) -> dict[str, str]:
    """The elastic agent's environment, which its ranks inherit: with several ranks a machine, one OpenMP thread
    each unless OMP_NUM_THREADS says otherwise, as torchrun gives them (they would share the cores), and then
    the agent forks its ranks' server without a new python (engine/worker/launch.py)."""
    env = worker_env()
    if processes > 1:
        env.setdefault("OMP_NUM_THREADS", "1")
    return env


Link = tuple[asyncio.StreamReader, asyncio.StreamWriter]  # events in, spec and control lines out


class WorkerProcess:
    def __init__(self, proc: asyncio.subprocess.Process, link: "asyncio.Future[Link]", record_path: Path,
                 processes: int = 1):
        self.proc = proc
        self.link = link  # done once the worker can be talked to: at once for a pipe, on connect for the socket
        self.closer: asyncio.Task | None = None  # the socket's listener, until rank 0 connects
        self.record_path = record_path
        self.spawned_at = time.monotonic()
        self.ready = False
        self.job_id: str | None = None
        self.processes = processes  # training processes (ranks) in the group

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None

    @classmethod
    async def spawn(cls, ws: Workspace, log_path: Path, append: bool = False, processes: int = 1,
                    launch: list[str] | None = None, forks: ForkServer | None = None) -> "WorkerProcess":
        """A worker, forked by `forks` when it serves, else a new python; with `processes` > 1 or a `launch`
        (engine.worker.launch's arguments for several machines), the elastic agent and its ranks."""
        loop = asyncio.get_running_loop()
        link: asyncio.Future[Link] = loop.create_future()
        if processes > 1 or launch:
            server = await listen_once(ws.worker_socket, link)
            argv = ["-m", "engine.worker.launch", "--processes", str(processes), "--channel", str(ws.worker_socket),
                    *(launch or [])]
            stdin, pass_fds, env = subprocess.DEVNULL, (), agent_env(processes)
        else:
            server = None
            read_fd, write_fd = os.pipe()
            argv = ["-m", testing.get("worker_module") or "engine.worker", "--events-fd", str(write_fd)]
            stdin, pass_fds, env = subprocess.PIPE, (write_fd,), worker_env()
        with open(log_path, "ab" if append else "wb") as log:
            proc = None
            if forks is not None and await forks.until_serving():
                try:
                    proc = await forkserver.start_worker(forks, argv, env, ws.root, log.fileno(), pass_fds,
                                                         with_stdin=server is None)
                except forkserver.ForkRefused as e:
                    if not e.expected:
                        forks.refused = str(e)  # the daemon says it once; this worker starts as a new python
            if proc is None:
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, *argv, stdin=stdin, stdout=log, stderr=subprocess.STDOUT,
                    pass_fds=pass_fds, start_new_session=True, env=env, cwd=ws.root)
        closer = None
        if server is None:
            os.close(write_fd)
            reader = asyncio.StreamReader(limit=EVENT_LINE_LIMIT)
            await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(read_fd, "rb", 0))
            link.set_result((reader, proc.stdin))
        else:
            closer = asyncio.create_task(close_when_linked(server, link, proc, ws.worker_socket))
        try:
            write_json_atomic(ws.worker_record, {"pid": proc.pid, "pgid": proc.pid,
                                                 "start_ticks": process_start_ticks(proc.pid), "spawned_at": time.time()})
        except BaseException:  # unrecorded, a later daemon could not find it: it must not outlive this call
            signal_group(proc.pid, signal.SIGKILL)
            await proc.wait()
            raise
        worker = cls(proc, link, ws.worker_record, processes)
        worker.closer = closer  # held: the loop keeps only a weak reference to a task
        return worker

    async def until_ready(self) -> bool:
        """Wait for the `ready` event (imports done); False if the worker died first."""
        if not self.ready:
            event = await self.next_event()
            while event is not None and not self.ready:
                event = await self.next_event()
        return self.ready

    async def send_job(self, spec: protocol.JobSpec) -> None:
        self.job_id = spec.job_id
        await self.send_line(spec.to_json())

    async def send_line(self, line: str) -> bool:
        """One line to the worker (rank 0); False if it has gone (or never connected)."""
        if not self.alive or await self.linked() is None:
            return False
        writer = self.link.result()[1]
        try:
            writer.write((line + "\n").encode())
            await writer.drain()
            return True
        except (BrokenPipeError, ConnectionResetError):
            return False

    async def linked(self) -> Link | None:
        """The link once it is up; None if the worker exited before rank 0 connected (close_when_linked
        cancels the link then)."""
        await asyncio.wait({self.link})
        return None if self.link.cancelled() else self.link.result()

    async def next_event(self) -> dict[str, Any] | None:
        """The next well-formed event, or None once the worker closed its end (it exited)."""
        if (link := await self.linked()) is None:
            return None
        while True:
            try:
                line = await link[0].readline()
            except (ValueError, asyncio.LimitOverrunError):
                continue
            if not line:
                return None
            try:
                event = protocol.parse_event(line)
            except ValueError:
                continue
            if event["event"] == "ready":
                self.ready = True
            return event

    def signal(self, sig: int) -> None:
        if self.alive:
            signal_group(self.pid, sig)

    async def wait(self) -> int:
        code = await self.proc.wait()
        # Anything the worker started (data loaders) goes with it.
        signal_group(self.pid, signal.SIGKILL)
        return code

    async def dismiss(self, grace: float = 5.0) -> None:
        """End an idle worker: EOF on stdin asks it to leave; the group is killed after the grace."""
        if not self.ready:  # still importing: it holds nothing worth waiting for
            grace = 0.0
        if self.alive and self.link.done() and not self.link.cancelled():
            self.link.result()[1].close()
        try:
            await asyncio.wait_for(self.proc.wait(), grace)
        except asyncio.TimeoutError:
            self.signal(signal.SIGKILL)
            await self.proc.wait()
        signal_group(self.pid, signal.SIGKILL)


async def listen_once(path: Path, link: "asyncio.Future[Link]") -> asyncio.AbstractServer:
    """The socket rank 0 connects to; only the first connection is the worker's."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # we hold the workspace lock: a socket file here is an earlier worker's

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if link.done():
            writer.close()
        else:
            link.set_result((reader, writer))

    server = await asyncio.start_unix_server(on_connect, str(path), limit=EVENT_LINE_LIMIT)
    os.chmod(path, 0o600)
    return server


async def close_when_linked(server: asyncio.AbstractServer, link: "asyncio.Future[Link]",
                            proc: asyncio.subprocess.Process, path: Path) -> None:
    """Stop listening once rank 0 is connected, or the worker is gone without connecting."""
    exited = asyncio.ensure_future(proc.wait())
    await asyncio.wait({link, exited}, return_when=asyncio.FIRST_COMPLETED)
    if not link.done():
        link.cancel()
    exited.cancel()
    server.close()
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"killed by {name}"
    return f"exit code {code}"


def kill_orphan(ws: Workspace, grace: float) -> int | None:
    """Kill the worker group a crashed daemon left behind; returns its pid if there was one.

    It gets SIGTERM first (so a worker mid-job can checkpoint: it was already told
    to by its parent-death signal), then SIGKILL after the grace period.
    """
    record = statefiles.read_or_none(ws.worker_record, statefiles.WORKER)
    if record is None:  # none, or damaged (quarantined): the worker's parent-death signal ended it anyway
        return None
    pid, pgid = record["pid"], record["pgid"]
    if not pid or not pgid:
        return None
    same_process = process_start_ticks(pid) == record.get("start_ticks") and record.get("start_ticks") is not None
    if not same_process and not group_alive(pgid):
        return None
    if same_process:
        signal_group(pgid, signal.SIGTERM)
    elif process_start_ticks(pgid) is not None:
        return None  # the pid and group id were reused by something else: not ours
    deadline = time.monotonic() + grace
    while group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)
    signal_group(pgid, signal.SIGKILL)
    while group_alive(pgid):
        time.sleep(0.05)
    return pid
