"""Rolling the current model back to a snapshot, one journaled phase at a time.

`traind rollback NAME`: snapshot the current model (`pre-rollback-...`), verify
the target, make its files a new model version, switch `models/current.json`
to it (the one atomic step: before it the old model is current, after it the
new one, both verifiable), then set the active file back to the start: its
checkpoints came from the old weights, so they are moved aside, kept but never
resumed. `state/rollback.json` records the phase, so a daemon started after a
crash finishes a rollback that had switched and forgets one that had not.
Every phase is a plain function: the daemon runs them in threads (pausing at
test hooks between them), the CLI runs them directly when no daemon is up.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

from engine import atomic, checkpoints, crashpoints, jobs, models, snapshots, statefiles
from engine.workspace import Workspace

PHASES = ("pre_snapshot", "verified", "restored", "switched")
SUPERSEDED = "checkpoints-superseded-"


class RollbackRefused(Exception):
    pass


def journal_path(ws: Workspace) -> Path:
    return ws.state / "rollback.json"


def read_journal(ws: Workspace) -> dict[str, Any] | None:
    # A damaged journal is forgotten (and quarantined): before the switch the old model is current, after it
    # the new one, and either is whole; only the rest of an interrupted rollback is not finished.
    return statefiles.read_or_none(journal_path(ws), statefiles.ROLLBACK)


def write_journal(ws: Workspace, journal: dict[str, Any], phase: str, **fields: Any) -> None:
    journal.update(phase=phase, **fields)
    atomic.write_json_atomic(journal_path(ws), journal)


def begin(ws: Workspace, target: str) -> dict[str, Any]:
    snapshots.get(ws, target)  # SnapshotError if there is no such snapshot
    active = [j.id for j in jobs.active_jobs(ws)]
    journal = {"target": target, "started_at": time.time(), "active_jobs": active}
    write_journal(ws, journal, "started")
    return journal


def pre_snapshot(ws: Workspace, journal: dict[str, Any], reserve: int) -> snapshots.Snapshot:
    snap = snapshots.create(ws, "pre-rollback", reserve=reserve)
    snapshots.verify(ws, snap.name)
    write_journal(ws, journal, "pre_snapshot", pre_snapshot=snap.name)
    return snap


def verify_target(ws: Workspace, journal: dict[str, Any]) -> None:
    result = snapshots.verify(ws, journal["target"])
    if not result["ok"]:
        raise RollbackRefused(f"{journal['target']} failed verification: {snapshots.describe_problems(result)}")
    write_journal(ws, journal, "verified")


def restore(ws: Workspace, journal: dict[str, Any], reserve: int) -> str:
    version = snapshots.restore_to_version(ws, journal["target"], reserve=reserve).name
    write_journal(ws, journal, "restored", version=version)
    return version


def switch(ws: Workspace, journal: dict[str, Any]) -> None:
    crashpoints.reached("rollback")
    version = journal["version"]
    models.set_current(ws, "local", f"models/{version}", version, restored_from=journal["target"],
                       pre_rollback_snapshot=journal.get("pre_snapshot"))
    write_journal(ws, journal, "switched")


def requeue(ws: Workspace, journal: dict[str, Any]) -> list[str]:
    """The active files start again on the restored model; their old checkpoints are kept aside, unused."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.localtime(journal["started_at"]))
    moved = []
    for job_id in journal.get("active_jobs", []):
        job = jobs.load(ws, job_id)
        if job.location != "active":
            continue
        old = checkpoints.checkpoints_dir(job.run_dir)
        if old.exists():
            atomic.durable_rename(old, job.run_dir / f"{SUPERSEDED}{stamp}")
            moved.append(job_id)
        shutil.rmtree(job.run_dir / "data", ignore_errors=True)
        job.save(pending_rollback=None, restarted_after_rollback=journal["target"])
    finish(ws)
    return moved


def finish(ws: Workspace) -> None:
    try:
        os.unlink(journal_path(ws))
        atomic.fsync_dir(ws.state)
    except FileNotFoundError:
        pass


def recover(ws: Workspace) -> str | None:
    """After a crash: complete a rollback that switched, drop one that had not. Returns what was done."""
    journal = read_journal(ws)
    if journal is None:
        return None
    current = models.current(ws)
    if journal.get("version") and current.get("version") == journal["version"]:
        requeue(ws, journal)
        return f"rollback to {journal['target']} had switched the model before the daemon stopped: finished it"
    version = journal.get("version")  # half-built versions are snapshots.clean_temp's, run before this
    if version and (ws.models / version).exists() and current.get("version") != version:
        snapshots.remove_version(ws, version)
    finish(ws)
    return f"rollback to {journal['target']} was cut short before the switch: the model is unchanged"
