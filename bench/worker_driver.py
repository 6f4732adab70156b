"""A training worker driven as the daemon drives it, for the benchmarks: spec on stdin, events on a pipe.

    with Worker(spec) as w:          # started, ready, spec sent
        for event in w.events():     # parsed protocol events, until it exits
            w.send("pause")          # a control line on its stdin
    w.returncode, w.peak_rss         # its exit, and its resident memory's high-water mark (bytes)
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from common import ROOT

from engine.core import protocol


def job_spec(tmp: Path, base: Path, data: Path, name: str, **fields) -> protocol.JobSpec:
    run_dir = tmp / "runs" / name
    run_dir.mkdir(parents=True)
    return protocol.JobSpec(job_id=name, data_file=str(data), format="text", run_dir=str(run_dir),
                            model_in=str(base), model_out=str(tmp / "models" / name), log_path=str(run_dir / "worker.log"),
                            **fields)


def vm_hwm(pid: int) -> int | None:
    """A process's peak resident memory so far (VmHWM, bytes); None once it is gone. Unlike ru_maxrss it is the
    process's own: exec starts it afresh, so the forking benchmark's memory is not carried over."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class PeakRss(threading.Thread):
    """VmHWM of a process read every `interval` seconds until it exits: the last read is its peak, short of
    what it may have added in its last `interval`."""

    def __init__(self, pid: int, interval: float = 0.1):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak: int | None = None
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            value = vm_hwm(self.pid)
            if value is None:
                return
            self.peak = max(self.peak or 0, value)
            self.done.wait(self.interval)


class Worker:
    def __init__(self, spec: protocol.JobSpec, threads: int | None = None):
        self.spec = spec
        r, w = os.pipe()
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        self.proc = subprocess.Popen([sys.executable, "-m", "engine.worker", "--events-fd", str(w)], pass_fds=[w],
                                     stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     env=env, cwd=ROOT)
        os.close(w)
        self.fd = r
        self.buffer = b""
        self.returncode: int | None = None
        self._rss = PeakRss(self.proc.pid)
        self._rss.start()

    @property
    def peak_rss(self) -> int | None:
        return self._rss.peak

    def __enter__(self) -> "Worker":
        ready = next(self.events())
        assert ready["event"] == "ready", ready
        self.proc.stdin.write((self.spec.to_json() + "\n").encode())
        self.proc.stdin.flush()
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.returncode = self.proc.wait()
        self._rss.done.set()
        self._rss.join()
        os.close(self.fd)

    def events(self, timeout: float = 300.0) -> Iterator[dict]:
        """Events as they arrive (unbuffered: select must see what is still unread), until the worker exits."""
        while True:
            while b"\n" in self.buffer:
                line, self.buffer = self.buffer.split(b"\n", 1)
                yield protocol.parse_event(line)
            if not select.select([self.fd], [], [], timeout)[0]:
                raise TimeoutError("no event from the worker")
            chunk = os.read(self.fd, 65536)
            if not chunk:
                return
            self.buffer += chunk

    def send(self, cmd: str, **fields) -> float:
        self.proc.stdin.write((json.dumps({"cmd": cmd, **fields}) + "\n").encode())
        self.proc.stdin.flush()
        return time.time()
