"""What each control command does to a running daemon, and the sentence it answers with.

Commands act through the daemon's attempt (pause, resume, checkpoint, stop and
skip reach the worker at a step boundary) or its queue (stop holds it, start
releases it). A worker held for want of disk space (`blocked`) acts on nothing
until there is room, so pause, resume and checkpoint never wait for it: they
answer at once with what it will do when writing works again. A command that
cannot apply now is refused with the reason, and every command but the queries
is recorded in state/events.jsonl with its outcome, at level info even when
refused: a refusal is the reply to whoever sent the command, not an alert for
the hooks. What went wrong in the daemon itself (a corrupt snapshot, a write
that failed) is alerted by the part that owns it.
A handler gets only requests engine/api/control.py has checked against the command's
fields (FIELDS), so it never sees a field of the wrong type.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

from engine.api.control import reply
from engine.quality import held
from engine.store import checkpoints, restore, snapshots, verification
from engine.store.eventlog import Reporter
from engine.store.jobs import Job
from engine.store.storage import Storage
from engine.store.workspace import Workspace
from engine.supervisor.snapshot_task import SnapshotTask
from engine.supervisor.state import SupervisorState


class Supervisor(Protocol):
    """What a command may ask of the daemon (engine/supervisor/daemon.py): read its state, and the verbs."""

    ws: Workspace
    state: SupervisorState  # read only: the daemon writes it
    snapshots: SnapshotTask  # its requests: take, remove, verify, roll back, promote
    storage: Storage
    report: Reporter

    def status(self) -> dict[str, Any]:
        """The status document, the state brought up to date first."""

    def refresh(self) -> None: ...

    def hold(self, held: bool) -> None:
        """Stop (hold the queue, across restarts) or start it again."""

    async def skip(self, job: Job) -> None:
        """Drop the job: its attempt, if one runs, is killed and waited for; it moves to queue/failed/."""

    def shutdown(self, why: str) -> None: ...


PAUSE_TIMEOUT = 30.0  # a step longer than this: the reply says the pause is requested, not done
CHECKPOINT_TIMEOUT = 60.0  # a save longer than this: the reply says it is under way (well within a client's wait)

Outcome = tuple[bool, str, dict[str, Any]]
QUERIES = ("status", "snapshots")  # polled by clients: they would drown the log
OWN_EVENT = ("snapshot", "rollback", "promote", "requeue")  # done, each logs its own event: no echo of it


class Commands:
    def __init__(self, supervisor: Supervisor):
        self.d = supervisor

    async def handle(self, cmd: str, request: dict[str, Any], peer_pid: int | None) -> dict[str, Any]:
        s = self.d.state
        if s.starting and cmd != "status":
            return reply(False, cmd, f"the daemon is starting (it is {s.shown[0]}: "
                         f"{s.shown[1] or 'recovering the workspace'}); try again in a moment")
        with self.d.storage.refusals() as refused:
            ok, message, extra = await getattr(self, f"do_{cmd}")(request)
        if refused:  # the daemon is blocked until writing works again; the command is not done
            self.d.refresh()
            ok, message, extra = False, f"not done: {refused.problem}; the daemon holds until writing works again", {}
        if cmd not in QUERIES and not (ok and cmd in OWN_EVENT):
            self.d.report.emit("command", f"{cmd}: {message}", command=cmd, ok=ok, peer_pid=peer_pid)
        return reply(ok, cmd, message, **extra)

    def _not_training(self) -> Outcome:
        return False, f"nothing is training (the daemon is {self.d.state.shown[0]})", {}

    async def do_status(self, request: dict[str, Any]) -> Outcome:
        doc = self.d.status()
        return True, doc["daemon"]["state"], {"status": doc}

    async def do_pause(self, request: dict[str, Any]) -> Outcome:
        """Pause; with `toggle`, resume instead when paused or a pause is on its way (the UI's key: what it
        does follows what was last asked, not what a screen drew before the answer came)."""
        a = self.d.state.attempt
        if a is None:
            return self._not_training()
        if a.pause_wanted:
            if request.get("toggle"):
                return await self.do_resume(request)
            return False, (f"already paused at step {a.step}" if a.paused
                           else "a pause is already asked: the worker holds at the end of the current step"), {}
        a.want_pause(True)
        if not await a.send("pause"):
            a.want_pause(False)
            return False, "the worker has gone", {}
        # A resume that came meanwhile withdrew the pause (checked with no await before the wait begins).
        event = await a.wait_for(("paused", "blocked"), PAUSE_TIMEOUT) if a.pause_wanted and not a.blocked else None
        if a.blocked:
            return True, (f"blocked: {a.blocked}; training holds there now and pauses when writing works again "
                          "('traind resume' continues)"), {"did": "pause"}
        if event is not None:
            return True, f"paused at step {event['step']}; the model stays in memory ('traind resume' continues)", \
                {"step": event["step"], "did": "pause"}
        if a.exit_code is not None:
            return False, "the worker exited before it could pause", {}
        if not a.pause_wanted:
            return True, f"pause withdrawn by a resume before the worker held (step {a.step})", {"did": "pause"}
        return True, "pause requested: the worker holds at the end of the current step", {"did": "pause"}

    async def do_resume(self, request: dict[str, Any]) -> Outcome:
        a = self.d.state.attempt
        if a is None or not a.pause_wanted:
            return False, f"not paused (the daemon is {self.d.state.shown[0]})", {}
        a.want_pause(False)
        await a.send("resume")
        if not a.paused:  # the worker had not held yet: it goes on without holding
            return True, f"resumed: the pause asked before is withdrawn (step {a.step})", \
                {"step": a.step, "did": "resume"}
        event = None if a.blocked else await a.wait_for(("resumed", "blocked"), PAUSE_TIMEOUT)
        if a.blocked:
            return True, f"blocked: {a.blocked}; training resumes when writing works again", {"did": "resume"}
        step = event["step"] if event else a.step
        return True, f"resumed at step {step}", {"step": step, "did": "resume"}

    async def do_checkpoint(self, request: dict[str, Any]) -> Outcome:
        a = self.d.state.attempt
        if a is None:
            return self._not_training()
        if not await a.send("checkpoint"):
            return False, "the worker has gone", {}
        # A worker held for disk space saves nothing until there is room: the answer says so now, not then.
        event = None if a.blocked else await a.wait_for(("checkpoint", "blocked"), CHECKPOINT_TIMEOUT)
        if a.blocked:
            return True, f"blocked: {a.blocked}; the checkpoint will be saved when writing works again", {}
        if event is None:
            return (False, "the worker exited before saving", {}) if a.exit_code is not None else \
                (True, "checkpoint requested: it is saved at the end of the current step", {})
        return True, f"checkpoint saved at step {event['step']}", {"step": event["step"], "path": event["path"]}

    async def do_stop(self, request: dict[str, Any]) -> Outcome:
        s = self.d.state
        if s.held:
            return False, "already stopped ('traind start' resumes)", {}
        a = s.attempt
        self.d.hold(True)
        if a is None:
            what = f"; {s.job.name} waits in queue/active/" if s.job else ""
            return True, f"stopped: the queue is held{what}; 'traind start' resumes", {}
        await a.stop(grace=s.config.jobs.stop_grace_seconds)
        await a.finished.wait()
        newest = checkpoints.newest_complete(a.job.run_dir)
        saved = f"checkpoint at step {newest[0]}" if newest else "no checkpoint yet"
        return True, (f"stopped {a.job.name} at step {a.step} ({saved}); the worker exited and released the GPU; "
                      "'traind start' resumes"), {"step": a.step}

    async def do_start(self, request: dict[str, Any]) -> Outcome:
        s = self.d.state
        if not s.held:
            return False, f"not stopped (the daemon is {s.shown[0]})", {}
        self.d.hold(False)
        nxt = f"; resuming {s.resume[0].name}" if s.resume else ""
        return True, f"started: the queue goes on{nxt}", {}

    async def do_skip(self, request: dict[str, Any]) -> Outcome:
        s = self.d.state
        job = s.job or (s.resume[0] if s.resume else None)
        if job is None:
            return False, "no file is active", {}
        if s.attempt is None and s.job is not None and job.state == "validating":
            return False, f"{job.name} is being validated; skip it once it trains", {}
        await self.d.skip(job)
        return True, f"skipped {job.record['original_name']} ({job.name}): it moves to queue/failed/ with reason 'skipped by user'", {}

    async def do_shutdown(self, request: dict[str, Any]) -> Outcome:
        self.d.shutdown("shutdown requested on the control socket")
        return True, "shutting down: the worker checkpoints, then the daemon exits", {}

    async def do_snapshot(self, request: dict[str, Any]) -> Outcome:
        try:
            snap = await self.d.snapshots.take("manual", request.get("name"))
        except snapshots.SnapshotError as e:
            return False, str(e), {}
        state = "verified" if snap.state == "ok" else f"CORRUPT: {verification.describe_problems(snap.verification)}"
        return snap.state == "ok", f"snapshot {snap.name} taken and {state}", {"snapshot": snap.to_json()}

    async def do_remove_snapshot(self, request: dict[str, Any]) -> Outcome:
        name = request.get("name")
        try:
            await self.d.snapshots.remove(name)
        except snapshots.SnapshotError as e:
            return False, str(e), {}
        return True, f"snapshot {name} removed", {}

    async def do_snapshots(self, request: dict[str, Any]) -> Outcome:
        listed = await self.d.snapshots.listing(verify=bool(request.get("verify")))
        return True, f"{len(listed)} snapshot(s)", {"snapshots": [s.to_json() for s in listed]}

    async def do_verify(self, request: dict[str, Any]) -> Outcome:
        name = request.get("name")
        try:
            results = await self.d.snapshots.verify([name] if name is not None else None)
        except snapshots.SnapshotError as e:
            return False, str(e), {}
        bad = [n for n, r in results.items() if not r["ok"]]
        if bad:
            return False, "; ".join(f"{n}: {verification.describe_problems(results[n])}" for n in bad), {"results": results}
        return True, f"{len(results)} snapshot(s) verified ok", {"results": results}

    async def do_promote(self, request: dict[str, Any]) -> Outcome:
        if self.d.state.changing_model:
            return False, "promote refused: the current model is being changed; try again when it is done", {}
        try:
            return True, await self.d.snapshots.promote(request["job"], bool(request.get("force"))), {}
        except held.HeldError as e:
            return False, f"promote refused: {e}", {}

    async def do_requeue(self, request: dict[str, Any]) -> Outcome:
        try:
            message = await asyncio.to_thread(held.requeue, self.d.ws, request["job"])
        except held.HeldError as e:
            return False, f"requeue refused: {e}", {}
        self.d.report.emit("requeued", message, job_id=request["job"])
        return True, message, {}

    async def do_rollback(self, request: dict[str, Any]) -> Outcome:
        if self.d.state.changing_model == "rollback":
            return False, "a rollback is already under way", {}
        try:
            return True, await self.d.snapshots.rollback(request["name"]), {}
        except (restore.RollbackRefused, snapshots.SnapshotError) as e:
            return False, f"rollback refused: {e}", {}
