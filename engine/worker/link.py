"""How a worker process hears from the daemon, and speaks to it.

One process (`python -m engine.worker --events-fd N`): events on the inherited
fd, the job spec and then control lines on stdin. Under engine/worker/launch.py
(PyTorch's elastic agent starts the ranks, and passes them no file
descriptors): rank 0 connects to the daemon's unix socket (`--channel`) and
uses it both ways; it puts the spec in the agent's rendezvous store, where
every other rank, on this machine or another, reads it. EOF from the daemon
(stdin or socket) means it is gone: a stop.

Never imports torch at module level; the store is torch's, reached only under
the launcher.
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass
from typing import IO

from engine.worker.control import StopControl
from engine.worker.events import EventSink, world_rank

SPEC_KEY = "traind/spec"
STORE_POLL_SECONDS = 1.0  # a signal (a stop while waiting for a job) is seen within this


@dataclass
class Link:
    events: EventSink
    control: IO[str] | None  # rank 0 (or the only process) alone reads control lines

    def read_spec(self, stop: StopControl) -> str:
        """The job spec's JSON line; "" when the daemon went away first."""
        if self.control is not None:
            line = self.control.readline()
            if line.strip() and under_launcher():
                store().set(SPEC_KEY, line)
            return line
        return wait_for_spec(stop)


def under_launcher() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ


def open_link(events_fd: int | None, channel: str | None) -> Link:
    if channel is None:
        return Link(EventSink.for_this_process(events_fd), sys.stdin if world_rank() == 0 else None)
    if world_rank() != 0:
        return Link(EventSink(None), None)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(channel)
    return Link(EventSink(sock.fileno()), sock.makefile("r", encoding="utf-8"))


def store():
    """A client of the elastic agent's store (MASTER_ADDR:MASTER_PORT), shared by every rank of the job."""
    from datetime import timedelta

    import torch.distributed as dist

    return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                         timeout=timedelta(seconds=300))


def wait_for_spec(stop: StopControl) -> str:
    """Block until rank 0 has the spec (a warm worker may wait for hours), seeing signals between polls."""
    from datetime import timedelta

    client = store()
    while True:
        stop.raise_if_requested()
        try:
            client.wait([SPEC_KEY], timedelta(seconds=STORE_POLL_SECONDS))
        except Exception as e:  # a timeout (go round); the store gone (rank 0's agent ended) ends the wait
            if "timeout" not in str(e).lower() and "timed out" not in str(e).lower():
                return ""
            continue
        return client.get(SPEC_KEY).decode()
