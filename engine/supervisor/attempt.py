"""One attempt at a job, seen from the daemon: the worker's events, its control, how it ended.

The attempt appends every event to runs/JOB/metrics.jsonl, folds them into the
live `Progress` for status.json, forwards control requests (pause, checkpoint,
stop) to the worker's stdin, and lets a command wait for the event that answers
it (`paused`, `checkpoint`, or `blocked`: a worker held for disk space answers
nothing else until there is room). It keeps both what the worker reported
(`paused`) and what was last asked of it (`pause_wanted`): commands decide from
the latter, so two pause toggles sent before the worker held are a pause and a
resume. It owns its end flags: a stop, a skip or a changed file is asked through
its verbs (`stop`, `terminate`, `skip`, `changed`), which also reach the worker.
It never decides what happens to the job next: the daemon does, from how it
ended (engine/supervisor/outcomes.py).
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from engine.core import protocol
from engine.store import jobs
from engine.ops.worker_process import WorkerProcess, describe_exit
from engine.store.eventlog import Reporter
from engine.store.storage import Storage

METRICS_SYNC_SECONDS = 1.0  # metrics.jsonl is durable within this, without an fsync a step


class Progress:
    """The live numbers of the job in hand, folded from worker events."""

    def __init__(self, job: jobs.Job, attempt: int, max_attempts: int, phase: str = "starting"):
        self.doc: dict[str, Any] = {"id": job.id, "original_name": job.record["original_name"],
                                    "format": job.record.get("format"), "examples": job.record.get("examples"),
                                    "phase": phase, "attempt": attempt, "failures": job.failures(),
                                    "max_attempts": max_attempts, "oom_kills": job.failures(jobs.OOM_KILLED),
                                    "step": 0, "total_steps": None, "percent": None, "epoch": None, "loss": None,
                                    "learning_rate": None, "grad_norm": None, "tokens_per_s": None,
                                    "eta_s": None, "elapsed_s": 0.0, "resumed_from_step": None,
                                    "last_checkpoint_step": None, "last_checkpoint_at": None, "rollbacks": len(job.record.get("rollbacks", [])),
                                    "memory_estimate": None, "peak_memory": None, "method": None,
                                    "trainable_params": None, "replay": None, "tokenizing": None, "rows": None,
                                    "sharding": None, "peak_memory_per_rank": None}
        self.started = time.monotonic()
        # The ETA runs on a training clock that stands still while the worker holds (paused, blocked):
        # the rate measured before a pause stays valid after it, and the pause is not counted.
        self.trained_s = 0.0
        self.training_since: float | None = None  # monotonic time the current run of training began
        # Elapsed is the attempt's working time, starting and tokenizing included: a hold is not counted.
        self.held_s = 0.0
        self.held_since: float | None = None
        self.rate_window: deque[tuple[float, int]] = deque(maxlen=50)  # (training clock, step)

    def _training_clock(self) -> float:
        now = time.monotonic()
        return self.trained_s + (now - self.training_since if self.training_since is not None else 0.0)

    def _hold(self) -> None:
        if self.training_since is not None:
            self.trained_s = self._training_clock()
            self.training_since = None
        if self.held_since is None:
            self.held_since = time.monotonic()

    def _go_on(self) -> None:
        if self.training_since is None:
            self.training_since = time.monotonic()
        if self.held_since is not None:
            self.held_s += time.monotonic() - self.held_since
            self.held_since = None

    def _elapsed(self) -> float:
        now = time.monotonic()
        return now - self.started - self.held_s - (now - self.held_since if self.held_since is not None else 0.0)

    def apply(self, event: dict[str, Any]) -> None:
        kind = event["event"]
        if kind == "tokenizing":
            self.doc.update(phase="tokenizing", tokenizing=round(100.0 * event["share"], 1))
        elif kind == "answering":
            self.doc.update(phase="answering")
        elif kind == "job_start":
            self.doc.update(phase="training", tokenizing=None, rows=event.get("rows"), total_steps=event["total_steps"],
                            resumed_from_step=event["resumed_from_step"], step=event["resumed_from_step"] or 0,
                            examples=event["examples"],
                            memory_estimate=(event.get("memory_estimate") or {}).get("total"),
                            method=event.get("method"), trainable_params=event.get("trainable_params"),
                            replay=event.get("replay"), sharding=event.get("sharding"))
            self.rate_window.clear()
            self.trained_s, self.training_since = 0.0, time.monotonic()
        elif kind == "step":
            for key in ("step", "total_steps", "epoch", "loss", "learning_rate", "grad_norm", "tokens_per_s"):
                self.doc[key] = event[key]
            self._go_on()
            self.rate_window.append((self._training_clock(), event["step"]))
        elif kind == "checkpoint":
            self.doc.update(last_checkpoint_step=event["step"], last_checkpoint_at=event.get("time", time.time()))
        elif kind == "paused":
            self.doc["phase"] = "paused"
            self._hold()
        elif kind in ("resumed", "unblocked"):
            self.doc["phase"] = "training"
            self._go_on()
        elif kind == "blocked":
            self.doc["phase"] = "blocked"
            self._hold()
        elif kind == "job_end":
            self.doc["phase"] = "saving" if event["outcome"] == "done" else "stopping"
            self.doc["peak_memory"] = event.get("peak_memory")
            self.doc["peak_memory_per_rank"] = event.get("peak_memory_per_rank")

    def snapshot(self) -> dict[str, Any]:
        d = self.doc
        d["elapsed_s"] = round(self._elapsed(), 1)
        if d["total_steps"]:
            d["percent"] = round(100.0 * d["step"] / d["total_steps"], 1)
            if len(self.rate_window) >= 2:
                (t0, s0), (t1, s1) = self.rate_window[0], self.rate_window[-1]
                if s1 > s0 and t1 > t0:
                    d["eta_s"] = round((d["total_steps"] - d["step"]) * (t1 - t0) / (s1 - s0), 1)
        return dict(d)


class Attempt:
    def __init__(self, job: jobs.Job, worker: WorkerProcess, spec: protocol.JobSpec, progress: Progress,
                 on_change: Callable[[dict[str, Any]], None], storage: Storage, report: Reporter):
        self.job = job
        self.storage = storage
        self.report = report
        self.worker = worker
        self.spec = spec
        self.progress = progress
        self.on_change = on_change  # called with each event that changes what status.json shows
        self.paused = False  # as the worker reported: it holds at a step boundary
        self.pause_wanted = False  # what the last pause or resume asked of it: a toggle flips this
        self.blocked: str | None = None
        self.anomaly: dict[str, Any] | None = None
        self.error: dict[str, Any] | None = None
        # How it is being ended, set only by its verbs below.
        self.stop_requested = False  # by the user, or for a model change: keep the job, hold it back
        self.skip_requested = False  # by the user: drop the job
        self.file_changed: str | None = None  # the file changed since it was claimed
        self.exit_code: int | None = None
        self.finished = asyncio.Event()
        self.waiters: dict[str, list[asyncio.Future]] = {}

    @property
    def step(self) -> int:
        return self.progress.doc["step"] or 0

    async def run(self) -> int:
        """Relay the worker's events until it exits; returns its exit code."""
        metrics_path = Path(self.spec.run_dir) / "metrics.jsonl"
        last_sync = time.monotonic()
        while (event := await self.worker.next_event()) is not None:
            if event["event"] == "ready":
                continue
            sync = time.monotonic() - last_sync > METRICS_SYNC_SECONDS
            if sync:
                last_sync = time.monotonic()
            self.storage.append(metrics_path, protocol.encode_event(event), sync)
            with self.storage.refusals():  # recording what the event changed (job.json): blocked, not gone
                self.apply(event)
        self.storage.append(metrics_path, b"", sync=True)
        self.exit_code = await self.worker.wait()
        self.finished.set()
        for kind in list(self.waiters):
            self._answer(kind, None)
        return self.exit_code

    def _answer(self, kind: str, event: dict[str, Any] | None) -> None:
        for future in self.waiters.pop(kind, []):
            if not future.done():
                future.set_result(event)

    def apply(self, event: dict[str, Any]) -> None:
        kind = event["event"]
        self.progress.apply(event)
        if kind == "paused":
            self.paused = True
        elif kind == "resumed":
            self.paused = False
        elif kind == "blocked":
            self.blocked = event["reason"]
        elif kind == "unblocked":
            self.blocked = None
        elif kind == "anomaly":
            self.anomaly = event
        elif kind == "error":
            self.error = event
        self._answer(kind, event)
        if kind != "step":
            self.on_change(event)

    def want_pause(self, wanted: bool) -> None:
        """Record what the daemon asks of the worker. A resume before the worker held answers a pause's
        waiter at once: the worker's pause is a wanted state read at the step boundary, so it never holds."""
        self.pause_wanted = wanted
        if not wanted:
            self._answer("paused", None)

    async def send(self, cmd: str, **fields: Any) -> bool:
        """A control request to the worker; False if it has gone."""
        return await self.worker.send_line(json.dumps({"cmd": cmd, **fields}))

    async def wait_for(self, kinds: tuple[str, ...], timeout: float) -> dict[str, Any] | None:
        """The next event of one of these kinds, or None if the worker exits or the time runs out first."""
        if self.exit_code is not None:
            return None
        future = asyncio.get_running_loop().create_future()
        for kind in kinds:
            self.waiters.setdefault(kind, []).append(future)
        try:
            return await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError:
            return None

    # -- ending it --------------------------------------------------------------------

    async def stop(self, grace: float | None = None) -> None:
        """The worker saves a checkpoint and exits; the job keeps its place. Killed if still alive after
        `grace` seconds."""
        self.stop_requested = True
        await self.send("stop")
        if grace is not None:
            self._kill_after(grace)

    def terminate(self, grace: float) -> None:
        """The daemon is shutting down: SIGTERM (the worker checkpoints), killed if still alive after `grace`."""
        self.worker.signal(signal.SIGTERM)
        self._kill_after(grace)

    def skip(self) -> None:
        """Dropped by the user: the worker is killed, nothing it did since its last checkpoint is kept."""
        self.skip_requested = True
        self.kill()

    def changed(self, why: str) -> None:
        """Its file is no longer what was claimed: the worker is killed, nothing trained on it is published."""
        self.file_changed = why
        self.kill()

    def node_failed(self, why: str) -> None:
        """Another machine's failure ended it (engine/cluster/nodes.py): its cause, in place of the ranks'."""
        self.error = {"message": why}

    def kill(self) -> None:
        self.worker.signal(signal.SIGKILL)

    def _kill_after(self, grace: float) -> None:
        asyncio.get_running_loop().call_later(grace, self._kill_late, grace)

    def _kill_late(self, grace: float) -> None:
        if self.worker.alive:
            self.report.alert("worker_killed", f"worker did not stop within {grace:g}s: killing its process group",
                              "warning")
            self.worker.signal(signal.SIGKILL)

    def exit_text(self, oom_killed: bool | None) -> str:
        text = describe_exit(self.exit_code)
        if self.exit_code == -signal.SIGKILL and oom_killed:
            return "killed by the OOM killer (SIGKILL)"
        return text

