"""The supervisor: one per workspace, the single writer of its files.

It watches inbox/ (watchfiles, inotify), takes complete files in arrival order,
validates each, and trains on it in a worker subprocess, one job at a time,
retrying a failed attempt up to max_attempts. It records every event, keeps
state/status.json current, and on SIGTERM/SIGINT lets the worker checkpoint
before it exits. It must never crash on input, never delete a file it was
handed, and never import torch or transformers: it has to outlive any worker.

Nor does it die of its environment: a write the disk refuses is handled by
engine/store/storage.py (the daemon is `blocked` until writing works again, the
socket keeps answering), and a damaged state file is quarantined by
engine/store/statefiles.py and rebuilt from the other files.

It is the conductor; its parts are their own modules: the intake
(engine/supervisor/intake_task.py), start-up recovery (engine/supervisor/recovery.py), what an
attempt's end means for its job (engine/supervisor/outcomes.py), and snapshots and
rollbacks (engine/supervisor/snapshot_task.py).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import watchfiles

from engine import __version__
from engine.cluster import nodes
from engine.core import atomic, protocol, resources
from engine.ops import forkserver
from engine.quality import replay, suite
from engine.store import bases, checkpoints, jobs, models, restore, statefiles
from engine.supervisor import outcomes, preflight, recovery, reload
from engine.core.aio import wait_event
from engine.core.atomic import WriteFailed
from engine.supervisor.attempt import Attempt, Progress
from engine.supervisor.commands import Commands
from engine.core.config import Config
from engine.api.control import ControlServer
from engine.store.eventlog import EventLog
from engine.core.gpu import GpuMonitor
from engine.ops.hooks import Hooks, config_notes
from engine.supervisor.intake_task import IntakeTask
from engine.store.lock import DaemonLock
from engine.ops.metrics import Metrics, MetricsServer
from engine.supervisor.snapshot_task import SnapshotTask
from engine.api.status import SCHEMA, queue_counts
from engine.core.console import console
from engine.store.storage import Storage
from engine.ops.forkserver import ForkServer
from engine.ops.worker_process import WorkerProcess, describe_exit, worker_env
from engine.store.workspace import Workspace

STATUS_INTERVAL = 1.0  # status.json (and the GPU, memory and disk samples in it) this often
PREFLIGHT_RECHECK_SECONDS = 2.0  # while blocked, how often the cause is looked at again
PROGRESS_INTERVAL = 5.0  # a progress line on the console this often while training
TEST_HOOKS_ENV = "TRAIND_TEST_HOOKS"  # JSON fault-injection hooks for the worker; unset outside tests


class Daemon:
    def __init__(self, ws: Workspace, config: Config, once: bool = False):
        self.ws = ws
        self.config = config
        self.once = once
        self.lock = DaemonLock(ws.lock_path, ws.root)
        self.storage = Storage(probe=self.write_status_now, on_clear=self.writes_work_again)
        self.events = EventLog(ws, self.storage)
        self.hooks = Hooks(ws, config.hooks, context=self.hook_fields)  # a thread of its own: the log only enqueues
        self.metrics = Metrics(ws, sources=(self.hooks,))
        self.events.listeners += [self.metrics.on_event, self.hooks.on_event]
        self.metrics_server = MetricsServer(self.metrics)
        self.starting = True  # until the workspace is recovered: only `status` is answered
        self.state, self.reason = "starting", None
        self.state_since = self.started_at = time.time()
        self.last_error: dict[str, Any] | None = None
        self.stopping = False
        self.held = False  # stopped by the user: the queue waits for 'start', across restarts (read at start)
        self.wake = asyncio.Event()
        self.job: jobs.Job | None = None  # the job in hand (validating or training)
        self.progress: Progress | None = None
        self.attempt: Attempt | None = None
        self.preflight_problem: str | None = None  # why the next attempt cannot start yet
        self.adapter_plan: dict[str, Any] | None = None  # the next attempt's spec.adapter (bases.plan)
        self.said_once: set[str] = set()  # warnings given once per daemon (an invalid file in eval/)
        self.worker: WorkerProcess | None = None  # running a job, or waiting warm
        self.warm_task: asyncio.Task | None = None
        self.forks: ForkServer | None = None  # forks each worker with torch already imported (engine/ops/forkserver.py)
        self.fork_retry_at = 0.0
        self.warm_retry_at = 0.0
        self.resume: list[jobs.Job] = []
        self.failures_in_a_row = 0
        self.reload_active = False  # after a refused write or an internal error, queue/active/ is read again
        self.intake = IntakeTask(self)  # claims and validates files ahead of training; holds queue/pending/'s order
        self.internal_errors: dict[str, int] = {}  # job id -> internal errors in a row: past a limit the job fails
        self.skip_job_id: str | None = None  # 'traind skip' on a job not running in a worker right now
        self.rolling_back = False
        self.promoting = False  # a held version is being made current: no attempt starts meanwhile
        self.snapshot_task = SnapshotTask(self)  # snapshots, verification passes and rollbacks, one at a time
        self.snapshot_summary: dict[str, Any] = {}
        self.gpu = GpuMonitor()
        self.nodes = nodes.Head(ws)  # the other machines, with [distributed] nodes > 1
        self.resources: dict[str, Any] = {}  # the last sample of GPU, memory and disk
        self.commands = Commands(self)
        self.test_hooks = json.loads(os.environ.get(TEST_HOOKS_ENV) or "{}")
        self.model_wait = preflight.ModelWait(self.test_hooks.get("daemon", {}).get("model_recheck_seconds",
                                                                                   preflight.MODEL_RECHECK_SECONDS))

    # -- state and status ---------------------------------------------------

    def derive_state(self) -> tuple[str, str | None]:
        """The daemon's state follows from the facts; nothing else sets it."""
        a = self.attempt
        if self.stopping:
            return "shutting_down", None
        if self.storage.problem:
            return "blocked", self.storage.problem
        if self.starting:
            return "starting", None
        if self.rolling_back:
            return "rolling_back", None
        if a is not None and a.blocked:
            return "blocked", a.blocked
        if self.preflight_problem:
            return "blocked", self.preflight_problem
        if a is not None and a.paused:
            return "paused", None
        if a is not None:
            return "training", None
        if self.job is not None:  # between attempts, or its worker starting: training all the same
            return ("validating" if self.job.state == "validating" else "training"), None
        if self.held:
            return "stopped", "stopped by the user: 'traind start' resumes the queue"
        return "idle", None

    def refresh(self) -> None:
        state, reason = self.derive_state()
        if (state, reason) != (self.state, self.reason):
            self.state, self.reason, self.state_since = state, reason, time.time()
            self.write_status()

    def write_status(self) -> None:
        """status.json, if the disk takes it; otherwise the old one stays whole and `traind status` asks the socket."""
        self.storage.soft("status", self.write_status_now)

    def write_status_now(self) -> None:
        doc = self.status_document()
        self.metrics.publish(doc)  # the scrape's view, whether or not the disk takes the file
        atomic.write_json_atomic(self.ws.status_path, doc)

    def writes_work_again(self, problem: str, dropped: int) -> None:
        lost = f"; {dropped} log lines could not be kept meanwhile" if dropped else ""
        self.events.emit("unblocked", f"writing works again (was: {problem}); going on{lost}")
        self.refresh()
        self.wake.set()

    def status_document(self) -> dict[str, Any]:
        try:
            model = models.current(self.ws)
        except (FileNotFoundError, ValueError):
            model = None
        if model:
            model = {**model, "adapter": bases.current_summary(self.ws, model)}
        worker = self.worker if self.worker and self.worker.alive else None
        return {"schema": SCHEMA, "updated_at": time.time(), "version": __version__,
                "daemon": {"pid": os.getpid(), "state": self.state, "reason": self.reason,
                           "since": self.state_since, "started_at": self.started_at,
                           "worker_pid": worker.pid if worker else None,
                           "warm_worker": bool(worker and worker.ready and not worker.job_id)},
                "job": self.progress.snapshot() if self.progress else None,
                "queue": queue_counts(self.ws), "model": model, "last_error": self.last_error,
                "resources": self.resources, "snapshots": self.snapshot_summary,
                "metrics_url": self.metrics_server.url, "nodes": self.nodes.status(self.config.distributed)}

    def hook_fields(self, event: dict[str, Any]) -> dict[str, Any]:
        """What the daemon knows of an event's job beyond the event itself, for the hooks' {file}, {step}, {loss}."""
        job, progress = self.job, self.progress
        if job is None or event.get("job_id") != job.id:
            return {}
        fields: dict[str, Any] = {"file": job.record.get("original_name")}
        if progress is not None and progress.doc.get("id") == job.id:
            fields.update(step=progress.doc.get("step"), loss=progress.doc.get("loss"))
        return fields

    def sample_resources(self) -> dict[str, Any]:
        """GPU, memory and disk: run in a thread, since NVML can block for seconds on a lost GPU."""
        worker = self.worker if self.worker and self.worker.alive else None
        pids = {worker.pid} if worker else set()
        disk = resources.disk_usage(self.ws.root)
        disk.update(reserve=self.config.disk.reserve, last_checkpoint_bytes=preflight.last_checkpoint_bytes(self.ws, self.job))
        return {"gpu": self.gpu.sample(pids), "memory": resources.machine_memory(),
                "worker_rss": resources.process_group_rss(worker.pid) if worker else None, "disk": disk}

    def alert(self, kind: str, message: str, level: str = "error", **fields: Any) -> None:
        self.events.emit(kind, message, level, **fields)
        self.last_error = {"time": time.time(), "kind": kind, "message": message}

    def read_held(self) -> bool:
        try:
            record = statefiles.read(self.ws.daemon_record, statefiles.DAEMON)
        except statefiles.Damaged:
            return False  # quarantined and reported; 'traind stop' holds the queue again if wanted
        return bool(record and record["held"])

    def set_held(self, held: bool) -> None:
        atomic.write_json_atomic(self.ws.daemon_record, {"held": held, "changed_at": time.time()})
        self.held = held
        self.refresh()
        self.wake.set()

    # -- start-up (the recovery itself is engine/supervisor/recovery.py) ------------------

    def quarantined(self, path: Path, moved_to: Path | None, why: str) -> None:
        where = f"moved to state/quarantine/{moved_to.name}" if moved_to else "left in place (it could not be moved)"
        self.alert("quarantined", f"{self.ws.relative(path)}: {why}; {where}; rebuilt from the other files",
                   "warning", path=str(path))

    # -- the main loop --------------------------------------------------------

    async def until_written(self, step: Callable[[], Any]) -> None:
        """Run a step of start-up until the disk lets it finish (blocked, answering `status`, meanwhile)."""
        while not self.stopping:
            try:
                result = step()
                return await result if asyncio.iscoroutine(result) else result
            except WriteFailed as e:
                self.storage.failed(e)
                self.refresh()
                await self.storage.until_clear(lambda: self.stopping)

    async def run(self) -> int:
        # A stop signal from the moment the lock is ours is a shutdown, not a death: until the daemon has
        # started writing (its PID, folders, socket), it is only noted, then acted on.
        loop, early = asyncio.get_running_loop(), []
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, early.append, signal.Signals(sig).name)
        self.lock.acquire(write_pid=False)  # the PID is written below, when the disk allows
        statefiles.set_quarantine(self.ws.root, self.quarantined)
        try:
            self.storage.soft("lock_pid", self.lock.write_pid)
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.request_shutdown, signal.Signals(sig).name)
            await self.until_written(self.ws.create_folders)
            self.start_fork_server()
            control = ControlServer(self.ws.control_socket, self.commands.handle)
            await self.until_written(control.start)
            reload.serve_metrics(self)
            self.events.emit("daemon_started", f"daemon started (PID {os.getpid()}) on {self.ws.root}"
                             + (f"; CPU mode: {self.gpu.reason}" if self.gpu.mode == "cpu"
                                else f"; {len(self.gpu.sample(set())['devices'])} GPU(s)"))
            reload.note_hooks(self, config_notes(self.config.hooks))
            for why in early[:1]:  # a signal that came before the daemon could write: acted on now it can
                self.request_shutdown(why)
            stop_watching = asyncio.Event()
            tasks = [asyncio.create_task(self.heartbeat())]
            try:
                await self.until_written(lambda: recovery.recover(self))
                self.starting = False
                if self.held:
                    self.events.emit("held", "the queue is stopped (by 'traind stop'); 'traind start' resumes it")
                tasks += [asyncio.create_task(self.watch_files(stop_watching)), asyncio.create_task(self.snapshot_task.run()),
                          asyncio.create_task(self.intake.run())]
                await self.serve()
            finally:
                stop_watching.set()
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                await control.close()
                self.metrics_server.stop()
                if self.warm_task is not None:
                    self.warm_task.cancel()
                if self.worker is not None:
                    await self.worker.dismiss()
                    self.worker = None
                if self.forks is not None:
                    self.forks.close()
                self.progress = self.job = self.attempt = None
                self.stopping = False
                self.state, self.reason = "offline", None
                self.write_status()
                self.gpu.close()
                self.events.emit("daemon_stopped", "daemon stopped"
                                 + (f"; {len(self.storage.backlog)} log lines the disk refused are lost"
                                    if not self.storage.flush() else ""))
        finally:
            self.hooks.close()  # at most one hook timeout; a hook still running then is killed
            statefiles.set_quarantine(self.ws.root, None)
            self.lock.release()
        return 0

    async def serve(self) -> None:
        while not self.stopping:
            self.refresh()
            if self.storage.problem:  # the queue holds until writing works again
                await self.storage.until_clear(lambda: self.stopping)
                continue
            job = None
            try:
                await self.keep_worker_warm()
                job = None if self.held or self.rolling_back or self.promoting else self.next_job()
                if job is None:
                    if self.once and not self.held and self.queue_empty():
                        return
                    await self.sleep(0.5)  # a watch event or a command wakes us at once; the timeout re-checks settling files
                    continue
                await self.run_job(job)
                self.failures_in_a_row = 0
                self.internal_errors.pop(job.id, None)
            except WriteFailed as e:  # the disk refused a write that matters: blocked, then the queue is taken back
                self.storage.failed(e)
                self.reload_active = self.intake.reload_pending = True
            except Exception as e:  # a bug or the system (permissions), never the input: keep going
                await self.internal_error(job, e)
            finally:
                self.job = self.progress = self.attempt = None
                self.preflight_problem = None

    async def internal_error(self, job: jobs.Job | None, e: Exception) -> None:
        """Back off and take the active file back; the same job failing this way again and again fails it."""
        self.failures_in_a_row += 1
        self.reload_active = True
        pause = min(60.0, 2.0 ** self.failures_in_a_row)
        console(traceback.format_exc().rstrip(), "error", "internal_error")
        what = f"{job.name}: " if job else ""
        self.alert("internal_error", f"{what}{type(e).__name__}: {e}; trying again in {pause:.0f}s",
                   **({"job_id": job.id} if job else {}))
        if job is not None:
            errors = self.internal_errors[job.id] = self.internal_errors.get(job.id, 0) + 1
            if errors >= self.config.jobs.max_attempts and job.location == "active":
                self.internal_errors.pop(job.id)
                try:
                    dst = job.finish("failed", {"reason": f"internal error {errors} times in a row: {type(e).__name__}: {e}"})
                    self.alert("job_failed", f"{job.record['original_name']}: internal error {errors} times in a row "
                               f"({type(e).__name__}: {e}); moved to queue/failed/{dst.name}", job_id=job.id)
                except OSError as failed:
                    self.alert("internal_error", f"{job.name}: could not be moved to queue/failed/: {failed}")
        await asyncio.sleep(pause)

    async def sleep(self, seconds: float) -> None:
        self.wake.clear()
        await wait_event(self.wake, seconds)

    def request_shutdown(self, why: str) -> None:
        if self.stopping:
            return
        self.stopping = True
        self.events.emit("shutdown", f"{why}: shutting down")
        self.refresh()
        self.wake.set()
        if self.attempt is not None:
            self.attempt.worker.signal(signal.SIGTERM)
            asyncio.get_running_loop().call_later(self.config.jobs.stop_grace_seconds, self.kill_after_grace, self.attempt.worker)

    def kill_after_grace(self, worker: WorkerProcess) -> None:
        if worker.alive:
            self.alert("worker_killed", f"worker did not stop within {self.config.jobs.stop_grace_seconds:g}s: killing its process group", "warning")
            worker.signal(signal.SIGKILL)

    async def watch_files(self, stop: asyncio.Event) -> None:
        """inotify on the inbox (new files) and on the workspace folder for traind.toml (live settings).

        The folder, not the file: an editor saves by renaming a new file over it (or moving it aside and
        writing a new one), and a watch on the file's inode would see nothing after the first such save."""
        inbox, config = str(self.ws.inbox), str(self.ws.config_path)

        def wanted(_change: watchfiles.Change, path: str) -> bool:
            return path == config or os.path.dirname(path) == inbox  # not the root's other entries

        async for changes in watchfiles.awatch(self.ws.inbox, self.ws.root, stop_event=stop, debounce=50, step=20,
                                               recursive=False, watch_filter=wanted, ignore_permission_denied=True):
            if any(path == config for _, path in changes):
                await reload.reload(self)
            self.wake.set()
            self.intake.wake.set()

    async def heartbeat(self) -> None:
        last_print = 0.0
        while True:
            await asyncio.sleep(STATUS_INTERVAL)
            self.resources = await asyncio.to_thread(self.sample_resources)
            if self.storage.problem or self.storage.backlog or self.storage.pending:
                self.storage.retry()  # status.json is among what it writes, when it can
            self.refresh()  # a write refused since the last beat changes the state
            self.write_status()
            self.watch_claimed_file()
            now = time.monotonic()
            if self.progress is not None and self.progress.doc["phase"] == "training" and now - last_print >= PROGRESS_INTERVAL:
                last_print = now
                self.print_progress()

    def watch_claimed_file(self) -> None:
        """Once a second while training: a file appended to, rewritten or removed ends its attempt at once."""
        a = self.attempt
        if a is not None and a.changed is None and a.exit_code is None:
            if (why := jobs.changed_since_claim(a.job)) is not None:
                a.changed = why
                a.kill()

    def print_progress(self) -> None:
        d = self.progress.snapshot()
        loss = "-" if d["loss"] is None else f"{d['loss']:.4f}"
        rate = "-" if d["tokens_per_s"] is None else f"{d['tokens_per_s']:,.0f}"
        eta = "-" if d["eta_s"] is None else f"{d['eta_s']:.0f}s"
        console(f"{d['id']}: step {d['step']}/{d['total_steps']} ({d['percent'] or 0:.0f}%) "
                f"loss {loss} · {rate} tok/s · ETA {eta}", kind="progress")

    # -- the queue ---------------------------------------------------------------

    def queue_empty(self) -> bool:
        """Nothing active, pending, being validated or waiting in the inbox (for --once)."""
        return not (self.resume or self.intake.has_work())

    def next_job(self) -> jobs.Job | None:
        if self.reload_active:
            self.reload_active = False
            recovery.take_back_active(self, "taken back after an interruption")
        if self.resume:
            return self.resume.pop(0)
        return self.intake.next_validated()

    async def run_job(self, job: jobs.Job) -> None:
        self.job = job
        if job.state == "training" and recovery.model_saved(self.ws, job):  # trained; publishing it was cut short
            outcomes.finish_done(self, job)
            return
        if job.state in ("queued", "validating") and not job.record.get("validated_at"):  # rebuilt, or cut short
            job.save(state="validating")
            self.progress = Progress(job, 0, self.config.jobs.max_attempts, phase="validating")
            self.refresh()
            report = await asyncio.to_thread(self.intake.validate, job)
            if report is None:
                return
            self.intake.record_valid(job, report)
        while not self.stopping:
            if self.skip_job_id == job.id:
                outcomes.skip(self, job)
                return
            if (why := outcomes.given_up(self, job)) is not None:
                outcomes.fail(self, job, why)
                return
            if (no_model := recovery.check_current_model(self)) is not None:
                dst = job.finish("failed", {"reason": no_model})
                self.alert("job_failed", f"{job.record['original_name']}: {no_model}; moved to queue/failed/{dst.name}",
                           job_id=job.id)
                return
            if self.held or self.rolling_back or self.promoting:
                self.resume.insert(0, job)
                return
            if (why := jobs.changed_since_claim(job)) is not None:
                outcomes.fail_changed(self, job, why)
                return
            # The job line shows from here: the preflight and a worker's start take seconds.
            self.progress = Progress(job, len(job.record["attempts"]) + 1, self.config.jobs.max_attempts)
            if not await self.preflight(job):
                continue
            outcome, anomaly = await self.run_attempt(job)
            if outcome == "changed":
                outcomes.fail_changed(self, job, job.record["attempts"][-1]["changed"])
                return
            if outcome == "done":
                outcomes.finish_done(self, job)
                return
            if outcome == "skipped":
                outcomes.skip(self, job)
                return
            if outcome == "stopped":
                self.resume.insert(0, job)
                return
            if outcome == "interrupted" and self.stopping:
                self.events.emit("job_interrupted", f"{job.name}: stopped with a checkpoint; it resumes when the daemon starts again", job_id=job.id)
                return
            if outcome == "rollback" and not outcomes.plan_rollback(self, job, anomaly):
                return

    async def preflight(self, job: jobs.Job) -> bool:
        """Disk and GPU checks before an attempt; while one fails the daemon is `blocked` and re-checks."""
        problem = await asyncio.to_thread(self.preflight_problems, job)
        if problem is None:
            if self.preflight_problem:
                self.events.emit("unblocked", f"{job.name}: {self.preflight_problem.split(':')[0]} preflight passes again; starting")
            self.preflight_problem = None
            return True
        if problem != self.preflight_problem:
            self.preflight_problem = problem
            self.alert("blocked", f"{job.name}: not started: {problem}; waiting for it to clear", "warning", job_id=job.id)
        self.refresh()
        await self.sleep(PREFLIGHT_RECHECK_SECONDS)
        return False

    def preflight_problems(self, job: jobs.Job) -> str | None:
        warm = {self.worker.pid} if self.worker and self.worker.alive else set()
        return (self.model_wait.problem(self.ws) or self.nodes.problem(self.config.distributed)
                or self.plan_adapter()
                or preflight.disk_problem(self.ws, job, self.config.disk.reserve, self.adapter_plan)
                or self.gpu.preflight(self.config.gpu.min_free_memory, warm)
                or preflight.gpu_memory_problem(preflight.current_source(self.ws), self.job_training_config(job),
                                                self.config.to_dict().get("adapter"), self.gpu.sample(warm)))

    def start_on_this_chain(self, job: jobs.Job, model_in: str) -> None:
        """A job's checkpoints belong to what it was training (whole model, or this adapter on this base) from
        which model: if any changed since its last attempt (a promote), they cannot be resumed: it starts again."""
        if restore.start_over_if_changed(job, bases.trains(self.adapter_plan, model_in)):
            self.alert("restarted", f"{job.name}: the current model, [adapter] or its base changed since its last "
                       "attempt: it starts again from step 0 (its checkpoints are kept aside)", "warning", job_id=job.id)

    def plan_adapter(self) -> str | None:
        self.adapter_plan, problem = bases.plan(self.ws, self.config.adapter)
        return problem

    # -- one attempt in a worker ------------------------------------------------

    def start_fork_server(self) -> None:
        self.forks = forkserver.for_daemon(self.ws.root, self.ws.fork_socket, self.ws.fork_server_log,
                                           self.config.jobs.fork_server, worker_env())

    async def keep_worker_warm(self) -> None:
        """While idle, keep one worker that has already imported torch waiting for the next file."""
        if self.worker is not None and not self.worker.alive:
            self.worker = None
        if self.forks is not None and (problem := self.forks.problem):
            self.alert("worker_start_failed", f"fork server: {problem}; workers start as new processes (see "
                       f"{self.ws.fork_server_log}); next try in 60s", "warning")
            self.forks.close()
            self.forks, self.fork_retry_at = None, time.monotonic() + 60.0
        elif self.forks is None and self.config.jobs.fork_server and time.monotonic() >= self.fork_retry_at:
            self.start_fork_server()
        if (self.worker is None and self.config.jobs.warm_worker and not self.stopping and not self.held
                and time.monotonic() >= self.warm_retry_at and self.config.distributed.nodes == 1):
            worker = self.worker = await WorkerProcess.spawn(self.ws, self.ws.idle_worker_log,
                                                             processes=self.config.training.processes, forks=self.forks)
            self.warm_task = asyncio.create_task(self.watch_warm(worker))
        elif self.held and self.worker is not None and self.worker.job_id is None:
            await self.worker.dismiss()  # stopped means the GPU is released: no worker holds it
            self.worker = None

    async def watch_warm(self, worker: WorkerProcess) -> None:
        if await worker.until_ready():
            self.write_status()
            return
        code = await worker.proc.wait()
        if self.forks is not None and self.forks.problem:
            self.wake.set()  # its server died (keep_worker_warm says so): the next worker starts without it
        elif not self.stopping and worker.job_id is None and not self.held:
            self.warm_retry_at = time.monotonic() + 60.0  # no tight loop of crashing starts
            self.alert("worker_start_failed", f"a worker died while starting ({describe_exit(code)}); "
                       f"see {self.ws.idle_worker_log}; next warm start in 60s")

    async def take_worker(self, log_path: Path, launch: list[str] | None) -> WorkerProcess:
        """The warm worker if it is alive, else a new one writing straight into the job's log; on several
        machines always a new one (`launch`: its agent's arguments), as each attempt is a new rendezvous."""
        worker = self.worker
        if worker is not None and self.warm_task is not None:
            await self.warm_task  # its ready event is read by then; the job's events follow
            self.warm_task = None
        if worker is not None and worker.alive and (launch or worker.processes != self.config.training.processes):
            await worker.dismiss()  # traind.toml changed the number of processes (or machines) while it waited
        if worker is None or not worker.alive or worker.job_id is not None or launch:
            worker = await WorkerProcess.spawn(self.ws, log_path, append=True, processes=self.config.training.processes,
                                               launch=launch, forks=self.forks)
        self.worker = worker
        return worker

    def job_training_config(self, job: jobs.Job) -> dict[str, Any]:
        training = self.config.to_dict()["training"]
        training.update(job.record.get("batch") or {})  # a smaller micro-batch after a CUDA OOM
        return training

    async def run_attempt(self, job: jobs.Job) -> tuple[str, dict[str, Any] | None]:
        model_in = models.current_source(self.ws)
        self.start_on_this_chain(job, model_in)
        resume = checkpoints.newest_complete(job.run_dir)
        record = job.start_attempt(model_in=model_in, checkpoint_at_start=resume[0] if resume else None)
        self.events.emit("job_started", f"{job.record['original_name']}: training as {job.id}, attempt {record['n']}"
                         + (f", resuming from step {resume[0]}" if resume else ""), job_id=job.id, attempt=record["n"])
        log_path = job.run_dir / "worker.log"
        self.storage.append(log_path, f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} attempt {record['n']} ===\n".encode(),
                            sync=False)
        worker = await self.take_worker(log_path, self.nodes.begin(self.config.distributed, self.config.training.processes,
                                                                  job.id, record["n"]))
        oom = resources.OomCounter.for_pid(worker.pid)
        config = self.config.to_dict()
        evaluation, left_out = await asyncio.to_thread(suite.job_spec, self.ws, self.config, job.id)
        for problem in left_out:
            if problem not in self.said_once:
                self.said_once.add(problem)
                self.alert("eval_source_invalid", problem, "warning")
        spec = protocol.JobSpec(
            job_id=job.id, data_file=str(job.path_in("active")), format=job.record["format"], run_dir=str(job.run_dir),
            model_in=model_in, model_out=str(models.partial_dir(self.ws, job.id)), log_path=str(log_path),
            training=self.job_training_config(job), checkpoint=config["checkpoint"], guard=config["guard"],
            disk_reserve=self.config.disk.reserve, adapter=self.adapter_plan, chain_steps=models.chain_steps(model_in),
            rollback=job.record.get("pending_rollback"),
            eval=evaluation, replay=replay.plan(self.ws, self.config, job), skip_lines=job.record.get("skipped_lines") or [],
            test_hooks={k: v for k, v in self.test_hooks.items() if k != "daemon"})
        attempt = self.attempt = Attempt(job, worker, spec, self.progress, self.on_worker_event, self.storage)
        self.refresh()
        try:
            await worker.send_job(spec)
        except (BrokenPipeError, ConnectionResetError):
            pass  # it died while warm; its exit code tells why
        await self.nodes.during(attempt)
        self.worker = None
        outcome, details = self.classify(job, attempt, oom)
        job.end_attempt(outcome, **details)
        self.attempt = None
        self.refresh()
        return outcome, attempt.anomaly

    def on_worker_event(self, event: dict[str, Any]) -> None:
        kind, job = event["event"], self.job
        if kind == "blocked":
            self.alert("blocked", f"{job.name}: {event['reason']}; training holds until there is room", "warning", job_id=job.id)
        elif kind == "unblocked":
            self.events.emit("unblocked", f"{job.name}: enough free space again; training goes on", job_id=job.id)
        elif kind == "job_start" and event.get("skipped"):
            first, last = event["skipped"]
            self.events.emit("rolled_back", f"{job.name}: resumed from step {event.get('rolled_back_from', 0)}, "
                             f"batches of steps {first}-{last} skipped", job_id=job.id)
            job.save(pending_rollback=None)
        self.refresh()

    def classify(self, job: jobs.Job, attempt: Attempt, oom: resources.OomCounter) -> tuple[str, dict[str, Any]]:
        outcome, details = outcomes.classify(self, job, attempt, oom)
        self.metrics.attempt_ended(outcome, attempt.anomaly)
        return outcome, details


def run(ws: Workspace, once: bool = False) -> int:
    config, started = ws.load_config(), time.time()
    code = asyncio.run(Daemon(ws, config, once).run())
    return outcomes.once_result(ws, started, code) if once else code
