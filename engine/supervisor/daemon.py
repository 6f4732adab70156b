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

It owns the supervisor's state (engine/supervisor/state.py), and only its event
loop writes it. The parts own theirs and are reached through their verbs: the
intake (intake_task.py), the snapshot task (snapshot_task.py), the attempt in
hand (attempt.py), the worker processes (workers.py). What decides returns a
value the loop applies: how an attempt ended (outcomes.py), what start-up
recovered (recovery.py), the settings a saved traind.toml brings (reload.py).
Commands (commands.py) reach it through the port they declare.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
import traceback
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import watchfiles

from engine import __version__
from engine.api.control import ControlServer
from engine.api.status import SCHEMA, queue_counts
from engine.cluster import nodes
from engine.core import atomic, protocol, resources, testing
from engine.core.aio import until_woken
from engine.core.config import Config
from engine.core.console import console
from engine.core.gpu import GpuMonitor
from engine.ops.hooks import Hooks, config_notes
from engine.ops.metrics import Metrics, MetricsServer
from engine.data import prompts
from engine.quality import held, replay, suite
from engine.store import bases, checkpoints, jobs, models, restore, statefiles
from engine.store.eventlog import EventLog
from engine.store.lock import DaemonLock
from engine.store.storage import Storage
from engine.store.workspace import Workspace
from engine.supervisor import outcomes, preflight, recovery, reload
from engine.supervisor.attempt import Attempt, Progress
from engine.supervisor.commands import Commands
from engine.supervisor.intake_task import IntakeTask
from engine.supervisor.report import LoopReporter
from engine.supervisor.snapshot_task import SnapshotTask
from engine.supervisor.state import SupervisorState, derive
from engine.supervisor.workers import Workers

STATUS_INTERVAL = 1.0  # status.json (and the GPU, memory and disk samples in it) this often
PREFLIGHT_RECHECK_SECONDS = 2.0  # while blocked, how often the cause is looked at again
PROGRESS_INTERVAL = 5.0  # a progress line on the console this often while training


class Daemon:
    def __init__(self, ws: Workspace, config: Config, once: bool = False):
        self.ws = ws
        self.once = once
        self.state = SupervisorState(config, guard=bool(testing.get("thread_guard")))
        self.started_at = time.time()
        self.lock = DaemonLock(ws.lock_path, ws.root)
        self.storage = Storage(probe=self.write_status_now, on_clear=self.writes_work_again)
        self.events = EventLog(ws, self.storage)
        self.report = LoopReporter(self.events, self.state)
        self.hooks = Hooks(ws, config.hooks, context=self.hook_fields)  # a thread of its own: the log only enqueues
        self.metrics = Metrics(ws, sources=(self.hooks,))
        self.events.listeners += [self.metrics.on_event, self.hooks.on_event]
        self.metrics_server = MetricsServer(self.metrics)
        self.wake = asyncio.Event()  # the queue loop looks again: a file, a command, writing working again
        self.workers = Workers(ws, self.report, on_ready=self.write_status, wake=self.wake.set,
                               leaving=lambda: self.state.stopping or self.state.held)
        self.intake = IntakeTask(ws, lambda: self.state.config, self.report, self.storage, took=self.wake.set)
        self.snapshots = SnapshotTask(ws, self, self.report, self.storage, self.started_at,
                                      pause_at=testing.get("pause_at"))
        self.commands = Commands(self)
        self.gpu = GpuMonitor()
        self.nodes = nodes.Head(ws)  # the other machines, with [distributed] nodes > 1
        self.model_wait = preflight.ModelWait(testing.get("model_recheck_seconds", preflight.MODEL_RECHECK_SECONDS))
        # The loop's own bookkeeping, beside the state it shows.
        self.resources: dict[str, Any] = {}  # the last sample of GPU, memory and disk
        self.adapter_plan: dict[str, Any] | None = None  # the next attempt's spec.adapter (bases.plan)
        self.said_once: set[str] = set()  # warnings given once per daemon (warn_once)
        self.failures_in_a_row = 0
        self.reload_active = False  # after a refused write or an internal error, queue/active/ is read again
        self.internal_errors: dict[str, int] = {}  # job id -> internal errors in a row: past a limit the job fails

    # -- state and status ---------------------------------------------------

    def refresh(self) -> None:
        shown = derive(self.state, self.storage.problem)
        if shown != self.state.shown:
            self.state.shown, self.state.since = shown, time.time()
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
        self.report.emit("unblocked", f"writing works again (was: {problem}); going on{lost}")
        with self.storage.refusals():  # a promote or a requeue the refusal cut short is finished now
            for finished in held.settle(self.ws, self.state.config):
                self.report.emit("recovered", finished, "warning")
        self.refresh()
        self.wake.set()

    def status(self) -> dict[str, Any]:
        self.refresh()
        return self.status_document()

    def status_document(self) -> dict[str, Any]:
        s = self.state
        try:
            model = models.current(self.ws)
        except (FileNotFoundError, ValueError):
            model = None
        if model:
            model = {**model, "adapter": bases.current_summary(self.ws, model)}
        worker = self.workers.alive()
        return {"schema": SCHEMA, "updated_at": time.time(), "version": __version__,
                "daemon": {"pid": os.getpid(), "state": s.shown[0], "reason": s.shown[1],
                           "since": s.since, "started_at": self.started_at,
                           "worker_pid": worker.pid if worker else None,
                           "warm_worker": bool(worker and worker.ready and not worker.job_id)},
                "job": s.progress.snapshot() if s.progress else None,
                "queue": queue_counts(self.ws), "model": model, "last_error": s.last_error,
                "resources": self.resources, "snapshots": self.snapshots.summary,
                "metrics_url": self.metrics_server.url, "nodes": self.nodes.status(s.config.distributed)}

    def hook_fields(self, event: dict[str, Any]) -> dict[str, Any]:
        """What the daemon knows of an event's job beyond the event itself, for the hooks' {file}, {step}, {loss}."""
        job, progress = self.state.job, self.state.progress
        if job is None or event.get("job_id") != job.id:
            return {}
        fields: dict[str, Any] = {"file": job.record.get("original_name")}
        if progress is not None and progress.doc.get("id") == job.id:
            fields.update(step=progress.doc.get("step"), loss=progress.doc.get("loss"))
        return fields

    def sample_resources(self) -> dict[str, Any]:
        """GPU, memory and disk: run in a thread, since NVML can block for seconds on a lost GPU."""
        worker = self.workers.alive()
        pids = {worker.pid} if worker else set()
        disk = resources.disk_usage(self.ws.root)
        disk.update(reserve=self.state.config.disk.reserve,
                    last_checkpoint_bytes=preflight.last_checkpoint_bytes(self.ws, self.state.job))
        return {"gpu": self.gpu.sample(pids), "memory": resources.machine_memory(),
                "worker_rss": resources.process_group_rss(worker.pid) if worker else None, "disk": disk}

    # -- the verbs commands and the snapshot task use ----------------------------------

    def hold(self, held: bool) -> None:
        atomic.write_json_atomic(self.ws.daemon_record, {"held": held, "changed_at": time.time()})
        self.state.held = held
        self.refresh()
        self.wake.set()

    async def skip(self, job: jobs.Job) -> None:
        self.state.skip_job_id = job.id
        if (a := self.state.attempt) is not None:
            a.skip()
            await a.finished.wait()
        self.wake.set()

    def shutdown(self, why: str) -> None:
        s = self.state
        if s.stopping:
            return
        s.stopping = True
        self.report.emit("shutdown", f"{why}: shutting down")
        self.refresh()
        self.wake.set()
        if s.attempt is not None:
            s.attempt.terminate(s.config.jobs.stop_grace_seconds)

    @asynccontextmanager
    async def quiesce(self, why: str) -> AsyncIterator[None]:
        """The current model may change inside (a rollback, a promote): the attempt in hand is stopped with a
        checkpoint (its file waits at the head of the queue) and no job is in hand or starts until the end."""
        s = self.state
        s.changing_model = why
        self.refresh()
        try:
            while s.job is not None:  # an attempt ending, validation or a preflight wait finishing
                if (a := s.attempt) is not None and not a.stop_requested:
                    await a.stop()  # one that started while this waited too
                await asyncio.sleep(0.05)
            yield
        finally:
            s.changing_model = None
            s.resume = [jobs.load(self.ws, j.id) for j in s.resume]  # records changed on disk
            self.refresh()
            self.wake.set()

    def models_in_use(self) -> set[str]:
        a = self.state.attempt
        if a is None:
            return set()
        in_use = {Path(a.spec.model_in).name}
        if a.spec.adapter:
            in_use.add(Path(a.spec.adapter["base"]["path"]).name)
        return in_use

    # -- start-up -----------------------------------------------------------------

    def quarantined(self, path: Path, moved_to: Path | None, why: str) -> None:
        where = f"moved to state/quarantine/{moved_to.name}" if moved_to else "left in place (it could not be moved)"
        self.report.alert("quarantined", f"{self.ws.relative(path)}: {why}; {where}; rebuilt from the other files",
                          "warning", path=str(path))

    async def until_written(self, step: Callable[[], Any]) -> None:
        """Run a step of start-up until the disk lets it finish (blocked, answering `status`, meanwhile)."""
        while not self.state.stopping:
            with self.storage.refusals():
                result = step()
                return await result if asyncio.iscoroutine(result) else result
            self.refresh()
            await self.storage.until_clear(lambda: self.state.stopping)

    def recover(self) -> None:
        s = self.state
        s.held = recovery.recover(self.ws, s.config, self.report, self.nodes)
        self.take_back_active("left active by a previous daemon")
        self.intake.recover()

    def serve_metrics(self) -> None:
        """/metrics where [metrics] listen says; an address that cannot be had is a warning, never fatal."""
        listen = self.state.config.metrics.listen
        if listen == "off":
            return
        try:
            url = self.metrics_server.start(listen)
        except (OSError, OverflowError, ValueError) as e:  # in use, not this machine's, a port past 65535
            self.report.alert("metrics_failed", f"metrics: cannot listen on {listen}: {e}; no /metrics until "
                              "[metrics] listen is changed", "warning")
            return
        self.report.emit("metrics_serving", f"metrics: Prometheus endpoint at {url}", url=url)

    async def reload_config(self) -> None:
        """traind.toml saved: the new settings applied (most from the next attempt, some at once)."""
        s = self.state
        new = reload.changed(self.ws, s.config, self.report)
        if new is None:
            return
        old, s.config = s.config, new
        reload.announce(self.ws, old, new, self.report)  # and a warning for an edit that acts on nothing live
        if new.metrics != old.metrics:
            self.metrics_server.stop()
            self.serve_metrics()
        if new.hooks != old.hooks:
            self.hooks.configure(new.hooks)
            reload.note_hooks(self.report, config_notes(new.hooks))
        if new.disk.reserve != old.disk.reserve and s.attempt is not None:
            await s.attempt.send("set_disk_reserve", bytes=new.disk.reserve)

    # -- the main loop --------------------------------------------------------

    async def run(self) -> int:
        # A stop signal from the moment the lock is ours is a shutdown, not a death: until the daemon has
        # started writing (its PID, folders, socket), it is only noted, then acted on.
        s = self.state
        loop, early = asyncio.get_running_loop(), []
        self.report.attach(loop)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, early.append, signal.Signals(sig).name)
        self.lock.acquire(write_pid=False)  # the PID is written below, when the disk allows
        statefiles.set_quarantine(self.ws.root, self.quarantined)
        try:
            self.storage.soft("lock_pid", self.lock.write_pid)
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.shutdown, signal.Signals(sig).name)
            await self.until_written(self.ws.create_folders)
            self.workers.start_fork_server(s.config)
            control = ControlServer(self.ws.control_socket, self.commands.handle)
            await self.until_written(control.start)
            self.serve_metrics()
            self.report.emit("daemon_started", f"daemon started (PID {os.getpid()}) on {self.ws.root}"
                             + (f"; CPU mode: {self.gpu.reason}" if self.gpu.mode == "cpu"
                                else f"; {len(self.gpu.sample(set())['devices'])} GPU(s)"))
            reload.note_hooks(self.report, config_notes(s.config.hooks))
            for why in early[:1]:  # a signal that came before the daemon could write: acted on now it can
                self.shutdown(why)
            stop_watching = asyncio.Event()
            tasks = [asyncio.create_task(self.heartbeat())]
            try:
                await self.until_written(self.recover)
                s.starting = False
                if s.held:
                    self.report.emit("held", "the queue is stopped (by 'traind stop'); 'traind start' resumes it")
                tasks += [asyncio.create_task(self.watch_files(stop_watching)),
                          asyncio.create_task(self.snapshots.run()), asyncio.create_task(self.intake.run())]
                await self.serve()
            finally:
                stop_watching.set()
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                await control.close()
                self.metrics_server.stop()
                await self.workers.close()
                s.progress = s.job = s.attempt = None
                s.stopping = False
                s.shown = ("offline", None)
                self.write_status()
                self.gpu.close()
                self.report.emit("daemon_stopped", "daemon stopped"
                                 + (f"; {len(self.storage.backlog)} log lines the disk refused are lost"
                                    if not self.storage.flush() else ""))
        finally:
            self.hooks.close()  # at most one hook timeout; a hook still running then is killed
            statefiles.set_quarantine(self.ws.root, None)
            self.lock.release()
        return 0

    async def serve(self) -> None:
        s = self.state
        while not s.stopping:
            self.refresh()
            if self.storage.problem:  # the queue holds until writing works again
                await self.storage.until_clear(lambda: s.stopping)
                continue
            job = None
            try:
                with self.storage.refusals() as refused:
                    await self.workers.keep_warm(s.config, s.held, s.stopping)
                    job = None if s.held or s.changing_model else self.next_job()
                    if job is None:
                        if self.once and not s.held and self.queue_empty():
                            return
                        await self.sleep(0.5)  # a watch event or a command wakes us at once; the timeout re-checks settling files
                        continue
                    await self.run_job(job)
                    self.failures_in_a_row = 0
                    self.internal_errors.pop(job.id, None)
                if refused:  # a write that matters was refused: blocked, then the queue is taken back
                    self.reload_active = True
                    self.intake.reload()
            except Exception as e:  # a bug or the system (permissions), never the input: keep going
                await self.internal_error(job, e)
            finally:
                s.job = s.progress = s.attempt = None
                s.preflight_problem = None

    async def internal_error(self, job: jobs.Job | None, e: Exception) -> None:
        """Back off and take the active file back; the same job failing this way again and again fails it."""
        self.failures_in_a_row += 1
        self.reload_active = True
        pause = min(60.0, 2.0 ** self.failures_in_a_row)
        console(traceback.format_exc().rstrip(), "error", "internal_error")
        what = f"{job.name}: " if job else ""
        self.report.alert("internal_error", f"{what}{type(e).__name__}: {e}; trying again in {pause:.0f}s",
                          **({"job_id": job.id} if job else {}))
        if job is not None:
            errors = self.internal_errors[job.id] = self.internal_errors.get(job.id, 0) + 1
            if errors >= self.state.config.jobs.max_attempts and job.location == "active":
                self.internal_errors.pop(job.id)
                try:
                    dst = job.finish("failed", {"reason": f"internal error {errors} times in a row: {type(e).__name__}: {e}"})
                    self.report.alert("job_failed", f"{job.record['original_name']}: internal error {errors} times "
                                      f"in a row ({type(e).__name__}: {e}); moved to queue/failed/{dst.name}",
                                      job_id=job.id)
                except OSError as failed:
                    self.report.alert("internal_error", f"{job.name}: could not be moved to queue/failed/: {failed}")
        await asyncio.sleep(pause)

    async def sleep(self, seconds: float) -> None:
        await until_woken(self.wake, seconds)

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
            progress = self.state.progress
            if progress is not None and progress.doc["phase"] == "training" and now - last_print >= PROGRESS_INTERVAL:
                last_print = now
                self.print_progress(progress)

    def watch_claimed_file(self) -> None:
        """Once a second while training: a file appended to, rewritten or removed ends its attempt at once."""
        a = self.state.attempt
        if a is not None and a.file_changed is None and a.exit_code is None:
            if (why := jobs.changed_since_claim(a.job)) is not None:
                a.changed(why)

    @staticmethod
    def print_progress(progress: Progress) -> None:
        d = progress.snapshot()
        loss = "-" if d["loss"] is None else f"{d['loss']:.4f}"
        rate = "-" if d["tokens_per_s"] is None else f"{d['tokens_per_s']:,.0f}"
        eta = "-" if d["eta_s"] is None else f"{d['eta_s']:.0f}s"
        console(f"{d['id']}: step {d['step']}/{d['total_steps']} ({d['percent'] or 0:.0f}%) "
                f"loss {loss} · {rate} tok/s · ETA {eta}", kind="progress")

    # -- the queue ---------------------------------------------------------------

    def queue_empty(self) -> bool:
        """Nothing active, pending, being validated or waiting in the inbox (for --once)."""
        return not (self.state.resume or self.intake.has_work())

    def next_job(self) -> jobs.Job | None:
        if self.reload_active:
            self.reload_active = False
            self.take_back_active("taken back after an interruption")
        if self.state.resume:
            return self.state.resume.pop(0)
        return self.intake.next_validated()

    def take_back_active(self, why: str) -> None:
        """What queue/active/ holds, made whole and queued again: at start, and after a refused write."""
        resume = []
        for job, ended in jobs.take_back(self.ws, "active"):
            if ended:
                self.report.emit("recovered", f"{job.name}: finished moving to queue/{job.state}/", "warning")
            elif recovery.model_saved(self.ws, job):
                self.publish(job)
            else:
                if job.record["attempts"] and "outcome" not in job.record["attempts"][-1]:
                    job.end_attempt("interrupted", exit="the daemon stopped while it ran")
                step = checkpoints.newest_complete(job.run_dir)
                where = f"from its checkpoint at step {step[0]}" if step else "from the start"
                self.report.emit("recovered", f"{job.name}: {why}; resuming {where}", "warning")
                resume.append(job)
        self.state.resume = resume

    def publish(self, job: jobs.Job) -> None:
        """A job's worker saved its model: it becomes a version (current, or held by the gate)."""
        if job.record["attempts"] and "outcome" not in job.record["attempts"][-1]:  # the daemon died before it said
            job.end_attempt("done", exit="the worker saved the model; the daemon stopped before it recorded the end")
        progress = self.state.progress
        loss = progress.doc["loss"] if progress else None
        ended = outcomes.finish_done(self.ws, self.state.config, job, loss, self.report)
        if ended == "changed":
            return
        self.snapshots.file_done()  # a snapshot may be due after this many files
        if ended == "done":
            self.write_status()  # what announces the new model (a scrape, a hook reading status.json) sees it already
            outcomes.announce_done(job, self.report)

    async def run_job(self, job: jobs.Job) -> None:
        s = self.state
        s.job = job
        if job.state == "training" and recovery.model_saved(self.ws, job):  # trained; publishing it was cut short
            self.publish(job)
            return
        if job.state in ("queued", "validating") and not job.record.get("validated_at"):  # rebuilt, or cut short
            job.save(state="validating")
            s.progress = Progress(job, 0, s.config.jobs.max_attempts, phase="validating")
            self.refresh()
            report = await asyncio.to_thread(self.intake.validate, job)
            if report is None:
                return
            self.intake.record_valid(job, report)
        while not s.stopping:
            if s.skip_job_id == job.id:
                self.skipped(job)
                return
            if (why := outcomes.given_up(s.config, job)) is not None:
                outcomes.fail(job, why, self.report)
                return
            if (no_model := recovery.check_current_model(self.ws, s.config, self.report)) is not None:
                dst = job.finish("failed", {"reason": no_model})
                self.report.alert("job_failed", f"{job.record['original_name']}: {no_model}; moved to "
                                  f"queue/failed/{dst.name}", job_id=job.id)
                return
            if s.held or s.changing_model:
                s.resume.insert(0, job)
                return
            if (why := jobs.changed_since_claim(job)) is not None:
                outcomes.fail_changed(job, why, self.report)
                return
            # The job line shows from here: the preflight and a worker's start take seconds.
            s.progress = Progress(job, len(job.record["attempts"]) + 1, s.config.jobs.max_attempts)
            if not await self.preflight(job):
                continue
            outcome, anomaly = await self.run_attempt(job)
            if outcome == "changed":
                outcomes.fail_changed(job, job.record["attempts"][-1]["changed"], self.report)
                return
            if outcome == "done":
                self.publish(job)
                return
            if outcome == "skipped":
                self.skipped(job)
                return
            if outcome == "stopped":
                s.resume.insert(0, job)
                return
            if outcome == "interrupted" and s.stopping:
                self.report.emit("job_interrupted", f"{job.name}: stopped with a checkpoint; it resumes when the "
                                 "daemon starts again", job_id=job.id)
                return
            if outcome == "rollback" and not outcomes.plan_rollback(s.config, job, anomaly, self.report):
                return

    def skipped(self, job: jobs.Job) -> None:
        """'traind skip' is done: the job moves to queue/failed/ at the step it reached."""
        s = self.state
        s.skip_job_id = None
        outcomes.skip(job, s.progress.doc["step"] if s.progress else None, self.report)

    async def preflight(self, job: jobs.Job) -> bool:
        """Disk and GPU checks before an attempt; while one fails the daemon is `blocked` and re-checks."""
        s = self.state
        problem, self.adapter_plan = await asyncio.to_thread(self.preflight_problems, job)
        if problem is None:
            if s.preflight_problem:
                self.report.emit("unblocked", f"{job.name}: {s.preflight_problem.split(':')[0]} preflight passes "
                                 "again; starting")
            s.preflight_problem = None
            return True
        if problem != s.preflight_problem:
            s.preflight_problem = problem
            self.report.alert("blocked", f"{job.name}: not started: {problem}; waiting for it to clear", "warning",
                              job_id=job.id)
        self.refresh()
        await self.sleep(PREFLIGHT_RECHECK_SECONDS)
        return False

    def preflight_problems(self, job: jobs.Job) -> tuple[str | None, dict[str, Any] | None]:
        """In a thread: why the attempt cannot start yet (None: it can), and its adapter plan."""
        config = self.state.config
        worker = self.workers.alive()
        warm = {worker.pid} if worker else set()
        if problem := self.model_wait.problem(self.ws) or self.nodes.problem(config.distributed):
            return problem, self.adapter_plan
        plan, problem = bases.plan(self.ws, config.adapter)
        return (problem or preflight.disk_problem(self.ws, job, config.disk.reserve, plan)
                or self.gpu.preflight(config.gpu.min_free_memory, warm)
                or preflight.gpu_memory_problem(preflight.current_source(self.ws),
                                                outcomes.training_settings(config, job),
                                                config.to_dict().get("adapter"), self.gpu.sample(warm),
                                                config.sharding_plan(), config.distributed.nodes)), plan

    def start_on_this_chain(self, job: jobs.Job, model_in: str) -> None:
        """A job's checkpoints belong to what it was training (whole model, or this adapter on this base) from
        which model: if any changed since its last attempt (a promote), they cannot be resumed: it starts again."""
        if restore.start_over_if_changed(job, bases.trains(self.adapter_plan, model_in)):
            self.report.alert("restarted", f"{job.name}: the current model, [adapter] or its base changed since "
                              "its last attempt: it starts again from step 0 (its checkpoints are kept aside)",
                              "warning", job_id=job.id)

    # -- one attempt in a worker ------------------------------------------------

    async def run_attempt(self, job: jobs.Job) -> tuple[str, dict[str, Any] | None]:
        s = self.state
        config = s.config
        model_in = models.current_source(self.ws)
        self.start_on_this_chain(job, model_in)
        resume = checkpoints.newest_complete(job.run_dir)
        record = job.start_attempt(model_in=model_in, checkpoint_at_start=resume[0] if resume else None)
        self.report.emit("job_started", f"{job.record['original_name']}: training as {job.id}, attempt {record['n']}"
                         + (f", resuming from step {resume[0]}" if resume else ""), job_id=job.id,
                         attempt=record["n"])
        log_path = job.run_dir / "worker.log"
        self.storage.append(log_path, f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} attempt {record['n']} ===\n".encode(),
                            sync=False)
        launch = self.nodes.begin(config.distributed, config.training.processes, job.id, record["n"])
        worker = await self.workers.take(log_path, launch, config.training.processes)
        oom = resources.OomCounter.for_pid(worker.pid)
        evaluation, left_out = await asyncio.to_thread(suite.job_spec, self.ws, config, job.id)
        self.warn_once("eval_source_invalid", left_out)
        answers, bad_prompts = await asyncio.to_thread(prompts.plan, self.ws.root, config.samples)
        self.warn_once("prompt_invalid", bad_prompts)
        settings = config.to_dict()
        spec = protocol.JobSpec(
            job_id=job.id, data_file=str(job.path_in("active")), format=job.record["format"], run_dir=str(job.run_dir),
            model_in=model_in, model_out=str(models.partial_dir(self.ws, job.id)), log_path=str(log_path),
            training=outcomes.training_settings(config, job), checkpoint=settings["checkpoint"],
            guard=settings["guard"], disk_reserve=config.disk.reserve, adapter=self.adapter_plan,
            chain_steps=models.chain_steps(model_in), rollback=job.record.get("pending_rollback"),
            eval=evaluation, replay=replay.plan(self.ws, config, job), skip_lines=job.record.get("skipped_lines") or [],
            sharding=config.sharding_plan(), samples=answers,
            test_hooks=testing.get("worker", {}))
        attempt = s.attempt = Attempt(job, worker, spec, s.progress, self.on_worker_event, self.storage, self.report)
        self.refresh()
        try:
            await worker.send_job(spec)
        except (BrokenPipeError, ConnectionResetError):
            pass  # it died while warm; its exit code tells why
        await self.nodes.during(attempt)
        self.workers.release()
        ended = outcomes.classify(self.ws, s.config, job, attempt, oom, s.stopping, self.report,
                                  self.model_wait.recheck_seconds)
        if ended.blocked is not None:  # the machine's, not the job's: the next attempt waits for it to clear
            s.preflight_problem = ended.blocked
            if ended.outcome == "model_unavailable":
                self.model_wait.unavailable(ended.blocked)
        self.metrics.attempt_ended(ended.outcome, attempt.anomaly)
        job.end_attempt(ended.outcome, **ended.details)
        s.attempt = None
        self.refresh()
        return ended.outcome, attempt.anomaly

    def warn_once(self, kind: str, problems: list[str]) -> None:
        """A warning for each problem this daemon has not said yet (a file in eval/ or a prompt line left out)."""
        for problem in problems:
            if problem not in self.said_once:
                self.said_once.add(problem)
                self.report.alert(kind, problem, "warning")

    def on_worker_event(self, event: dict[str, Any]) -> None:
        kind, job = event["event"], self.state.job
        if kind == "blocked":
            self.report.alert("blocked", f"{job.name}: {event['reason']}; training holds until there is room",
                              "warning", job_id=job.id)
        elif kind == "unblocked":
            self.report.emit("unblocked", f"{job.name}: enough free space again; training goes on", job_id=job.id)
        elif kind == "job_start" and event.get("skipped"):
            first, last = event["skipped"]
            self.report.emit("rolled_back", f"{job.name}: resumed from step {event.get('rolled_back_from', 0)}, "
                             f"batches of steps {first}-{last} skipped", job_id=job.id)
            job.save(pending_rollback=None)
        self.refresh()


def run(ws: Workspace, once: bool = False) -> int:
    config, started = ws.load_config(), time.time()
    code = asyncio.run(Daemon(ws, config, once).run())
    return outcomes.once_result(ws, started, code) if once else code
