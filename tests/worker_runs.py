"""The training worker driven as the daemon drives it (events pipe, spec on stdin), for the worker tests:
test_worker.py, test_guard.py, test_worker_control.py. Every worker runs with one torch thread, so two
runs of the same spec compute bit-identical losses."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from engine.core import protocol, testing
from engine.ops import forkserver
from engine.ops.worker_process import worker_env

ROOT = Path(__file__).resolve().parent.parent
TRAINING = dict(max_seq_length=64, batch_size=8, learning_rate=2e-3, warmup_steps=5, seed=3, log_every_steps=1)
CHECKPOINT = dict(every_steps=10, keep=2)


def make_spec(tmp: Path, model: Path, fmt: str, data: Path, name: str, checkpoint: dict = CHECKPOINT,
              **hooks) -> protocol.JobSpec:
    run_dir = tmp / "runs" / name
    run_dir.mkdir(parents=True)
    return protocol.JobSpec(job_id=name, data_file=str(data), format=fmt, run_dir=str(run_dir), model_in=str(model),
                            model_out=str(tmp / "models" / f"{name}.partial"), log_path=str(run_dir / "worker.log"),
                            training=TRAINING, checkpoint=checkpoint, test_hooks=hooks)


def eval_suite(source: Path, lines: int) -> dict:
    """A spec's `eval` (engine/quality/suite.py's shape) with one earlier source and no held-out lines: the job trains on
    every line of its file, as it would with no eval suite, and measures the starting model first."""
    return {"sources": [{"name": "earlier", "path": str(source), "format": "text", "lines": lines}], "baseline": {},
            "batch_size": 0, "every_steps": 0}


def run_worker(spec: protocol.JobSpec, on_event=None, timeout: float = 90.0,
               processes: int = 1) -> tuple[int, list[dict]]:
    """Start a worker, hand it the spec once it is ready, collect events until it exits. With `processes` > 1,
    the ranks under engine.worker.launch (gloo on a CPU), in a process group of their own, rank 0 on a socket."""
    if processes > 1:
        return run_ranks(spec, processes, on_event, timeout)
    r, w = os.pipe()
    proc = start_worker(w)
    os.close(w)
    deadline = time.monotonic() + timeout
    try:
        with os.fdopen(r, "rb") as pipe:
            events = converse(proc, pipe, proc.stdin, spec, on_event, deadline)
        return proc.wait(timeout=30), events
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def start_worker(events_fd: int):
    """`python -m engine.worker`, its stdin a pipe."""
    return start(["-m", "engine.worker", "--events-fd", str(events_fd)], (events_fd,))


def start(argv: list[str], pass_fds: tuple[int, ...] = (), log: Path | None = None, stdin: bool = True):
    """`python ARGV` in a session of its own, forked by the test process's fork server when there is one
    (tests/conftest.py), else a new python: a ForkedWorker or a subprocess.Popen, with stdout and stderr to `log`
    (or nowhere) and its stdin a pipe (or /dev/null)."""
    env = dict(worker_env(), OMP_NUM_THREADS="1")
    out = os.open(log or os.devnull, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        if testing.get("fork_server"):
            stdin_r, stdin_w = os.pipe() if stdin else (os.open(os.devnull, os.O_RDONLY), None)
            try:
                proc = forkserver.fork(Path(testing.get("fork_server")), argv, env, ROOT, stdin_r, out,
                                       pass_fds)
                proc.stdin = os.fdopen(stdin_w, "wb") if stdin_w is not None else None
                return proc
            except forkserver.ForkRefused as e:
                if not e.expected:
                    raise
                if stdin_w is not None:
                    os.close(stdin_w)
            finally:
                os.close(stdin_r)
        return subprocess.Popen([sys.executable, *argv], pass_fds=pass_fds,
                                stdin=subprocess.PIPE if stdin else subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
    finally:
        os.close(out)


def converse(proc, events_in, spec_out, spec: protocol.JobSpec, on_event, deadline: float) -> list[dict]:
    """The events a worker sends until it closes its end; the spec handed over once it is ready."""
    events = []
    for line in events_in:
        event = protocol.parse_event(line)
        events.append(event)
        if event["event"] == "ready":
            spec_out.write((spec.to_json() + "\n").encode())
            spec_out.flush()
        if on_event:
            on_event(proc, event)
        assert time.monotonic() < deadline, "worker took too long"
    return events


def run_ranks(spec: protocol.JobSpec, processes: int, on_event, timeout: float) -> tuple[int, list[dict]]:
    folder = tempfile.mkdtemp(prefix="traind-ranks-")  # short: a unix socket's path has 107 bytes at most
    path = os.path.join(folder, "worker.sock")
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(path)
        server.listen(1)
        server.settimeout(timeout)
        proc = start(["-m", "engine.worker.launch", "--processes", str(processes), "--channel", path],
                     log=Path(spec.log_path), stdin=False)
        try:
            conn, _ = server.accept()
            with conn, conn.makefile("rwb") as channel:
                events = converse(proc, channel, channel, spec, on_event, deadline)
            return proc.wait(timeout=60), events
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
                proc.wait()
            shutil.rmtree(folder, ignore_errors=True)


def parent_of(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2:].split()[1])


def cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def of(events: list[dict], kind: str) -> list[dict]:
    return [e for e in events if e["event"] == kind]


def losses(events: list[dict]) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in of(events, "step")}


def without_shared_fork_server(monkeypatch) -> None:
    """This test's daemons and workers start their own fork server (or none), as the product does."""
    monkeypatch.delenv(testing.ENV, raising=False)
    environ = testing.with_switches(os.environ, fork_server=None)
    if testing.ENV in environ:
        monkeypatch.setenv(testing.ENV, environ[testing.ENV])
