"""Shared types between the daemon and the worker: the job spec, events, exit codes.

The daemon hands a worker one `JobSpec` as the first line on its stdin. The
worker answers with JSON-lines events on the pipe named by `--events-fd`, one
object a line, each with `event` (a kind below) and `time`. Later lines on
stdin are control requests. This module imports nothing heavy: the daemon,
worker and TUI all use it.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

PROTOCOL_VERSION = 1

# Worker exit codes. Any other non-zero code, or a signal, is a failed attempt.
EXIT_DONE = 0
EXIT_FAILED = 1
EXIT_INTERRUPTED = 75  # stopped on request with a checkpoint saved (or before the first step): resume later

# Event kinds and the fields each must carry (more may follow).
EVENT_FIELDS: dict[str, tuple[str, ...]] = {
    "ready": ("pid",),  # torch and transformers imported; waiting for a job
    "job_start": ("job_id", "total_steps", "resumed_from_step", "examples"),
    "step": ("step", "total_steps", "epoch", "loss", "learning_rate", "grad_norm", "tokens_per_s"),
    "checkpoint": ("step", "path"),
    "job_end": ("outcome", "step"),  # outcome: "done" or "interrupted"
    "error": ("message",),
}

CHECKPOINT_MARKER = "traind-complete.json"  # written last into checkpoint-N/: only then does it count
MODEL_MARKER = "traind-model.json"  # written last into a finished model version


@dataclass(frozen=True)
class JobSpec:
    job_id: str
    data_file: str  # absolute path, in queue/active/
    format: str  # "text", "prompt_completion" or "messages"
    run_dir: str  # runs/JOB_ID: checkpoints/, data cache, worker.log
    model_in: str  # the current model: a directory or a hub id
    model_out: str  # where the finished model is saved; the daemon publishes it
    log_path: str
    training: dict[str, Any] = field(default_factory=dict)  # config.TrainingConfig as a dict
    checkpoint: dict[str, Any] = field(default_factory=dict)  # config.CheckpointConfig as a dict
    test_hooks: dict[str, Any] = field(default_factory=dict)  # fault injection; empty outside tests
    protocol: int = PROTOCOL_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "JobSpec":
        data = json.loads(text)
        if data.get("protocol") != PROTOCOL_VERSION:
            raise ValueError(f"job spec protocol {data.get('protocol')!r}, this worker speaks {PROTOCOL_VERSION}")
        return cls(**data)


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def make_event(kind: str, **fields: Any) -> dict[str, Any]:
    missing = [f for f in EVENT_FIELDS[kind] if f not in fields]
    if missing:
        raise ValueError(f"event {kind} lacks {missing}")
    return {"event": kind, "time": time.time(), **{k: _finite_or_none(v) for k, v in fields.items()}}


def encode_event(event: dict[str, Any]) -> bytes:
    return (json.dumps(event, allow_nan=False) + "\n").encode()


def parse_event(line: bytes | str) -> dict[str, Any]:
    """One event from a line; ValueError for anything that is not a known, complete event."""
    event = json.loads(line)
    if not isinstance(event, dict) or event.get("event") not in EVENT_FIELDS:
        raise ValueError(f"not an event: {str(line)[:200]}")
    missing = [f for f in EVENT_FIELDS[event["event"]] if f not in event]
    if missing:
        raise ValueError(f"event {event['event']} lacks {missing}")
    return event
