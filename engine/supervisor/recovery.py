"""Start-up recovery: the workspace made whole after whatever ended the last daemon.

`recover` runs once before the queue starts (only `status` is answered
meanwhile): temp files, half-saved models and interrupted snapshots removed,
a rollback cut short finished or dropped (engine/store/restore.py), a promote
or a requeue cut short finished (engine/quality/held.py), a worker
group left by the previous daemon killed, a missing or damaged
models/current.json rebuilt. It returns whether the user had stopped the queue;
what queue/active/ and queue/pending/ hold is taken back by their owners (the
daemon and the intake) from what `jobs.take_back` finds.

It never deletes a file a user handed in: a job found half-moved is moved on
to where its record says it belongs.
"""

from __future__ import annotations

from engine.cluster import nodes
from engine.core import atomic
from engine.core.config import Config
from engine.data import intake
from engine.ops.worker_process import kill_orphan
from engine.quality import held
from engine.store import models, restore, snapshots, statefiles
from engine.store.eventlog import Reporter
from engine.store.workspace import Workspace
from engine.supervisor import reload
from engine.tools import rebase


def recover(ws: Workspace, config: Config, report: Reporter, head: nodes.Head) -> bool:
    """Make the workspace whole after whatever ended the last daemon; whether the queue is held."""
    queue_held = read_held(ws)
    head.end_record()  # an attempt record a crashed daemon left running: the other machines end their agents
    check_current_model(ws, config, report)
    reload.check_at_start(ws, config, report)
    for folder in (ws.state, ws.models, ws.runs, *(ws.queue(s) for s in ("active", "done", "held", "failed", "rejected"))):
        atomic.remove_temp_files(folder)
    for temp in intake.remove_stale_add_temps(ws.inbox):
        report.emit("recovered", f"removed {temp.name}, left by a 'traind add' that was killed", "warning")
    for partial in models.remove_incomplete_partials(ws):
        report.emit("recovered", f"removed a half-saved model {partial.name}", "warning")
    for temp in rebase.clean(ws):
        report.emit("recovered", f"removed {ws.relative(temp)}, left by a rebase that was cut short", "warning")
    for temp in snapshots.clean_temp(ws):
        report.emit("recovered", f"removed {temp.name}, left by an interrupted snapshot or restore", "warning")
    if (done := restore.recover(ws)) is not None:
        report.emit("recovered", done, "warning")
    for finished in held.settle(ws, config):
        report.emit("recovered", finished, "warning")
    orphan = kill_orphan(ws, config.jobs.stop_grace_seconds)
    if orphan:
        report.emit("recovered", f"stopped worker PID {orphan} left by a previous daemon", "warning")
    return queue_held


def read_held(ws: Workspace) -> bool:
    """Whether 'traind stop' held the queue (state/daemon.json), across restarts."""
    try:
        record = statefiles.read(ws.daemon_record, statefiles.DAEMON)
    except statefiles.Damaged:
        return False  # quarantined and reported; 'traind stop' holds the queue again if wanted
    return bool(record and record["held"])


def check_current_model(ws: Workspace, config: Config, report: Reporter) -> str | None:
    """models/current.json readable, or rebuilt from the newest model version; else why there is no model."""
    try:
        models.current(ws)
        return None
    except FileNotFoundError:
        why = "models/current.json is missing"
    except statefiles.Damaged as e:
        why = f"models/current.json was damaged ({e.why})"
    rebuilt = models.rebuild_current(ws, config.model.source)
    if rebuilt is None:
        return f"no current model: {why} and no model version or base model was found"
    report.alert("recovered", f"{why}: the current model is now {rebuilt}", "warning")
    return None


def model_saved(ws: Workspace, job) -> bool:
    """The worker finished and saved the job's model; only publishing it is left."""
    return models.is_complete(models.partial_dir(ws, job.id)) or (ws.models / job.id).exists()
