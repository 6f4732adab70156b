"""Rolling the current model back to a snapshot, one journaled phase at a time.

`traind rollback NAME`: verify the target (a corrupt or missing one is refused
before anything is made), snapshot the current model (`pre-rollback-...`; the
newest ten are kept: `prune_pre_rollback`), make its files a new model version (`restore_to_version`: hard
links, or copies after a free-space check, its marker last), switch
`models/current.json` to it (the one atomic step: before it the old model is
current, after it the new one, both verifiable), then set the active file back
to the start: its checkpoints came from the old weights, so they are moved
aside, kept but never resumed. `state/rollback.json` records the phase, so a
daemon started after a crash finishes a rollback that had switched and forgets
one that had not.
Every phase is a plain function: the daemon runs them in threads (pausing at
test hooks between them), the CLI runs them directly when no daemon is up.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any

from engine.core import atomic, crashpoints
from engine.store import checkpoints, jobs, models, placing, retention, snapshots, statefiles, verification
from engine.core.protocol import EVAL_BEFORE, MODEL_MARKER
from engine.store.workspace import Workspace

PHASES = ("verified", "pre_snapshot", "restored", "switched")
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


def pre_snapshot(ws: Workspace, journal: dict[str, Any], reserve: int,
                 eval_summary: Callable[[Any], dict[str, Any] | None] | None = None) -> snapshots.Snapshot:
    snap = snapshots.create(ws, "pre-rollback", reserve=reserve, eval_summary=eval_summary)
    verification.verify(ws, snap.name)
    write_journal(ws, journal, "pre_snapshot", pre_snapshot=snap.name)
    return snap


def verify_target(ws: Workspace, journal: dict[str, Any]) -> None:
    result = verification.verify(ws, journal["target"])
    if not result["ok"]:
        raise RollbackRefused(f"{journal['target']} failed verification: {verification.describe_problems(result)}")
    write_journal(ws, journal, "verified")


def restore_to_version(ws: Workspace, name: str, now: float | None = None, *, reserve: int = 0,
                       reverify: bool = False) -> Path:
    """Make a snapshot's files a new model version `models/restored-NAME-STAMP/`, for the daemon to
    make current. Verifies first when never verified (or when `reverify`); refuses a snapshot whose
    last verification failed. Hard links (copies across filesystems, after a free-space check);
    built as `models/.partial-...` with its marker last (`restored_from: NAME`), then renamed."""
    now = time.time() if now is None else now
    snap = snapshots.get(ws, name)
    result = snap.verification
    if result is None or reverify:
        result = verification.verify(ws, name, now)
    if not result.get("ok"):
        raise snapshots.SnapshotError(f"{name}: corrupt ({verification.describe_problems(result)}); a corrupt snapshot is never restored")
    version = f"{snapshots.RESTORED_PREFIX}{name}-{time.strftime('%Y%m%dT%H%M%S', time.gmtime(now))}"
    if len(version) > 200:
        version = version[:180] + version[-16:]
    final = ws.models / version
    if final.exists():
        raise snapshots.SnapshotError(f"{final}: exists")
    partial = models.partial_dir(ws, version)
    if partial.exists():
        placing.remove_tree(partial)
    partial.mkdir(parents=True)
    files = snap.manifest["files"]
    try:
        dev = os.stat(ws.models).st_dev
        content = [(rel, info) for rel, info in sorted(files.items()) if rel != MODEL_MARKER]
        links = {rel: os.stat(snap.path / rel).st_dev == dev for rel, _ in content}
        placer = placing.Placer(partial, reserve, sum(info["size"] for rel, info in content if not links[rel]),
                                snapshots.SnapshotError)
        for rel, info in content:
            if placer.place(snap.path / rel, partial / rel, info["size"], links[rel]) == "reflinked":
                placing.fsync_file(partial / rel)
        placing.fsync_tree(partial)
        original = {}
        if MODEL_MARKER in files:
            try:
                original = atomic.read_json(snap.path / MODEL_MARKER)
            except (OSError, ValueError):
                original = {}
        marker = {**(original if isinstance(original, dict) else {}),
                  "restored_from": name, "restored_at": now, "snapshot_source": snap.source,
                  "files": {rel: info["size"] for rel, info in content},
                  "hash_algorithm": snap.manifest["hash_algorithm"],
                  "hashes": {rel: info["hash"] for rel, info in content}}
        atomic.write_bytes_atomic(partial / MODEL_MARKER, (atomic.dumps(marker, indent=2) + "\n").encode(),
                                  mode=placing.READ_ONLY)
        atomic.durable_rename(partial, final)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return final




def restore(ws: Workspace, journal: dict[str, Any], reserve: int) -> str:
    version = restore_to_version(ws, journal["target"], reserve=reserve).name
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
    moved = set_aside_checkpoints([jobs.load(ws, job_id) for job_id in journal.get("active_jobs", [])],
                                  journal["started_at"], restarted_after_rollback=journal["target"])
    finish(ws)
    return moved


def restarted_text(job_ids: list[str]) -> str:
    """'; 00001-arith starts again from step 0 on it' (or '; A and B start again...'), '' for none."""
    if not job_ids:
        return ""
    names = job_ids[0] if len(job_ids) == 1 else f"{', '.join(job_ids[:-1])} and {job_ids[-1]}"
    return f"; {names} {'starts' if len(job_ids) == 1 else 'start'} again from step 0 on it"


def start_over_if_changed(job: jobs.Job, trains: dict[str, Any]) -> bool:
    """An active file trained before as something else (bases.trains) starts again from step 0: True if its
    checkpoints were set aside. Records what it trains now."""
    before = job.record.get("trains")
    moved = before is not None and before != trains and bool(set_aside_checkpoints([job], time.time()))
    job.save(trains=trains)
    return moved


def set_aside_checkpoints(active: list[jobs.Job], when: float, **why: Any) -> list[str]:
    """These active files start again from step 0 on a new model (after a rollback, a promote, a rebase, a
    changed [adapter]): their checkpoints came from the old one, so they are moved aside (kept, never resumed). `why`
    goes into each job record. Repeatable. Returns the jobs whose checkpoints were moved."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.localtime(when))
    moved = []
    for job in active:
        if job.location != "active":
            continue
        old = checkpoints.checkpoints_dir(job.run_dir)
        if old.exists():
            atomic.durable_rename(old, job.run_dir / f"{SUPERSEDED}{stamp}")
            moved.append(job.id)
        shutil.rmtree(job.run_dir / "data", ignore_errors=True)
        (job.run_dir / EVAL_BEFORE).unlink(missing_ok=True)  # the old starting model's figures
        job.save(pending_rollback=None, replay=None, **why)  # and its replay plan is made again, on the pool as it is
    return moved


def prune_pre_rollback(ws: Workspace) -> list[str]:
    """Pre-rollback snapshots past the newest PRE_ROLLBACK_KEPT, removed (never one that `snapshots.remove`
    protects: the current model's source, the newest verified). Returns the names removed."""
    removed = []
    for name in retention.pre_rollback_to_remove(snapshots.list_snapshots(ws)):
        try:
            snapshots.remove(ws, name)
            removed.append(name)
        except snapshots.SnapshotError:
            continue
    return removed


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
