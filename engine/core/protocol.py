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
EXIT_ROLLBACK = 76  # a non-finite loss or gradient (or a loss spike) was caught: roll back (see `anomaly`)
EXIT_CUDA_OOM = 77  # CUDA ran out of memory: retry with a smaller micro-batch where the config allows
EXIT_GPU_UNAVAILABLE = 78  # the GPU did not answer, or could not allocate and synchronize
EXIT_MODEL_UNAVAILABLE = 79  # the model could not be loaded (missing, incomplete, corrupt, not downloadable): not the job's fault

# Control requests, daemon to worker: one JSON object a line on the worker's stdin, after the spec.
# Acted on by rank 0 at the next step boundary and broadcast, so every rank acts on the same step.
WORKER_COMMANDS = ("pause", "resume", "checkpoint", "stop", "set_disk_reserve")  # set_disk_reserve: {"bytes": N}

# Event kinds and the fields each must carry (more may follow).
EVENT_FIELDS: dict[str, tuple[str, ...]] = {
    "ready": ("pid",),  # torch and transformers imported; waiting for a job
    # job_start also carries memory_estimate (engine/ops/memory.py's parts and total in bytes, or None) and job_end
    # peak_memory (torch.cuda.max_memory_allocated, None on a CPU), so the estimate can be checked.
    "tokenizing": ("share",),  # building the token cache: the share of the file read, 0 to 1, about every second
    # job_start's examples: the examples trained on (replayed ones too); with packing also rows, the rows they fill
    "job_start": ("job_id", "total_steps", "resumed_from_step", "examples"),
    "step": ("step", "total_steps", "epoch", "loss", "learning_rate", "grad_norm", "tokens_per_s"),
    "checkpoint": ("step", "path"),
    "job_end": ("outcome", "step"),  # outcome: "done" or "interrupted"
    "error": ("message",),  # may carry "kind": "cuda_oom", "gpu_unavailable", "model_unavailable", "data"
    "eval": ("source", "phase", "step", "loss", "tokens", "lines"),  # phase: "before", "during" or "after"
    "paused": ("step",),  # holding at a step boundary, model in memory
    "resumed": ("step",),
    "anomaly": ("step", "kind", "loss", "grad_norm"),  # kind: "nan", "inf" or "spike"; nothing applied or saved
    "blocked": ("reason", "path", "need_bytes", "free_bytes"),  # a write that would not fit was not started
    "unblocked": ("path",),
    "answering": ("prompts",),  # the version answering the prompts file, after its evaluation, before it is saved
}

CHECKPOINT_MARKER = "traind-complete.json"  # written last into checkpoint-N/: only then does it count
MODEL_MARKER = "traind-model.json"  # written last into a finished model version
# What the worker's evaluation writes into runs/JOB/: the job's held-out lines, and the starting model's figures.
EVAL_HOLDOUT = "holdout.jsonl"
EVAL_BEFORE = "eval-before.json"


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
    guard: dict[str, Any] = field(default_factory=dict)  # config.GuardConfig as a dict
    disk_reserve: int = 0  # bytes that must stay free after any checkpoint or model write
    # None: train every parameter of model_in. Else the [adapter] config (method, r, alpha, dropout,
    # target_modules, modules_to_save) plus "base" (bases.pin: the frozen base's path and content hash) and
    # "adapter_in" (the adapter to go on training, model_in; None for the chain's first job).
    adapter: dict[str, Any] | None = None
    # None: no evaluation. Else {"holdout": {fraction, min, max, seed}, "sources": [{name, path, format, lines}],
    # "baseline": {name: {loss, lines, ...}} (the current model's figures), "batch_size", "every_steps"}.
    eval: dict[str, Any] | None = None
    # None: no replay, no sample. Else engine/quality/replay.py's plan: {"fraction", "seed", "sources": [{name, path,
    # examples}] (the pool's samples and how many of each may be drawn), "sample_tokens" (the job's own sample)}.
    replay: dict[str, Any] | None = None
    chain_steps: int = 0  # optimizer steps model_in's chain has taken (its marker's): where the warm-up stands
    rollback: dict[str, Any] | None = None  # {"bad_step": K, "kind": ...}: resume past step K (see checkpoints.derive)
    # None: every rank holds the whole model. Else [distributed]'s sharding keys: {"method": "fsdp",
    # "reshard_after_forward", "cpu_offload", "wrap_modules"} (engine/worker/sharding.py).
    sharding: dict[str, Any] | None = None
    # None: no answers. Else engine/data/prompts.py's plan: {"prompts": [{id, line, kind, messages|text, tools?}],
    # "max_new_tokens", "temperature", "path"}: the version answers each, saved as samples.jsonl beside its weights.
    samples: dict[str, Any] | None = None
    skip_lines: list[int] = field(default_factory=list)  # the bad lines validation skipped: never trained on
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


def make_event(event: str, /, **fields: Any) -> dict[str, Any]:
    missing = [f for f in EVENT_FIELDS[event] if f not in fields]
    if missing:
        raise ValueError(f"event {event} lacks {missing}")
    return {"event": event, "time": time.time(), **{k: _finite_or_none(v) for k, v in fields.items()}}


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
