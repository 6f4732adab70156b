"""Start-up recovery: the workspace made whole after whatever ended the last daemon.

`recover` runs once before the queue starts (only `status` is answered
meanwhile): temp files, half-saved models and interrupted snapshots removed,
a rollback cut short finished or dropped (engine/store/restore.py), a worker group
left by the previous daemon killed, a missing or damaged models/current.json
rebuilt, and what queue/active/ and queue/pending/ hold taken back in order.
`take_back_active` runs again after a refused write or an internal error.

It never deletes a file a user handed in: a job found half-moved is moved on
to where its record says it belongs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from engine.core import atomic
from engine.data import intake
from engine.store import checkpoints, jobs, models, restore, snapshots, statefiles
from engine.supervisor import outcomes, reload
from engine.tools import rebase
from engine.ops.worker_process import kill_orphan
from engine.store.workspace import Workspace

if TYPE_CHECKING:
    from engine.supervisor.daemon import Daemon


def recover(d: "Daemon") -> None:
    """Make the workspace whole after whatever ended the last daemon."""
    ws = d.ws
    d.held = d.read_held()
    d.nodes.end_record()  # an attempt record a crashed daemon left running: the other machines end their agents
    check_current_model(d)
    reload.check_at_start(d)
    for folder in (ws.state, ws.models, ws.runs, *(ws.queue(s) for s in ("active", "done", "held", "failed", "rejected"))):
        atomic.remove_temp_files(folder)
    for temp in intake.remove_stale_add_temps(ws.inbox):
        d.events.emit("recovered", f"removed {temp.name}, left by a 'traind add' that was killed", "warning")
    for partial in models.remove_incomplete_partials(ws):
        d.events.emit("recovered", f"removed a half-saved model {partial.name}", "warning")
    for temp in rebase.clean(ws):
        d.events.emit("recovered", f"removed {ws.relative(temp)}, left by a rebase that was cut short", "warning")
    for temp in snapshots.clean_temp(ws):
        d.events.emit("recovered", f"removed {temp.name}, left by an interrupted snapshot or restore", "warning")
    if (done := restore.recover(ws)) is not None:
        d.events.emit("recovered", done, "warning")
    orphan = kill_orphan(ws, d.config.jobs.stop_grace_seconds)
    if orphan:
        d.events.emit("recovered", f"stopped worker PID {orphan} left by a previous daemon", "warning")
    take_back_active(d, "left active by a previous daemon")
    d.intake.take_back_pending()
    d.intake.sequence = jobs.next_sequence(ws)


def check_current_model(d: "Daemon") -> str | None:
    """models/current.json readable, or rebuilt from the newest model version; else why there is no model."""
    try:
        models.current(d.ws)
        return None
    except FileNotFoundError:
        why = "models/current.json is missing"
    except statefiles.Damaged as e:
        why = f"models/current.json was damaged ({e.why})"
    rebuilt = models.rebuild_current(d.ws, d.config.model.source)
    if rebuilt is None:
        return f"no current model: {why} and no model version or base model was found"
    d.alert("recovered", f"{why}: the current model is now {rebuilt}", "warning")
    return None


def take_back_active(d: "Daemon", why: str) -> None:
    """What queue/active/ holds, made whole and queued again: at start, and after a refused write."""
    d.resume = []
    for job in jobs.active_jobs(d.ws):
        if job.state in jobs.FINAL_STATES:
            jobs.complete_move(job)
            d.events.emit("recovered", f"{job.name}: finished moving to queue/{job.state}/", "warning")
        elif model_saved(d.ws, job):
            outcomes.finish_done(d, job)
        else:
            if job.record["attempts"] and "outcome" not in job.record["attempts"][-1]:
                job.end_attempt("interrupted", exit="the daemon stopped while it ran")
            step = checkpoints.newest_complete(job.run_dir)
            where = f"from its checkpoint at step {step[0]}" if step else "from the start"
            d.events.emit("recovered", f"{job.name}: {why}; resuming {where}", "warning")
            d.resume.append(job)


def model_saved(ws: Workspace, job: jobs.Job) -> bool:
    """The worker finished and saved the job's model; only publishing it is left."""
    return models.is_complete(models.partial_dir(ws, job.id)) or (ws.models / job.id).exists()
