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
from typing import TYPE_CHECKING, Any

from engine.quality import held
from engine.store import checkpoints, restore, snapshots, verification
from engine.core.atomic import WriteFailed
from engine.supervisor.attempt import stop_and_wait
from engine.api.control import reply

if TYPE_CHECKING:
    from engine.supervisor.daemon import Daemon

PAUSE_TIMEOUT = 30.0  # a step longer than this: the reply says the pause is requested, not done
CHECKPOINT_TIMEOUT = 60.0  # a save longer than this: the reply says it is under way (well within a client's wait)

Outcome = tuple[bool, str, dict[str, Any]]
QUERIES = ("status", "snapshots")  # polled by clients: they would drown the log
OWN_EVENT = ("snapshot", "rollback", "promote", "requeue")  # done, each logs its own event: no echo of it


class Commands:
    def __init__(self, daemon: "Daemon"):
        self.d = daemon

    async def handle(self, cmd: str, request: dict[str, Any], peer_pid: int | None) -> dict[str, Any]:
        if self.d.starting and cmd != "status":
            return reply(False, cmd, f"the daemon is starting (it is {self.d.state}: "
                         f"{self.d.reason or 'recovering the workspace'}); try again in a moment")
        try:
            ok, message, extra = await getattr(self, f"do_{cmd}")(request)
        except WriteFailed as e:  # the daemon is blocked until writing works again; the command is not done
            self.d.storage.failed(e)
            self.d.refresh()
            ok, message, extra = False, f"not done: {e.problem}; the daemon holds until writing works again", {}
        if cmd not in QUERIES and not (ok and cmd in OWN_EVENT):
            self.d.events.emit("command", f"{cmd}: {message}", command=cmd, ok=ok, peer_pid=peer_pid)
        return reply(ok, cmd, message, **extra)

    def _not_training(self) -> Outcome:
        return False, f"nothing is training (the daemon is {self.d.state})", {}

    async def do_status(self, request: dict[str, Any]) -> Outcome:
        self.d.refresh()
        return True, self.d.state, {"status": self.d.status_document()}

    async def do_pause(self, request: dict[str, Any]) -> Outcome:
        """Pause; with `toggle`, resume instead when paused or a pause is on its way (the UI's key: what it
        does follows what was last asked, not what a screen drew before the answer came)."""
        a = self.d.attempt
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
        a = self.d.attempt
        if a is None or not a.pause_wanted:
            return False, f"not paused (the daemon is {self.d.state})", {}
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
        a = self.d.attempt
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
        d = self.d
        if d.held:
            return False, "already stopped ('traind start' resumes)", {}
        a = d.attempt
        d.set_held(True)
        if a is None:
            what = f"; {d.job.name} waits in queue/active/" if d.job else ""
            return True, f"stopped: the queue is held{what}; 'traind start' resumes", {}
        a.stop_requested = True
        await a.send("stop")
        asyncio.get_running_loop().call_later(d.config.jobs.stop_grace_seconds, d.kill_after_grace, a.worker)
        await a.finished.wait()
        newest = checkpoints.newest_complete(a.job.run_dir)
        saved = f"checkpoint at step {newest[0]}" if newest else "no checkpoint yet"
        return True, (f"stopped {a.job.name} at step {a.step} ({saved}); the worker exited and released the GPU; "
                      "'traind start' resumes"), {"step": a.step}

    async def do_start(self, request: dict[str, Any]) -> Outcome:
        d = self.d
        if not d.held:
            return False, f"not stopped (the daemon is {d.state})", {}
        d.set_held(False)
        nxt = f"; resuming {d.resume[0].name}" if d.resume else ""
        return True, f"started: the queue goes on{nxt}", {}

    async def do_skip(self, request: dict[str, Any]) -> Outcome:
        d = self.d
        job = d.job or (d.resume[0] if d.resume else None)
        if job is None:
            return False, "no file is active", {}
        if d.attempt is None and d.job is not None and job.state == "validating":
            return False, f"{job.name} is being validated; skip it once it trains", {}
        d.skip_job_id = job.id
        if d.attempt is not None:
            d.attempt.skip_requested = True
            d.attempt.kill()
            await d.attempt.finished.wait()
        d.wake.set()
        return True, f"skipped {job.record['original_name']} ({job.name}): it moves to queue/failed/ with reason 'skipped by user'", {}

    async def do_shutdown(self, request: dict[str, Any]) -> Outcome:
        self.d.request_shutdown("shutdown requested on the control socket")
        return True, "shutting down: the worker checkpoints, then the daemon exits", {}

    async def do_snapshot(self, request: dict[str, Any]) -> Outcome:
        try:
            snap = await self.d.snapshot_task.take("manual", request.get("name"))
        except snapshots.SnapshotError as e:
            return False, str(e), {}
        state = "verified" if snap.state == "ok" else f"CORRUPT: {verification.describe_problems(snap.verification)}"
        return snap.state == "ok", f"snapshot {snap.name} taken and {state}", {"snapshot": snap.to_json()}

    async def do_remove_snapshot(self, request: dict[str, Any]) -> Outcome:
        name = request.get("name")
        async with self.d.snapshot_task.lock:
            try:
                await asyncio.to_thread(snapshots.remove, self.d.ws, name)
            except snapshots.SnapshotError as e:
                return False, str(e), {}
            await asyncio.to_thread(self.d.snapshot_task.summarize)
        return True, f"snapshot {name} removed", {}

    async def do_snapshots(self, request: dict[str, Any]) -> Outcome:
        if request.get("verify"):
            async with self.d.snapshot_task.lock:
                for snap in await asyncio.to_thread(snapshots.list_snapshots, self.d.ws):
                    await self.d.snapshot_task.verify(snap.name)
        listed = await asyncio.to_thread(snapshots.list_snapshots, self.d.ws)
        return True, f"{len(listed)} snapshot(s)", {"snapshots": [s.to_json() for s in listed]}

    async def do_verify(self, request: dict[str, Any]) -> Outcome:
        name = request.get("name")
        names = [name] if name is not None else [s.name for s in snapshots.list_snapshots(self.d.ws)]
        results = {}
        async with self.d.snapshot_task.lock:
            for name in names:
                try:
                    results[name] = await self.d.snapshot_task.verify(name)
                except snapshots.SnapshotError as e:
                    return False, str(e), {}
        bad = [n for n, r in results.items() if not r["ok"]]
        if bad:
            return False, "; ".join(f"{n}: {verification.describe_problems(results[n])}" for n in bad), {"results": results}
        return True, f"{len(results)} snapshot(s) verified ok", {"results": results}

    async def do_promote(self, request: dict[str, Any]) -> Outcome:
        """A file training meanwhile stops with a checkpoint, and starts again from step 0 on the promoted model
        (its next attempt finds the current model changed: Daemon.start_on_this_chain). Refused, unless `force`,
        when the current model holds training accepted after the held version's start (engine/quality/held.py)."""
        if self.d.rolling_back or self.d.promoting:
            return False, "promote refused: the current model is being changed; try again when it is done", {}
        force = bool(request.get("force"))
        try:
            await asyncio.to_thread(held.check, self.d.ws, request["job"], force)  # refused before anything stops
            self.d.promoting = True
            training = self.d.job.name if self.d.attempt is not None else None
            await stop_and_wait(self.d)
            message = await asyncio.to_thread(held.promote, self.d.ws, request["job"], self.d.config, force)
        except held.HeldError as e:
            return False, f"promote refused: {e}", {}
        finally:
            self.d.promoting = False
            self.d.wake.set()
        if training:
            message += f"; {training} starts again from step 0 on it"
        self.d.events.emit("promoted", message, "warning", job_id=request["job"])
        return True, message, {}

    async def do_requeue(self, request: dict[str, Any]) -> Outcome:
        try:
            message = await asyncio.to_thread(held.requeue, self.d.ws, request["job"])
        except held.HeldError as e:
            return False, f"requeue refused: {e}", {}
        self.d.events.emit("requeued", message, job_id=request["job"])
        return True, message, {}

    async def do_rollback(self, request: dict[str, Any]) -> Outcome:
        if self.d.rolling_back:
            return False, "a rollback is already under way", {}
        try:
            return True, await self.d.snapshot_task.rollback(request["name"]), {}
        except (restore.RollbackRefused, snapshots.SnapshotError) as e:
            return False, f"rollback refused: {e}", {}
