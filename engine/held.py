"""Files the quality gate held, and the user's two answers: promote its model, or train the file again.

A held file is in `queue/held/` with `NAME.reason.json` (why: the forgetting or
the missing improvement, with the figures); its model is the version
`models/JOB/`, kept (retention never prunes it while held) but not current.

- `promote(JOB)`: that version becomes the current model and the file moves to
  queue/done/ (its replay sample joins the pool): the user accepts what the gate
  refused. The next file trains from it.
- `requeue(JOB)`: the file goes back to the inbox under its original name (a
  suffix if that name is taken), to be claimed and trained again as a new job,
  e.g. after raising `replay.fraction`; the held version is then left to retention.
  Its reason file goes with the job's record, to `runs/JOB/held.reason.json`.

Both run in the daemon or, with no daemon, under the workspace lock. A file
training when its version is promoted stops with a checkpoint and starts again
on the promoted model (engine/commands.py). Nothing is deleted.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from engine import jobs, models, reading, replay, statefiles
from engine.atomic import durable_rename
from engine.config import Config
from engine.workspace import Workspace


class HeldError(Exception):
    pass


def _held(ws: Workspace, job_id: str) -> jobs.Job:
    if not (ws.run_dir(job_id) / "job.json").is_file():
        held = ", ".join(reading.stem(n) for n in jobs.listing(ws, "held")) or "none"
        raise HeldError(f"{job_id}: no such job (held now: {held})")
    try:
        job = jobs.load(ws, job_id)
    except statefiles.Damaged as e:
        raise HeldError(str(e)) from None
    if not os.path.lexists(job.path_in("held")):
        raise HeldError(f"{job_id}: not held (its file is not in queue/held/; state {job.state})")
    return job


def check(ws: Workspace, job_id: str) -> jobs.Job:
    """The held job, if it can be promoted; HeldError saying why not."""
    job = _held(ws, job_id)
    version = ws.models / job.id
    if not models.is_complete(version):
        raise HeldError(f"{version}: missing or incomplete; nothing to promote")
    return job


def promote(ws: Workspace, job_id: str, config: Config | None = None) -> str:
    """The held job's model becomes current; its file moves to queue/done/ and its sample into the replay pool.
    Returns what was done."""
    job = check(ws, job_id)
    job.save(state="done", promoted_at=time.time(), held_reason=job.record.get("reason"), reason=None)
    models.set_current(ws, "local", f"models/{job.id}", job.id, job_id=job.id, file=job.record["original_name"],
                       promoted=True)
    _move_with_reason(job.path_in("held"), job.path_in("done"))
    replay.add(ws, config or ws.load_config(), job.id)
    return f"promoted: models/{job.id} is the current model; {job.name} moved to queue/done/"


def requeue(ws: Workspace, job_id: str) -> str:
    """The held job's file goes back to the inbox, to be trained again as a new job. Returns what was done."""
    job = _held(ws, job_id)
    target = _free_name(ws.inbox, job.record["original_name"])
    job.save(state="requeued", requeued_as=target.name, requeued_at=time.time())
    # The reason first, kept with the job's record (queue/held/ lists only what is held): cut short after it,
    # the file is still held and a second requeue finishes.
    reason = job.path_in("held").with_name(job.name + jobs.REASON_SUFFIX)
    if reason.exists():
        durable_rename(reason, job.run_dir / ("held" + jobs.REASON_SUFFIX))
    durable_rename(job.path_in("held"), target)
    return f"requeued: {job.name} is back in the inbox as {target.name}; models/{job.id} is no longer kept for it"


def _move_with_reason(src: Path, dst: Path) -> None:
    durable_rename(src, dst)
    reason = src.with_name(src.name + jobs.REASON_SUFFIX)
    if reason.exists():
        durable_rename(reason, dst.with_name(dst.name + ".held" + jobs.REASON_SUFFIX))


def _free_name(folder: Path, name: str) -> Path:
    path, n = folder / name, 1
    while os.path.lexists(path):
        n += 1
        path = folder / f"{reading.stem(name)}-requeued-{n}{reading.suffix(name) or Path(name).suffix}"
    return path
