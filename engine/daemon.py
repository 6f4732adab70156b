"""The supervisor: one per workspace, the single writer of its files.

It watches inbox/ (watchfiles, inotify), takes complete files in arrival order,
validates each, and trains on it in a worker subprocess, one job at a time,
retrying a failed attempt up to max_attempts. It records every event, keeps
state/status.json current, and on SIGTERM/SIGINT lets the worker checkpoint
before it exits. It must never crash on input, never delete a file it was
handed, and never import torch or transformers: it has to outlive any worker.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
import traceback
from collections import deque
from pathlib import Path
from typing import Any

import watchfiles

from engine import __version__, atomic, checkpoints, intake, jobs, models, protocol, validate
from engine.config import Config
from engine.eventlog import EventLog
from engine.lock import DaemonLock
from engine.status import SCHEMA, queue_counts
from engine.worker_process import WorkerProcess, describe_exit, kill_orphan, signal_group
from engine.workspace import Workspace

STATUS_INTERVAL = 1.0  # status.json at least this often while a job runs
PROGRESS_INTERVAL = 5.0  # a progress line on the console this often while training
LOG_TAIL_LINES = 30  # worker.log lines kept in a failed file's reason
TEST_HOOKS_ENV = "TRAIND_TEST_HOOKS"  # JSON fault-injection hooks for the worker; unset outside tests


def log_tail(path: Path, lines: int = LOG_TAIL_LINES, window: int = 64 * 1024) -> list[str]:
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            f.seek(max(0, size - window))
            data = f.read()
    except FileNotFoundError:
        return []
    return data.decode("utf-8", "replace").splitlines()[-lines:]


class Progress:
    """The live numbers of the job in hand, folded from worker events."""

    def __init__(self, job: jobs.Job, attempt: int, max_attempts: int):
        self.doc: dict[str, Any] = {"id": job.id, "original_name": job.record["original_name"],
                                    "format": job.record.get("format"), "examples": job.record.get("examples"),
                                    "phase": "starting", "attempt": attempt, "max_attempts": max_attempts,
                                    "step": 0, "total_steps": None, "percent": None, "epoch": None, "loss": None,
                                    "learning_rate": None, "grad_norm": None, "tokens_per_s": None,
                                    "eta_s": None, "elapsed_s": 0.0, "resumed_from_step": None,
                                    "last_checkpoint_step": None}
        self.started = time.monotonic()
        self.rate_window: deque[tuple[float, int]] = deque(maxlen=50)

    def apply(self, event: dict[str, Any]) -> None:
        kind = event["event"]
        if kind == "job_start":
            self.doc.update(phase="training", total_steps=event["total_steps"],
                            resumed_from_step=event["resumed_from_step"], step=event["resumed_from_step"],
                            examples=event["examples"])
        elif kind == "step":
            for key in ("step", "total_steps", "epoch", "loss", "learning_rate", "grad_norm", "tokens_per_s"):
                self.doc[key] = event[key]
            self.rate_window.append((time.monotonic(), event["step"]))
        elif kind == "checkpoint":
            self.doc["last_checkpoint_step"] = event["step"]
        elif kind == "job_end":
            self.doc["phase"] = "saving" if event["outcome"] == "done" else "stopping"

    def snapshot(self) -> dict[str, Any]:
        d = self.doc
        d["elapsed_s"] = round(time.monotonic() - self.started, 1)
        if d["total_steps"]:
            d["percent"] = round(100.0 * d["step"] / d["total_steps"], 1)
            if len(self.rate_window) >= 2:
                (t0, s0), (t1, s1) = self.rate_window[0], self.rate_window[-1]
                if s1 > s0 and t1 > t0:
                    d["eta_s"] = round((d["total_steps"] - d["step"]) * (t1 - t0) / (s1 - s0), 1)
        return dict(d)


class Daemon:
    def __init__(self, ws: Workspace, config: Config, once: bool = False):
        self.ws = ws
        self.config = config
        self.once = once
        self.lock = DaemonLock(ws.lock_path, ws.root)
        self.events = EventLog(ws)
        self.state = "starting"
        self.reason: str | None = None
        self.state_since = time.time()
        self.started_at = time.time()
        self.progress: Progress | None = None
        self.last_error: dict[str, Any] | None = None
        self.stopping = False
        self.wake = asyncio.Event()
        self.worker: WorkerProcess | None = None  # the one running a job, or waiting warm
        self.seen: dict = {}  # inbox observations between scans (settling files)
        self.ignored: set[str] = set()
        self.resume: list[jobs.Job] = []
        self.failures_in_a_row = 0
        self.warm_task: asyncio.Task | None = None
        self.warm_retry_at = 0.0
        self.test_hooks = json.loads(os.environ.get(TEST_HOOKS_ENV) or "{}")

    # -- state and status ---------------------------------------------------

    def set_state(self, state: str, reason: str | None = None) -> None:
        if (state, reason) != (self.state, self.reason):
            self.state, self.reason, self.state_since = state, reason, time.time()
            self.write_status()

    def write_status(self) -> None:
        try:
            model = models.current(self.ws)
        except (FileNotFoundError, ValueError):
            model = None
        doc = {"schema": SCHEMA, "updated_at": time.time(), "version": __version__,
               "daemon": {"pid": os.getpid(), "state": self.state, "reason": self.reason,
                          "since": self.state_since, "started_at": self.started_at,
                          "worker_pid": self.worker.pid if self.worker and self.worker.alive else None,
                          "warm_worker": bool(self.worker and self.worker.ready and not self.worker.job_id)},
               "job": self.progress.snapshot() if self.progress else None,
               "queue": queue_counts(self.ws), "model": model, "last_error": self.last_error}
        atomic.write_json_atomic(self.ws.status_path, doc)

    def alert(self, kind: str, message: str, level: str = "error", **fields: Any) -> None:
        self.events.emit(kind, message, level, **fields)
        self.last_error = {"time": time.time(), "kind": kind, "message": message}

    # -- start-up -----------------------------------------------------------

    def recover(self) -> None:
        """Make the workspace whole after whatever ended the last daemon."""
        for folder in (self.ws.state, self.ws.models, self.ws.runs, *(self.ws.queue(s) for s in ("active", "done", "failed", "rejected"))):
            atomic.remove_temp_files(folder)
        for temp in intake.remove_stale_add_temps(self.ws.inbox):
            self.events.emit("recovered", f"removed {temp.name}, left by a 'traind add' that was killed", "warning")
        for partial in models.remove_incomplete_partials(self.ws):
            self.events.emit("recovered", f"removed a half-saved model {partial.name}", "warning")
        orphan = kill_orphan(self.ws, self.config.jobs.stop_grace_seconds)
        if orphan:
            self.events.emit("recovered", f"stopped worker PID {orphan} left by a previous daemon", "warning")
        for job in jobs.active_jobs(self.ws):
            if job.state in jobs.FINAL_STATES:
                jobs.complete_move(job)
                self.events.emit("recovered", f"{job.name}: finished moving to queue/{job.state}/", "warning")
            elif models.is_complete(models.partial_dir(self.ws, job.id)) or (self.ws.models / job.id).exists():
                self.finish_done(job)
            else:
                if job.record["attempts"] and "outcome" not in job.record["attempts"][-1]:
                    job.end_attempt("interrupted", exit="the daemon stopped while it ran")
                step = checkpoints.newest_complete(job.run_dir)
                where = f"from its checkpoint at step {step[0]}" if step else "from the start"
                self.events.emit("recovered", f"{job.name}: left active by a previous daemon; resuming {where}", "warning")
                self.resume.append(job)

    # -- the main loop --------------------------------------------------------

    async def run(self) -> int:
        self.lock.acquire()
        try:
            self.ws.create_folders()
            self.recover()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.request_shutdown, sig)
            self.events.emit("daemon_started", f"daemon started (PID {os.getpid()}) on {self.ws.root}")
            stop_watching = asyncio.Event()
            tasks = [asyncio.create_task(self.watch_inbox(stop_watching)), asyncio.create_task(self.heartbeat())]
            try:
                await self.serve()
            finally:
                stop_watching.set()
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                if self.warm_task is not None:
                    self.warm_task.cancel()
                if self.worker is not None:
                    await self.worker.dismiss()
                    self.worker = None
                self.progress = None
                self.set_state("offline")
                self.events.emit("daemon_stopped", "daemon stopped")
        finally:
            self.lock.release()
        return 0

    async def serve(self) -> None:
        while not self.stopping:
            await self.keep_worker_warm()
            job = self.next_job()
            if job is not None:
                try:
                    await self.run_job(job)
                    self.failures_in_a_row = 0
                except Exception as e:  # a bug or the system (disk, permissions), never the input: keep going
                    self.failures_in_a_row += 1
                    pause = min(60.0, 2.0 ** self.failures_in_a_row)
                    traceback.print_exc()
                    self.alert("internal_error", f"{job.name}: {type(e).__name__}: {e}; trying again in {pause:.0f}s", job_id=job.id)
                    self.progress = None
                    if job.location == "active":
                        self.resume.insert(0, jobs.load(self.ws, job.id))
                    await asyncio.sleep(pause)
                continue
            if self.once and not self.inbox_has_work():
                return
            self.set_state("idle")
            self.wake.clear()
            try:  # a watch event wakes us at once; the timeout re-checks files still settling
                await asyncio.wait_for(self.wake.wait(), timeout=0.5)
            except asyncio.TimeoutError:
                pass

    def request_shutdown(self, sig: int) -> None:
        if self.stopping:
            return
        self.stopping = True
        self.events.emit("shutdown", f"received {signal.Signals(sig).name}: shutting down")
        self.set_state("shutting_down")
        self.wake.set()
        if self.worker is not None and self.worker.job_id:
            self.worker.signal(signal.SIGTERM)
            asyncio.get_running_loop().call_later(self.config.jobs.stop_grace_seconds, self.kill_worker_after_grace, self.worker)

    def kill_worker_after_grace(self, worker: WorkerProcess) -> None:
        if worker.alive:
            self.alert("worker_killed", f"worker did not stop within {self.config.jobs.stop_grace_seconds:g}s: killing its process group", "warning")
            worker.signal(signal.SIGKILL)

    async def watch_inbox(self, stop: asyncio.Event) -> None:
        async for _ in watchfiles.awatch(self.ws.inbox, stop_event=stop, debounce=50, step=20, recursive=False,
                                         watch_filter=None, ignore_permission_denied=True):
            self.wake.set()

    async def heartbeat(self) -> None:
        last_print = 0.0
        while True:
            await asyncio.sleep(STATUS_INTERVAL)
            if self.progress is not None:
                self.write_status()
                now = time.monotonic()
                if now - last_print >= PROGRESS_INTERVAL and self.progress.doc["phase"] == "training":
                    last_print = now
                    self.print_progress()

    def print_progress(self) -> None:
        d = self.progress.snapshot()
        loss = "-" if d["loss"] is None else f"{d['loss']:.4f}"
        rate = "-" if d["tokens_per_s"] is None else f"{d['tokens_per_s']:,.0f}"
        eta = "-" if d["eta_s"] is None else f"{d['eta_s']:.0f}s"
        print(f"{time.strftime('%H:%M:%S')} {d['id']}: step {d['step']}/{d['total_steps']} ({d['percent'] or 0:.0f}%) "
              f"loss {loss} · {rate} tok/s · ETA {eta}", file=sys.stderr, flush=True)

    # -- the queue ---------------------------------------------------------------

    def inbox_has_work(self) -> bool:
        scan = intake.scan_inbox(self.ws.inbox, self.config.inbox.settle_seconds, time.time(), self.seen)
        return bool(scan.ready or scan.rejected or scan.waiting)

    def next_job(self) -> jobs.Job | None:
        if self.resume:
            return self.resume.pop(0)
        scan = intake.scan_inbox(self.ws.inbox, self.config.inbox.settle_seconds, time.time(), self.seen)
        for path in scan.ignored:
            if path.name not in self.ignored:
                self.ignored.add(path.name)
                self.events.emit("ignored", f"inbox/{path.name}: ignored (only *.jsonl files are taken; dot-files, .part and .tmp are in-progress writes)")
        for path, reason in scan.rejected:
            if (job := self.claim(path)) is not None:
                self.reject(job, reason)
        for path in scan.ready:
            if (job := self.claim(path)) is not None:
                return job
        return None

    def claim(self, path: Path) -> jobs.Job | None:
        try:
            return jobs.claim(self.ws, path)
        except FileNotFoundError:  # taken away between the scan and the claim
            return None
        except OSError as e:  # e.g. no permission to move it: say so once, leave it where it is
            if path.name not in self.ignored:
                self.ignored.add(path.name)
                self.alert("claim_failed", f"inbox/{path.name}: cannot be taken ({e.strerror or e}); left in the inbox")
            return None

    def reject(self, job: jobs.Job, reason: str, report: dict[str, Any] | None = None) -> None:
        dst = job.finish("rejected", {"reason": reason, **({"validation": report} if report else {})})
        self.alert("rejected", f"{job.record['original_name']}: rejected, {reason} (moved to queue/rejected/{dst.name})", "warning", job_id=job.id)

    def validate(self, job: jobs.Job) -> dict[str, Any] | None:
        """Runs in a thread. Returns the validation report if the file may be trained on."""
        path = job.path_in("active")
        try:
            with intake.open_claimed(path) as f:
                report = validate.validate_fileobj(f, job.record["original_name"], self.config.validation)
        except intake.UnsafeFile as e:
            self.reject(job, str(e))
            return None
        except OSError as e:
            self.reject(job, f"unreadable: {e.strerror or e}")
            return None
        if not report.ok:
            first = report.errors[0] if report.errors else (0, "invalid")
            where = f"line {first[0]}: " if first[0] else ""
            count = f"{report.error_count} errors, the first: " if report.error_count > 1 else ""
            self.reject(job, f"{count}{where}{first[1]}", report.to_json())
            return None
        return report.to_json()

    async def run_job(self, job: jobs.Job) -> None:
        if job.state in ("queued", "validating"):
            job.save(state="validating")
            self.progress = Progress(job, 0, self.config.jobs.max_attempts)
            self.progress.doc["phase"] = "validating"
            self.set_state("validating")
            report = await asyncio.to_thread(self.validate, job)
            if report is None:
                self.progress = None
                return
            job.save(state="queued", format=report["format"], examples=report["examples"])
            self.events.emit("accepted", f"{job.record['original_name']}: valid, {report['examples']} examples ({report['format']}); job {job.id}", job_id=job.id)
        while not self.stopping:
            if job.failed_attempts >= self.config.jobs.max_attempts:
                self.fail(job)
                break
            outcome = await self.run_attempt(job)
            if outcome == "done":
                self.finish_done(job)
                break
            if outcome == "interrupted":
                self.events.emit("job_interrupted", f"{job.name}: stopped with a checkpoint; it resumes when the daemon starts again", job_id=job.id)
                break
        self.progress = None

    def fail(self, job: jobs.Job) -> None:
        last = job.record["attempts"][-1] if job.record["attempts"] else {}
        reason = {"reason": f"failed {job.failed_attempts} attempt(s); last: {last.get('exit', 'unknown')}",
                  "exit_code": last.get("exit_code"), "signal": last.get("signal"),
                  "error": last.get("error"), "log_tail": last.get("log_tail", [])}
        dst = job.finish("failed", reason)
        self.alert("job_failed", f"{job.record['original_name']}: failed after {job.failed_attempts} attempt(s) ({last.get('exit')}); moved to queue/failed/{dst.name}", job_id=job.id)

    def finish_done(self, job: jobs.Job) -> None:
        loss = self.progress.doc["loss"] if self.progress else None
        models.publish(self.ws, job.id, file=job.record["original_name"], loss=loss)
        job.finish("done")
        self.events.emit("job_done", f"{job.record['original_name']}: trained; models/{job.id} is now the current model", job_id=job.id)

    # -- one attempt in a worker ------------------------------------------------

    async def keep_worker_warm(self) -> None:
        """While idle, keep one worker that has already imported torch waiting for the next file."""
        if self.worker is not None and not self.worker.alive:
            self.worker = None
        if (self.worker is None and self.config.jobs.warm_worker and not self.stopping
                and time.monotonic() >= self.warm_retry_at):
            worker = self.worker = await WorkerProcess.spawn(self.ws, self.ws.idle_worker_log)
            self.warm_task = asyncio.create_task(self.watch_warm(worker))

    async def watch_warm(self, worker: WorkerProcess) -> None:
        if await worker.until_ready():
            self.write_status()
            return
        code = await worker.proc.wait()
        if not self.stopping and worker.job_id is None:
            self.warm_retry_at = time.monotonic() + 60.0  # no tight loop of crashing starts
            self.alert("worker_start_failed", f"a worker died while starting ({describe_exit(code)}); "
                       f"see {self.ws.idle_worker_log}; next warm start in 60s")

    async def take_worker(self, log_path: Path) -> WorkerProcess:
        """The warm worker if it is alive, else a new one writing straight into the job's log."""
        worker = self.worker
        if worker is not None and self.warm_task is not None:
            await self.warm_task  # its ready event is read by then; the job's events follow
            self.warm_task = None
        if worker is None or not worker.alive or worker.job_id is not None:
            worker = await WorkerProcess.spawn(self.ws, log_path, append=True)
        self.worker = worker
        return worker

    async def run_attempt(self, job: jobs.Job) -> str:
        model_in = models.current_source(self.ws)
        attempt = job.start_attempt(model_in=model_in)
        self.progress = Progress(job, attempt["n"], self.config.jobs.max_attempts)
        self.set_state("training")
        resume = checkpoints.newest_complete(job.run_dir)
        self.events.emit("job_started", f"{job.record['original_name']}: training as {job.id}, attempt {attempt['n']}"
                         + (f", resuming from step {resume[0]}" if resume else ""), job_id=job.id, attempt=attempt["n"])
        log_path = job.run_dir / "worker.log"
        with open(log_path, "ab") as log:
            log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} attempt {attempt['n']} ===\n".encode())
        worker = await self.take_worker(log_path)
        spec = protocol.JobSpec(
            job_id=job.id, data_file=str(job.path_in("active")), format=job.record["format"], run_dir=str(job.run_dir),
            model_in=model_in, model_out=str(models.partial_dir(self.ws, job.id)),
            log_path=str(log_path), training=self.config.to_dict()["training"],
            checkpoint=self.config.to_dict()["checkpoint"], test_hooks=self.test_hooks)
        error = None
        try:
            await worker.send_job(spec)
        except (BrokenPipeError, ConnectionResetError):
            pass  # it died while warm; its exit code tells why
        with open(job.run_dir / "metrics.jsonl", "ab", buffering=0) as metrics:
            last_sync = time.monotonic()
            while (event := await worker.next_event()) is not None:
                if event["event"] == "ready":
                    continue
                metrics.write(protocol.encode_event(event))
                if time.monotonic() - last_sync > 1.0:  # durable within a second, without an fsync a step
                    os.fsync(metrics.fileno())
                    last_sync = time.monotonic()
                self.progress.apply(event)
                if event["event"] == "error":
                    error = event["message"]
                elif event["event"] in ("job_start", "job_end"):
                    self.write_status()
            os.fsync(metrics.fileno())
        code = await worker.wait()
        self.worker = None
        exit_text = describe_exit(code)
        if code == protocol.EXIT_DONE and models.is_complete(models.partial_dir(self.ws, job.id)):
            job.end_attempt("done", exit=exit_text, exit_code=code)
            return "done"
        if self.stopping:  # asked to stop: whatever the exit, not the job's fault
            job.end_attempt("interrupted", exit=exit_text, exit_code=code)
            return "interrupted"
        tail = log_tail(log_path)
        job.end_attempt("failed", exit=exit_text, exit_code=code if code >= 0 else None,
                        signal=signal.Signals(-code).name if code < 0 else None, error=error, log_tail=tail)
        left = self.config.jobs.max_attempts - job.failed_attempts
        detail = f": {error}" if error else ""
        self.alert("attempt_failed", f"{job.name}: attempt {attempt['n']} failed ({exit_text}{detail})"
                   + (f"; retrying ({left} left)" if left > 0 else ""), job_id=job.id)
        return "failed"


def run(ws: Workspace, once: bool = False) -> int:
    config = ws.load_config()
    return asyncio.run(Daemon(ws, config, once).run())
