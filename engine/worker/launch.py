"""Several training processes on this machine: `python -m engine.worker.launch --processes N --events-fd FD`.

What `torchrun --standalone --nproc-per-node N` does for the worker, keeping
what the daemon relies on, which torchrun loses: only rank 0 gets the events
pipe; the job spec (the first stdin line) goes to every rank and the control
lines after it to rank 0 alone, which broadcasts its decisions at step
boundaries; and the exit code is the first failing rank's own (75-79 carry the
outcome; a rank killed by a signal is reported killed by that signal).

The ranks are this process's children, in its process group, so the daemon's
one `killpg` reaches them all; a SIGTERM that reaches this process alone (its
parent died) is passed on. When one rank fails the others get
`FAILED_RANK_GRACE` seconds to leave before they are killed: a rank waiting in
a collective for a dead peer would otherwise wait for the backend's timeout.
Never imports torch.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from engine import protocol
from engine.worker.control import die_with_parent
from engine.worker_process import WORKER_MODULE_ENV

FAILED_RANK_GRACE = 10.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_ranks(processes: int, events_fd: int) -> list[subprocess.Popen]:
    module = os.environ.get(WORKER_MODULE_ENV) or "engine.worker"
    env = dict(os.environ, WORLD_SIZE=str(processes), LOCAL_WORLD_SIZE=str(processes), MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()))
    ranks = []
    for rank in range(processes):
        events = ["--events-fd", str(events_fd)] if rank == 0 else []
        ranks.append(subprocess.Popen([sys.executable, "-m", module, *events], stdin=subprocess.PIPE,
                                      pass_fds=(events_fd,) if rank == 0 else (),
                                      env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank))))
    os.close(events_fd)  # rank 0 holds it: the daemon sees the end of the events when rank 0 exits
    return ranks


def relay_stdin(ranks: list[subprocess.Popen]) -> None:
    """The spec line to every rank, then control lines to rank 0; EOF (the daemon gone) closes rank 0's stdin."""
    first = True
    for line in sys.stdin.buffer:
        for rank in ranks if first else ranks[:1]:
            try:
                rank.stdin.write(line)
                rank.stdin.flush()
            except (BrokenPipeError, ValueError):
                pass
        if first:
            for rank in ranks[1:]:
                rank.stdin.close()
            first = False
    for rank in ranks:
        try:
            rank.stdin.close()
        except BrokenPipeError:
            pass


def wait_ranks(ranks: list[subprocess.Popen]) -> int:
    """0 when every rank succeeded, else the first failure's code (negative: killed by that signal)."""
    failed: int | None = None
    deadline = None
    while any(rank.poll() is None for rank in ranks):
        for rank in ranks:
            code = rank.returncode
            if code not in (None, 0) and failed is None:
                failed, deadline = code, time.monotonic() + FAILED_RANK_GRACE
        if deadline is not None and time.monotonic() > deadline:
            for rank in ranks:
                if rank.poll() is None:
                    rank.kill()
        time.sleep(0.1)
    for rank in ranks:
        if rank.returncode != 0 and failed is None:
            failed = rank.returncode
    return failed or 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.worker.launch", description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, required=True)
    parser.add_argument("--events-fd", type=int, required=True)
    args = parser.parse_args(argv)
    if not die_with_parent():
        return protocol.EXIT_INTERRUPTED
    ranks = start_ranks(args.processes, args.events_fd)

    def forward(signum, _frame) -> None:
        for rank in ranks:
            if rank.poll() is None:
                rank.send_signal(signum)  # a stop is idempotent: a rank that had it from the group already is fine

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    threading.Thread(target=relay_stdin, args=(ranks,), daemon=True).start()
    code = wait_ranks(ranks)
    if code < 0:  # die of the same signal, so the daemon reads "killed by SIGKILL" (an OOM kill, say)
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    return code


if __name__ == "__main__":
    exit_code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Not sys.exit: the relay thread may be blocked reading stdin, and interpreter shutdown
    # aborts (SIGABRT) on that buffered reader's lock, which would hide the ranks' exit code.
    os._exit(exit_code)
