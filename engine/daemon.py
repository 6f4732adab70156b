"""The supervisor: one per workspace, the single writer of its files.

It watches inbox/ (watchfiles, inotify), takes complete files in arrival order,
validates each, and trains on it in a worker subprocess, one job at a time,
retrying a failed attempt up to max_attempts. It records every event, keeps
state/status.json current, and on SIGTERM/SIGINT lets the worker checkpoint
before it exits. It must never crash on input, never delete a file it was
handed, and never import torch or transformers: it has to outlive any worker.

Nor does it die of its environment: a write the disk refuses is handled by
engine/storage.py (the daemon is `blocked` until writing works again, the
socket keeps answering), and a damaged state file is quarantined by
engine/statefiles.py and rebuilt from the other files.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import time
import traceback
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import watchfiles

from engine import (__version__, atomic, bases, checkpoints, intake, jobs, models, preflight, protocol, resources,
                    restore, retention, schedule, snapshots, statefiles, validate, verification)
from engine.atomic import WriteFailed
from engine.attempt import Attempt, Progress
from engine.commands import Commands
from engine.config import Config, ConfigError
from engine.control import ControlServer
from engine.eventlog import EventLog
from engine.gpu import GpuMonitor
from engine.lock import DaemonLock
from engine.status import SCHEMA, queue_counts
from engine.storage import Storage, console
from engine.worker_process import WorkerProcess, describe_exit, kill_orphan
from engine.workspace import Workspace

INTAKE_BATCH = 500  # files claimed and validated per pass of the intake
STATUS_INTERVAL = 1.0  # status.json (and the GPU, memory and disk samples in it) this often
PREFLIGHT_RECHECK_SECONDS = 2.0  # while blocked, how often the cause is looked at again
SCHEDULE_CHECK_SECONDS = 30.0  # how often a scheduled snapshot is looked for (and at once after each file)
PROGRESS_INTERVAL = 5.0  # a progress line on the console this often while training
LOG_TAIL_LINES = 30  # worker.log lines kept in a failed file's reason
TEST_HOOKS_ENV = "TRAIND_TEST_HOOKS"  # JSON fault-injection hooks for the worker; unset outside tests


def log_tail(path: Path, lines: int = LOG_TAIL_LINES, window: int = 64 * 1024) -> list[str]:
    return atomic.read_tail(path, window).decode("utf-8", "replace").splitlines()[-lines:]


async def wait_event(event: asyncio.Event, timeout: float) -> None:
    """Until the event is set or the time is up. Not asyncio.wait_for: on Python 3.11 it can swallow a
    cancellation that arrives as the event is set, and a task that ignores its cancel hangs shutdown."""
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({waiter}, timeout=timeout)
    finally:
        waiter.cancel()


def keep_optimizer_state(job: jobs.Job, model_dir: Path) -> None:
    """Link the job's final optimizer and scheduler state into its model version (snapshots.include_optimizer)."""
    newest = checkpoints.newest_complete(job.run_dir)
    if newest is None:
        return
    for name in ("optimizer.pt", "scheduler.pt"):
        src, dst = newest[1] / name, model_dir / name
        if src.exists() and not dst.exists():
            os.link(src, dst)


class Daemon:
    def __init__(self, ws: Workspace, config: Config, once: bool = False):
        self.ws = ws
        self.config = config
        self.once = once
        self.lock = DaemonLock(ws.lock_path, ws.root)
        self.storage = Storage(probe=self.write_status_now, on_clear=self.writes_work_again)
        self.events = EventLog(ws, self.storage)
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
        self.current_adapter: tuple[Any, dict[str, Any] | None] = (None, None)  # (pointer key, its adapter)
        self.worker: WorkerProcess | None = None  # running a job, or waiting warm
        self.warm_task: asyncio.Task | None = None
        self.warm_retry_at = 0.0
        self.seen: dict = {}  # inbox observations between scans (settling files)
        self.ignored: set[str] = set()
        self.resume: list[jobs.Job] = []
        self.failures_in_a_row = 0
        self.reload_active = False  # after a refused write or an internal error, queue/active/ is read again
        self.reload_pending = False  # the same for queue/pending/, by the intake
        self.pending: deque[str] = deque()  # validated jobs waiting in queue/pending/, in claim order
        self.unvalidated: list[jobs.Job] = []  # claimed jobs whose validation was cut short
        self.sequence = 0  # the next job number, derived from the folders at start
        self.intake_wake = asyncio.Event()
        self.taking_in = False
        self.internal_errors: dict[str, int] = {}  # job id -> internal errors in a row: past a limit the job fails
        self.skip_job_id: str | None = None  # 'traind skip' on a job not running in a worker right now
        self.rolling_back = False
        self.snapshot_lock = asyncio.Lock()  # one snapshot, verification pass or rollback at a time
        self.snapshot_wake = asyncio.Event()
        self.snapshot_summary: dict[str, Any] = {}
        self.gpu = GpuMonitor()
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
        if self.job is not None:
            return "validating", None
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
        atomic.write_json_atomic(self.ws.status_path, self.status_document())

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
            model = {**model, "adapter": self.adapter_of_current(model)}
        worker = self.worker if self.worker and self.worker.alive else None
        doc = {"schema": SCHEMA, "updated_at": time.time(), "version": __version__,
               "daemon": {"pid": os.getpid(), "state": self.state, "reason": self.reason,
                          "since": self.state_since, "started_at": self.started_at,
                          "worker_pid": worker.pid if worker else None,
                          "warm_worker": bool(worker and worker.ready and not worker.job_id)},
               "job": self.progress.snapshot() if self.progress else None,
               "queue": queue_counts(self.ws), "model": model, "last_error": self.last_error,
               "resources": self.resources, "snapshots": self.snapshot_summary}
        return doc

    def adapter_of_current(self, pointer: dict[str, Any]) -> dict[str, Any] | None:
        """The current version's adapter (method, rank, base), read once per version: the status is made every second."""
        key = (pointer.get("kind"), pointer.get("path"), pointer.get("switched_at"))
        if self.current_adapter[0] != key:
            adapter = bases.adapter_of(models.current_source(self.ws)) if pointer.get("kind") == "local" else None
            self.current_adapter = (key, adapter and {k: adapter[k] for k in ("method", "r", "alpha", "base")})
        return self.current_adapter[1]

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

    # -- start-up -----------------------------------------------------------

    def quarantined(self, path: Path, moved_to: Path | None, why: str) -> None:
        where = f"moved to state/quarantine/{moved_to.name}" if moved_to else "left in place (it could not be moved)"
        self.alert("quarantined", f"{self.ws.relative(path)}: {why}; {where}; rebuilt from the other files",
                   "warning", path=str(path))

    def check_current_model(self) -> str | None:
        """models/current.json readable, or rebuilt from the newest model version; else why there is no model."""
        try:
            models.current(self.ws)
            return None
        except FileNotFoundError:
            why = "models/current.json is missing"
        except statefiles.Damaged as e:
            why = f"models/current.json was damaged ({e.why})"
        rebuilt = models.rebuild_current(self.ws, self.config.model.source)
        if rebuilt is None:
            return f"no current model: {why} and no model version or base model was found"
        self.alert("recovered", f"{why}: the current model is now {rebuilt}", "warning")
        return None

    def recover(self) -> None:
        """Make the workspace whole after whatever ended the last daemon."""
        self.held = self.read_held()
        self.check_current_model()
        for folder in (self.ws.state, self.ws.models, self.ws.runs, *(self.ws.queue(s) for s in ("active", "done", "failed", "rejected"))):
            atomic.remove_temp_files(folder)
        for temp in intake.remove_stale_add_temps(self.ws.inbox):
            self.events.emit("recovered", f"removed {temp.name}, left by a 'traind add' that was killed", "warning")
        for partial in models.remove_incomplete_partials(self.ws):
            self.events.emit("recovered", f"removed a half-saved model {partial.name}", "warning")
        for temp in snapshots.clean_temp(self.ws):
            self.events.emit("recovered", f"removed {temp.name}, left by an interrupted snapshot or restore", "warning")
        if (done := restore.recover(self.ws)) is not None:
            self.events.emit("recovered", done, "warning")
        orphan = kill_orphan(self.ws, self.config.jobs.stop_grace_seconds)
        if orphan:
            self.events.emit("recovered", f"stopped worker PID {orphan} left by a previous daemon", "warning")
        self.take_back_active("left active by a previous daemon")
        self.take_back_pending()
        self.sequence = jobs.next_sequence(self.ws)

    def take_back_active(self, why: str) -> None:
        """What queue/active/ holds, made whole and queued again: at start, and after a refused write."""
        self.resume = []
        for job in jobs.active_jobs(self.ws):
            if job.state in jobs.FINAL_STATES:
                jobs.complete_move(job)
                self.events.emit("recovered", f"{job.name}: finished moving to queue/{job.state}/", "warning")
            elif self.model_saved(job):
                self.finish_done(job)
            else:
                if job.record["attempts"] and "outcome" not in job.record["attempts"][-1]:
                    job.end_attempt("interrupted", exit="the daemon stopped while it ran")
                step = checkpoints.newest_complete(job.run_dir)
                where = f"from its checkpoint at step {step[0]}" if step else "from the start"
                self.events.emit("recovered", f"{job.name}: {why}; resuming {where}", "warning")
                self.resume.append(job)

    def model_saved(self, job: jobs.Job) -> bool:
        """The worker finished and saved the job's model; only publishing it is left."""
        return models.is_complete(models.partial_dir(self.ws, job.id)) or (self.ws.models / job.id).exists()

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
        self.lock.acquire(write_pid=False)  # the PID is written below, when the disk allows
        statefiles.set_quarantine(self.ws.root, self.quarantined)
        try:
            self.storage.soft("lock_pid", self.lock.write_pid)
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.request_shutdown, signal.Signals(sig).name)
            await self.until_written(self.ws.create_folders)
            control = ControlServer(self.ws.control_socket, self.commands.handle)
            await self.until_written(control.start)
            self.events.emit("daemon_started", f"daemon started (PID {os.getpid()}) on {self.ws.root}"
                             + (f"; CPU mode: {self.gpu.reason}" if self.gpu.mode == "cpu"
                                else f"; {len(self.gpu.sample(set())['devices'])} GPU(s)"))
            stop_watching = asyncio.Event()
            tasks = [asyncio.create_task(self.heartbeat())]
            try:
                await self.until_written(self.recover)
                self.starting = False
                if self.held:
                    self.events.emit("held", "the queue is stopped (by 'traind stop'); 'traind start' resumes it")
                tasks += [asyncio.create_task(self.watch_files(stop_watching)), asyncio.create_task(self.keep_snapshots()),
                          asyncio.create_task(self.keep_taking_in())]
                await self.serve()
            finally:
                stop_watching.set()
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                await control.close()
                if self.warm_task is not None:
                    self.warm_task.cancel()
                if self.worker is not None:
                    await self.worker.dismiss()
                    self.worker = None
                self.progress = self.job = self.attempt = None
                self.stopping = False
                self.state, self.reason = "offline", None
                self.write_status()
                self.gpu.close()
                self.events.emit("daemon_stopped", "daemon stopped"
                                 + (f"; {len(self.storage.backlog)} log lines the disk refused are lost"
                                    if not self.storage.flush() else ""))
        finally:
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
                job = None if self.held or self.rolling_back else self.next_job()
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
                self.reload_active = self.reload_pending = True
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
        console(traceback.format_exc().rstrip())
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
                await self.reload_config()
            self.wake.set()
            self.intake_wake.set()

    async def reload_config(self) -> None:
        if not self.ws.config_path.exists():
            return  # moved aside or deleted mid-save: the file that replaces it brings its own event
        try:
            new = self.ws.load_config()
        except ConfigError as e:
            self.alert("config_invalid", f"{e}; keeping the previous settings", "warning")
            return
        if new == self.config:
            return
        old, self.config = self.config, new
        changed = new.changes_from(old)
        listed = ", ".join(f"{key} = {value!r}" for key, value in changed.items())
        self.events.emit("config_reloaded", f"{self.ws.config_path.name} reloaded ({listed}): new settings apply from "
                         "the next attempt" + ("; disk reserve applied now" if "disk.reserve" in changed else ""),
                         changed=changed)
        if new.disk.reserve != old.disk.reserve and self.attempt is not None:
            await self.attempt.send("set_disk_reserve", bytes=new.disk.reserve)

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
        console(f"{time.strftime('%H:%M:%S')} {d['id']}: step {d['step']}/{d['total_steps']} ({d['percent'] or 0:.0f}%) "
                f"loss {loss} · {rate} tok/s · ETA {eta}")

    # -- the queue ---------------------------------------------------------------

    def queue_empty(self) -> bool:
        """Nothing active, pending, being validated or waiting in the inbox (for --once)."""
        return not (self.resume or self.pending or self.unvalidated or self.reload_pending or self.taking_in
                    or self.inbox_has_work())

    def inbox_has_work(self) -> bool:
        scan = intake.scan_inbox(self.ws.inbox, self.config.inbox.settle_seconds, time.time(), self.seen)
        return bool(scan.ready or scan.rejected or scan.waiting)

    def next_job(self) -> jobs.Job | None:
        if self.reload_active:
            self.reload_active = False
            self.take_back_active("taken back after an interruption")
        if self.resume:
            return self.resume.pop(0)
        while self.pending:  # validated, in claim order: its turn
            job_id = self.pending.popleft()
            if not os.path.lexists(self.ws.queue("pending") / f"{job_id}.jsonl"):
                continue  # taken back meanwhile (after a refused write): where it is now decides
            job = jobs.load(self.ws, job_id)
            jobs.start(job)
            return job
        return None

    # -- intake: claimed and validated ahead of training ------------------------

    async def keep_taking_in(self) -> None:
        """Claim and validate what arrives, whatever the trainer is doing: a burst of files is checked at
        once (rejections reported at once), and valid files wait in queue/pending/ for their turn."""
        while True:
            if not self.storage.problem:
                self.taking_in = True
                try:
                    if await asyncio.to_thread(self.take_in):
                        self.wake.set()
                        continue  # more may be waiting past the batch
                except WriteFailed as e:
                    self.storage.failed(e)
                    self.reload_pending = True
                except Exception as e:  # a bug must not stop intake for good
                    self.alert("internal_error", f"intake: {type(e).__name__}: {e}")
                    await asyncio.sleep(5.0)
                finally:
                    self.taking_in = False
            self.intake_wake.clear()
            await wait_event(self.intake_wake, 0.5)  # the inbox watch wakes it; the timeout re-checks settling files

    def take_in(self) -> int:
        """In a thread: one scan of the inbox, then claim every settled file in arrival order (a batch at a
        time) and validate it. Returns how many files it took."""
        if self.reload_pending:
            self.reload_pending = False
            self.take_back_pending()
        taken = 0
        for job in self.unvalidated:  # claimed, but validation was cut short
            self.accept(job)
            taken += 1
        self.unvalidated = []
        scan = intake.scan_inbox(self.ws.inbox, self.config.inbox.settle_seconds, time.time(), self.seen)
        for path in scan.ignored:
            if path.name not in self.ignored:
                self.ignored.add(path.name)
                self.events.emit("ignored", f"inbox/{path.name}: ignored (only *.jsonl files are taken; dot-files, .part and .tmp are in-progress writes)")
        for path, reason in scan.rejected:
            if (job := self.claim(path)) is not None:
                self.reject(job, reason)
                taken += 1
        for path in scan.ready[:INTAKE_BATCH]:
            if (job := self.claim(path)) is not None:
                self.accept(job)
                taken += 1
        return taken

    def accept(self, job: jobs.Job) -> None:
        """Validate a claimed file: valid, it waits its turn in queue/pending/; invalid, it is rejected."""
        report = self.validate(job)
        if report is None:
            return
        job.save(state="queued", format=report["format"], examples=report["examples"], validated_at=time.time())
        self.events.emit("accepted", f"{job.record['original_name']}: valid, {report['examples']} examples "
                         f"({report['format']}); job {job.id}", job_id=job.id)
        self.pending.append(job.id)

    def take_back_pending(self) -> None:
        """What queue/pending/ holds, in claim order: at start, and after a refused write."""
        self.pending.clear()
        self.unvalidated = []
        for job in jobs.active_jobs(self.ws, "pending"):
            if job.state in jobs.FINAL_STATES:
                jobs.complete_move(job)
            elif job.record.get("validated_at"):
                self.pending.append(job.id)
            else:
                self.unvalidated.append(job)

    def claim(self, path: Path) -> jobs.Job | None:
        try:
            job = jobs.claim(self.ws, path, self.sequence, save=False)  # written once, with the validation
            self.sequence += 1
            return job
        except FileNotFoundError:  # taken away between the scan and the claim
            return None
        except WriteFailed:  # the disk, not the file: blocked; what reached queue/active/ is taken back later
            raise
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
        path = job.path_in(job.location or "pending")
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
        self.job = job
        if job.state == "training" and self.model_saved(job):  # trained; publishing it was cut short
            self.finish_done(job)
            return
        if job.state in ("queued", "validating") and not job.record.get("validated_at"):  # rebuilt, or cut short
            job.save(state="validating")
            self.progress = Progress(job, 0, self.config.jobs.max_attempts, phase="validating")
            self.refresh()
            report = await asyncio.to_thread(self.validate, job)
            if report is None:
                return
            job.save(state="queued", format=report["format"], examples=report["examples"], validated_at=time.time())
            self.events.emit("accepted", f"{job.record['original_name']}: valid, {report['examples']} examples ({report['format']}); job {job.id}", job_id=job.id)
        while not self.stopping:
            if self.skip_job_id == job.id:
                self.skip(job)
                return
            if (why := self.given_up(job)) is not None:
                self.fail(job, why)
                return
            if (no_model := self.check_current_model()) is not None:
                dst = job.finish("failed", {"reason": no_model})
                self.alert("job_failed", f"{job.record['original_name']}: {no_model}; moved to queue/failed/{dst.name}",
                           job_id=job.id)
                return
            if self.held or self.rolling_back:
                self.resume.insert(0, job)
                return
            if (why := jobs.changed_since_claim(job)) is not None:
                self.fail_changed(job, why)
                return
            if not await self.preflight(job):
                continue
            outcome, anomaly = await self.run_attempt(job)
            if outcome == "changed":
                self.fail_changed(job, job.record["attempts"][-1]["changed"])
                return
            if outcome == "done":
                self.finish_done(job)
                return
            if outcome == "skipped":
                self.skip(job)
                return
            if outcome == "stopped":
                self.resume.insert(0, job)
                return
            if outcome == "interrupted" and self.stopping:
                self.events.emit("job_interrupted", f"{job.name}: stopped with a checkpoint; it resumes when the daemon starts again", job_id=job.id)
                return
            if outcome == "rollback" and not self.plan_rollback(job, anomaly):
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
        return (self.model_wait.problem(self.ws)
                or self.plan_adapter()
                or preflight.disk_problem(self.ws, job, self.config.disk.reserve)
                or self.gpu.preflight(self.config.gpu.min_free_memory, warm)
                or preflight.gpu_memory_problem(preflight.current_source(self.ws), self.job_training_config(job),
                                                self.config.to_dict().get("adapter"), self.gpu.sample(warm)))

    def plan_adapter(self) -> str | None:
        self.adapter_plan, problem = bases.plan(self.ws, self.config.adapter)
        return problem

    def plan_rollback(self, job: jobs.Job, anomaly: dict[str, Any]) -> bool:
        """After an anomaly: roll back and go on (True), or give the file up (False)."""
        what = {"nan": "NaN loss or gradient", "inf": "infinite loss or gradient", "spike": "loss spike"}.get(anomaly.get("kind"), "anomaly")
        step = anomaly.get("step")
        rollbacks = job.record.setdefault("rollbacks", [])
        rollbacks.append({"step": step, "kind": anomaly.get("kind"), "message": anomaly.get("message"), "time": time.time()})
        limit = self.config.guard.max_rollbacks
        if len(rollbacks) > limit:
            job.save()
            dst = job.finish("failed", {"reason": f"{what} at step {step} after {limit} rollbacks", "rollbacks": rollbacks})
            self.alert("job_failed", f"{job.record['original_name']}: {what} at step {step} again after {limit} rollbacks; "
                       f"moved to queue/failed/{dst.name}; the model stays at the last good state", job_id=job.id)
            return False
        job.save(pending_rollback={"bad_step": step, "kind": anomaly.get("kind")})
        base = checkpoints.newest_complete(job.run_dir)
        origin = f"the checkpoint at step {base[0]}" if base and base[0] < step else "the job's starting model"
        self.alert("rollback", f"{job.name}: {what} at step {step}: rolling back to {origin} and skipping the batches "
                   f"through step {step} (rollback {len(rollbacks)} of {limit})", "warning", job_id=job.id, step=step)
        return True

    def skip(self, job: jobs.Job) -> None:
        self.skip_job_id = None
        step = self.progress.doc["step"] if self.progress else None
        dst = job.finish("failed", {"reason": "skipped by user", "step": step})
        self.events.emit("job_skipped", f"{job.record['original_name']}: skipped by user; moved to queue/failed/{dst.name}",
                         "warning", job_id=job.id)

    def given_up(self, job: jobs.Job) -> str | None:
        """Why the job gets no further attempt, if it does not."""
        c = self.config.jobs
        if (n := job.failures()) >= c.max_attempts:
            return f"{n} failed attempt(s) in a row without progress"
        if (n := job.failures(jobs.OOM_KILLED)) >= c.max_oom_kills:
            return f"killed by the OOM killer {n} time(s) in a row without progress"
        return None

    def fail(self, job: jobs.Job, why: str) -> None:
        last = job.record["attempts"][-1] if job.record["attempts"] else {}
        reason = {"reason": f"{why}; last: {last.get('exit', 'unknown')}",
                  "exit_code": last.get("exit_code"), "signal": last.get("signal"),
                  "error": last.get("error"), "log_tail": last.get("log_tail", [])}
        dst = job.finish("failed", reason)
        self.alert("job_failed", f"{job.record['original_name']}: {why} ({last.get('exit')}); moved to queue/failed/{dst.name}", job_id=job.id)

    def fail_changed(self, job: jobs.Job, why: str) -> None:
        """The file is not what was claimed: nothing trained on it is published, and it is kept as it is now."""
        dst = job.finish("failed", {"reason": f"changed while training: {why}"})
        where = f"moved to queue/failed/{dst.name}" if why != "removed" else f"its reason is in queue/failed/{dst.name}.reason.json"
        self.alert("file_changed", f"{job.record['original_name']}: changed while training ({why}); nothing trained on it "
                   f"is published; {where}", job_id=job.id)

    def finish_done(self, job: jobs.Job) -> None:
        if (why := jobs.changed_since_claim(job)) is not None:
            self.fail_changed(job, why)
            return
        loss = self.progress.doc["loss"] if self.progress else None
        if self.config.snapshots.include_optimizer:
            keep_optimizer_state(job, models.partial_dir(self.ws, job.id))
        models.publish(self.ws, job.id, file=job.record["original_name"], loss=loss)
        self.snapshot_wake.set()  # a snapshot may be due after this many files
        job.finish("done")
        # Its resume points and token cache served their purpose: the model is published.
        for product in (checkpoints.checkpoints_dir(job.run_dir), job.run_dir / "data"):
            shutil.rmtree(product, ignore_errors=True)
        self.events.emit("job_done", f"{job.record['original_name']}: trained; models/{job.id} is now the current model", job_id=job.id)

    # -- snapshots ------------------------------------------------------------------

    async def keep_snapshots(self) -> None:
        """Verify every snapshot once at start (in the background), then take scheduled ones when due."""
        try:
            async with self.snapshot_lock:
                await asyncio.to_thread(self.summarize_snapshots)
                for snap in await asyncio.to_thread(snapshots.list_snapshots, self.ws):
                    await self.verify_snapshot(snap.name)
        except WriteFailed as e:  # verify.json refused: those snapshots are verified again at the next start
            self.storage.failed(e)
        while True:
            try:
                await self.take_scheduled_snapshot()
            except WriteFailed as e:
                self.storage.failed(e)
                self.alert("snapshot_failed", f"scheduled snapshot not taken: {e.problem}")
            except Exception as e:  # a bug must not stop scheduling for good
                self.alert("snapshot_failed", f"scheduled snapshot failed: {type(e).__name__}: {e}")
            self.snapshot_wake.clear()
            await wait_event(self.snapshot_wake, SCHEDULE_CHECK_SECONDS)

    def scheduled_history(self) -> tuple[float, int]:
        """When the last scheduled snapshot was taken (or the daemon started), and files trained since."""
        scheduled = [s for s in snapshots.list_snapshots(self.ws) if s.kind == "scheduled"]
        since = max([s.created_at for s in scheduled], default=self.started_at)
        done = self.ws.queue("done")  # a file's ctime is when it was renamed into done/
        files = sum(1 for name in jobs.listing(self.ws, "done") if (done / name).lstat().st_ctime > since)
        return since, files

    async def take_scheduled_snapshot(self) -> None:
        if self.rolling_back or self.stopping:
            return
        since, files = await asyncio.to_thread(self.scheduled_history)
        why = schedule.snapshot_due(time.time(), since, files, self.config.snapshots)
        if why is not None:
            await self.take_snapshot("scheduled", reason={"daily": "daily", "interval": "scheduled",
                                                          "files": f"after {files} files"}[why])

    async def take_snapshot(self, kind: str, name: str | None = None, reason: str = "on demand") -> snapshots.Snapshot:
        async with self.snapshot_lock:
            snap = await asyncio.to_thread(snapshots.create, self.ws, kind, name, reserve=self.config.disk.reserve,
                                           include_optimizer=self.config.snapshots.include_optimizer)
            placed = snap.manifest.get("placement", {})
            self.events.emit("snapshot", f"snapshot {snap.name} ({reason}) of {snap.source.get('model_version') or 'the model'}: "
                             f"{placed.get('linked', 0)} files linked, {placed.get('copied', 0)} copied", name=snap.name)
            await self.verify_snapshot(snap.name)
            if kind == "scheduled":
                await asyncio.to_thread(self.apply_retention)
        return snapshots.get(self.ws, snap.name)

    async def verify_snapshot(self, name: str) -> dict[str, Any]:
        self.snapshot_summary["verifying"] = name
        result = await asyncio.to_thread(verification.verify, self.ws, name)
        if result["ok"]:
            self.events.emit("snapshot_verified", f"snapshot {name} verified ({result['seconds']:.1f}s)", name=name)
        else:
            self.alert("snapshot_corrupt", f"snapshot {name} is corrupt: {verification.describe_problems(result)}; "
                       "it will never be restored", name=name)
        await asyncio.to_thread(self.summarize_snapshots)
        return result

    def summarize_snapshots(self) -> None:
        snaps = snapshots.list_snapshots(self.ws)
        self.snapshot_summary = {
            "count": len(snaps), "newest": snaps[-1].name if snaps else None,
            "newest_verified": snapshots.newest_verified(snaps),
            "corrupt": [s.name for s in snaps if s.state == "corrupt"],
            "pending": [s.name for s in snaps if s.state == "pending"],
            "current_from": snapshots.current_source_snapshot(self.ws), "verifying": None}

    def apply_retention(self) -> None:
        """Runs in a thread under the snapshot lock: old scheduled snapshots, then unreferenced model versions."""
        snaps = snapshots.list_snapshots(self.ws)
        c = self.config.snapshots
        for name in retention.snapshots_to_remove(snaps, time.time(), c.keep_daily, c.keep_weekly):
            try:
                snapshots.remove(self.ws, name)
                self.events.emit("snapshot_removed", f"snapshot {name} removed by retention", name=name)
            except snapshots.SnapshotError as e:
                self.events.emit("snapshot_kept", f"snapshot {name} kept: {e}", "warning", name=name)
        in_use = {Path(self.attempt.spec.model_in).name} if self.attempt else set()
        if self.attempt and self.attempt.spec.adapter:
            in_use.add(Path(self.attempt.spec.adapter["base"]["path"]).name)
        current = snapshots.current_version(self.ws)
        kept = [*([self.ws.models / current] if current else []), *(s.path for s in snaps)]
        in_use |= bases.needed_versions(self.ws, kept)  # the bases their adapters were trained on
        for version in retention.versions_to_prune(snapshots.model_versions(self.ws), current,
                                                   snapshots.versions_in_snapshots(self.ws), in_use):
            snapshots.remove_version(self.ws, version)
            self.events.emit("version_pruned", f"model version {version} pruned (not current, in no snapshot)")
        self.summarize_snapshots()

    async def rollback(self, target: str) -> str:
        """Make a snapshot the current model; see engine/restore.py. Raises RollbackRefused or SnapshotError."""
        async with self.snapshot_lock:
            journal = await asyncio.to_thread(restore.begin, self.ws, target)
            self.rolling_back = True
            self.refresh()
            try:
                if self.attempt is not None:  # stop with a checkpoint; the file waits at the head of the queue
                    self.attempt.stop_requested = True
                    await self.attempt.send("stop")
                    await self.attempt.finished.wait()
                while self.job is not None:  # validation or a preflight wait finishing
                    await asyncio.sleep(0.05)
                await self.test_pause("rollback_started")
                pre = await asyncio.to_thread(restore.pre_snapshot, self.ws, journal, self.config.disk.reserve)
                await self.test_pause("rollback_pre_snapshot")
                await asyncio.to_thread(restore.verify_target, self.ws, journal)
                await self.test_pause("rollback_verified")
                version = await asyncio.to_thread(restore.restore, self.ws, journal, self.config.disk.reserve)
                await self.test_pause("rollback_restored")
                await asyncio.to_thread(restore.switch, self.ws, journal)
                await self.test_pause("rollback_switched")
                requeued = await asyncio.to_thread(restore.requeue, self.ws, journal)
            except BaseException:
                if restore.read_journal(self.ws) and journal.get("phase") != "switched":
                    restore.finish(self.ws)
                raise
            finally:
                self.rolling_back = False
                self.resume = [jobs.load(self.ws, j.id) for j in self.resume]  # records changed on disk
                await asyncio.to_thread(self.summarize_snapshots)
                self.refresh()
                self.wake.set()
        again = f"; {', '.join(requeued)} start again from step 0 on it" if requeued else ""
        message = f"rolled back to {target} (now models/{version}); the previous model is snapshot {pre.name}{again}"
        self.events.emit("rolled_back_model", message, "warning", name=target)
        return message

    async def test_pause(self, point: str) -> None:
        """Test-only: hold here so a test can kill the daemon at this point of a rollback."""
        if self.test_hooks.get("daemon", {}).get("pause_at") == point:
            atomic.write_json_atomic(self.ws.state / "test-paused.json", {"point": point})
            await asyncio.sleep(3600)

    # -- one attempt in a worker ------------------------------------------------

    async def keep_worker_warm(self) -> None:
        """While idle, keep one worker that has already imported torch waiting for the next file."""
        if self.worker is not None and not self.worker.alive:
            self.worker = None
        if (self.worker is None and self.config.jobs.warm_worker and not self.stopping and not self.held
                and time.monotonic() >= self.warm_retry_at):
            worker = self.worker = await WorkerProcess.spawn(self.ws, self.ws.idle_worker_log,
                                                             processes=self.config.training.processes)
            self.warm_task = asyncio.create_task(self.watch_warm(worker))
        elif self.held and self.worker is not None and self.worker.job_id is None:
            await self.worker.dismiss()  # stopped means the GPU is released: no worker holds it
            self.worker = None

    async def watch_warm(self, worker: WorkerProcess) -> None:
        if await worker.until_ready():
            self.write_status()
            return
        code = await worker.proc.wait()
        if not self.stopping and worker.job_id is None and not self.held:
            self.warm_retry_at = time.monotonic() + 60.0  # no tight loop of crashing starts
            self.alert("worker_start_failed", f"a worker died while starting ({describe_exit(code)}); "
                       f"see {self.ws.idle_worker_log}; next warm start in 60s")

    async def take_worker(self, log_path: Path) -> WorkerProcess:
        """The warm worker if it is alive, else a new one writing straight into the job's log."""
        worker = self.worker
        if worker is not None and self.warm_task is not None:
            await self.warm_task  # its ready event is read by then; the job's events follow
            self.warm_task = None
        if worker is not None and worker.alive and worker.processes != self.config.training.processes:
            await worker.dismiss()  # traind.toml changed the number of processes while it waited
        if worker is None or not worker.alive or worker.job_id is not None:
            worker = await WorkerProcess.spawn(self.ws, log_path, append=True, processes=self.config.training.processes)
        self.worker = worker
        return worker

    def job_training_config(self, job: jobs.Job) -> dict[str, Any]:
        training = self.config.to_dict()["training"]
        training.update(job.record.get("batch") or {})  # a smaller micro-batch after a CUDA OOM
        return training

    async def run_attempt(self, job: jobs.Job) -> tuple[str, dict[str, Any] | None]:
        model_in = models.current_source(self.ws)
        resume = checkpoints.newest_complete(job.run_dir)
        record = job.start_attempt(model_in=model_in, checkpoint_at_start=resume[0] if resume else None)
        self.events.emit("job_started", f"{job.record['original_name']}: training as {job.id}, attempt {record['n']}"
                         + (f", resuming from step {resume[0]}" if resume else ""), job_id=job.id, attempt=record["n"])
        log_path = job.run_dir / "worker.log"
        self.storage.append(log_path, f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} attempt {record['n']} ===\n".encode(),
                            sync=False)
        worker = await self.take_worker(log_path)
        oom = resources.OomCounter.for_pid(worker.pid)
        config = self.config.to_dict()
        spec = protocol.JobSpec(
            job_id=job.id, data_file=str(job.path_in("active")), format=job.record["format"], run_dir=str(job.run_dir),
            model_in=model_in, model_out=str(models.partial_dir(self.ws, job.id)), log_path=str(log_path),
            training=self.job_training_config(job), checkpoint=config["checkpoint"], guard=config["guard"],
            disk_reserve=self.config.disk.reserve, adapter=self.adapter_plan, rollback=job.record.get("pending_rollback"),
            test_hooks={k: v for k, v in self.test_hooks.items() if k != "daemon"})
        self.progress = Progress(job, record["n"], self.config.jobs.max_attempts)
        attempt = self.attempt = Attempt(job, worker, spec, self.progress, self.on_worker_event, self.storage)
        self.refresh()
        try:
            await worker.send_job(spec)
        except (BrokenPipeError, ConnectionResetError):
            pass  # it died while warm; its exit code tells why
        await attempt.run()
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
        code = attempt.exit_code
        killed_by_oom = oom.killed_by_oom() if code == -signal.SIGKILL else None
        newest = checkpoints.newest_complete(job.run_dir)
        before = job.record["attempts"][-1].get("checkpoint_at_start")
        progress = newest is not None and (before is None or newest[0] > before)  # a new complete checkpoint
        details: dict[str, Any] = {"exit": attempt.exit_text(killed_by_oom), "exit_code": code if code >= 0 else None,
                                   "signal": signal.Signals(-code).name if code < 0 else None, "step": attempt.step,
                                   "progress": progress}
        if code == protocol.EXIT_DONE and models.is_complete(models.partial_dir(self.ws, job.id)):
            return "done", details
        if attempt.skip_requested:
            return "skipped", details
        if attempt.changed:
            return "changed", {**details, "changed": attempt.changed}
        if self.stopping:  # asked to stop: whatever the exit, not the job's fault
            return "interrupted", details
        if attempt.stop_requested:
            return "stopped", details
        if code == protocol.EXIT_ROLLBACK and attempt.anomaly:
            return "rollback", {**details, "anomaly": attempt.anomaly}
        error = attempt.error or {}
        details.update(error=error.get("message"), log_tail=log_tail(job.run_dir / "worker.log"))
        if killed_by_oom:
            details["error"] = "killed by the OOM killer: the machine ran out of memory"
            kills = job.failures(jobs.OOM_KILLED) + (0 if progress else 1)
            self.alert("attempt_failed", f"{job.name}: attempt {len(job.record['attempts'])} killed by the OOM killer "
                       f"({kills}/{self.config.jobs.max_oom_kills} in a row without progress)", job_id=job.id)
            return jobs.OOM_KILLED, details
        if code == protocol.EXIT_INTERRUPTED or (code < 0 and progress):
            # Stopped from outside (a signal not sent by this daemon) after it made progress: an interruption.
            self.events.emit("job_interrupted", f"{job.name}: attempt {len(job.record['attempts'])} ended "
                             f"({details['exit']}) after saving progress; resuming from its checkpoint", "warning",
                             job_id=job.id)
            return "interrupted", details
        if code == protocol.EXIT_CUDA_OOM and self.config.training.auto_batch:
            training = self.job_training_config(job)
            if training["batch_size"] > 1:
                smaller = {"batch_size": training["batch_size"] // 2,
                           "gradient_accumulation_steps": training["gradient_accumulation_steps"] * 2}
                job.save(batch=smaller)
                self.alert("cuda_oom", f"{job.name}: CUDA out of memory at step {attempt.step}; retrying with micro-batch "
                           f"{smaller['batch_size']} x {smaller['gradient_accumulation_steps']} accumulation "
                           f"(same effective batch)", "warning", job_id=job.id)
                return "oom", details
        if code == protocol.EXIT_GPU_UNAVAILABLE:
            self.preflight_problem = error.get("message") or "GPU unavailable"
        if code == protocol.EXIT_MODEL_UNAVAILABLE:  # not the file's fault: it waits at the head of the queue
            self.preflight_problem = error.get("message") or "model unavailable"
            self.model_wait.unavailable(self.preflight_problem)
            self.alert("model_unavailable", f"{job.name}: {self.preflight_problem}; the file waits in queue/active/ "
                       f"(no failed attempt counted), the model is looked at again every "
                       f"{self.model_wait.recheck_seconds:g}s", "warning", job_id=job.id)
            return "model_unavailable", details
        failures = 0 if progress else job.failures() + 1
        detail = f": {details['error']}" if details.get("error") else ""
        count = (f"failure {failures}/{self.config.jobs.max_attempts} in a row without progress" if failures
                 else "it saved progress first, so it does not count")
        self.alert("attempt_failed", f"{job.name}: attempt {len(job.record['attempts'])} failed ({details['exit']}{detail}); "
                   f"{count}", job_id=job.id)
        return jobs.FAILED, details


def run(ws: Workspace, once: bool = False) -> int:
    config = ws.load_config()
    return asyncio.run(Daemon(ws, config, once).run())
