"""The worker's side of the events pipe: one protocol event a line, written whole.

Only the process that reports (rank 0 under torchrun, the only process
otherwise) writes; the others hold a silent sink. A daemon that went away must
not kill a training step: a broken pipe silences the sink instead of raising
(the parent-death signal then stops the job cleanly).

This module never reads the pipe and never writes anything else.
"""

from __future__ import annotations

import os
from typing import Any

from engine.core import protocol


def world_rank() -> int:
    """This process's global rank under torchrun (RANK), 0 when not distributed."""
    return int(os.environ.get("RANK", "0"))


class EventSink:
    def __init__(self, fd: int | None):
        self.fd = fd

    @classmethod
    def for_this_process(cls, fd: int | None) -> "EventSink":
        return cls(fd if world_rank() == 0 else None)

    def emit(self, event_kind: str, /, **fields: Any) -> dict[str, Any]:
        event = protocol.make_event(event_kind, **fields)  # fields may include "kind" (anomaly, error)
        if self.fd is None:
            return event
        data = protocol.encode_event(event)
        try:
            while data:  # events are far below PIPE_BUF, so this is one atomic write in practice
                data = data[os.write(self.fd, data):]
        except OSError:
            self.fd = None  # the reader is gone; keep training, the parent-death signal will stop us
        return event
