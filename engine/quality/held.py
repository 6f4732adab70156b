"""Files the quality gate held, and the user's two answers: promote its model, or train the file again.

A held file is in `queue/held/` with `NAME.reason.json` (why: the forgetting or
the missing improvement, with the figures); its model is the version
`models/JOB/`, kept (retention never prunes it while held) but not current.

- `promote(JOB)`: that version becomes the current model and the file moves to
  queue/done/ (its replay sample joins the pool): the user accepts what the gate
  refused. The next file trains from it. Refused (`WouldDrop`) when the current
  model holds training the held version lacks, files accepted after its start:
  making it current would drop their training while they stay in queue/done/.
  `force` promotes anyway and records which jobs' training it dropped; `requeue`
  is the other way out. A model's training is its line of versions: each
  version's marker names its job, whose last attempt names the model it
  started from (`model_in`), back to a base no job here trained.
- `requeue(JOB)`: the file goes back to the inbox under its original name (a
  suffix if that name is taken), to be claimed and trained again as a new job,
  e.g. after raising `replay.fraction`; the held version is then left to retention.
  Its reason file goes with the job's record, to `runs/JOB/held.reason.json`.

Both run in the daemon or, with no daemon, under the workspace lock. A file
training when its version is promoted stops with a checkpoint and starts again
on the promoted model (engine/supervisor/commands.py). Nothing is deleted.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

from engine.core import reading
from engine.quality import replay
from engine.store import jobs, models, statefiles
from engine.core.atomic import durable_rename
from engine.core.config import Config
from engine.core.protocol import MODEL_MARKER
from engine.store.workspace import Workspace


class HeldError(Exception):
    pass


class WouldDrop(HeldError):
    """Promoting the held job would drop the training of `dropped` (job id, original name), newest first."""

    def __init__(self, job: jobs.Job, dropped: list[tuple[str, str]]):
        self.job, self.dropped = job, dropped
        started = _started_from(job)
        version = _version_name(started)
        start = f"models/{version}" if version else started or "an unknown model"
        super().__init__(
            f"{job.id}: its model started from {start}, and the current model has since been trained on "
            f"{describe(dropped)}: promoting it would drop that training. 'traind requeue {job.id}' trains "
            f"{job.record['original_name']} again on the current model; 'traind promote --force {job.id}' makes "
            "its model current anyway, without that training")


def describe(dropped: list[tuple[str, str]]) -> str:
    """'b.jsonl (00004-b), c.jsonl (00006-c)'."""
    return ", ".join(f"{name} ({job_id})" for job_id, name in dropped)


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


def check(ws: Workspace, job_id: str, force: bool = False) -> jobs.Job:
    """The held job, if it can be promoted; HeldError saying why not (WouldDrop unless `force`)."""
    job = _held(ws, job_id)
    version = ws.models / job.id
    if not models.is_complete(version):
        raise HeldError(f"{version}: missing or incomplete; nothing to promote")
    if not force and (lost := dropped(ws, job)):
        raise WouldDrop(job, lost)
    return job


def promote(ws: Workspace, job_id: str, config: Config | None = None, force: bool = False) -> str:
    """The held job's model becomes current; its file moves to queue/done/ and its sample into the replay pool.
    Returns what was done. The record is written first: cut short after it, `settle` finishes the rest."""
    job = check(ws, job_id, force)
    lost = dropped(ws, job) if force else []  # else check found none
    job.save(state="done", promoted_at=time.time(), held_reason=job.record.get("reason"), reason=None,
             **({"dropped_training": [dropped_id for dropped_id, _ in lost]} if lost else {}))
    _finish_promote(ws, job, config or ws.load_config())
    message = f"promoted: models/{job.id} is the current model; {job.name} moved to queue/done/"
    if lost:
        message += (f"; forced: the training of {describe(lost)} is not in it (their files stay in queue/done/; "
                    "'traind add --again queue/done/NAME' trains one again)")
    return message


def _finish_promote(ws: Workspace, job: jobs.Job, config: Config) -> None:
    """What a promote does once its record says done; safe to repeat."""
    try:
        current = models.current(ws).get("version")
    except (FileNotFoundError, statefiles.Damaged):
        current = None
    if current != job.id:
        models.set_current(ws, "local", f"models/{job.id}", job.id, job_id=job.id, file=job.record["original_name"],
                           promoted=True)
    _move_with_reason(job.path_in("held"), job.path_in("done"))
    replay.add(ws, config, job.id)


def settle(ws: Workspace, config: Config) -> list[str]:
    """A promote or a requeue cut short (a refused write, a kill) after its record was written, finished as the
    record decided, as jobs.complete_move does for a move: at the daemon's start and when writing works again.
    Returns what was finished."""
    finished = []
    for name in jobs.listing(ws, "held"):
        try:
            job = jobs.load(ws, reading.stem(name))
        except (FileNotFoundError, statefiles.Damaged):  # no record, or a damaged one (quarantined, said)
            continue
        if job.state == "done":
            _finish_promote(ws, job, config)
            finished.append(f"{job.name}: a promote cut short is finished: models/{job.id} is the current model, "
                            "the file in queue/done/")
        elif job.state == "requeued" and job.record.get("requeued_as"):
            _finish_requeue(ws, job, ws.inbox / job.record["requeued_as"])
            finished.append(f"{job.name}: a requeue cut short is finished: the file is back in the inbox as "
                            f"{job.record['requeued_as']}")
    return finished


def dropped(ws: Workspace, job: jobs.Job) -> list[tuple[str, str]]:
    """What promoting the held job would drop: the jobs whose training the current model holds and the held
    version lacks, as (job id, original name), newest first."""
    try:
        current = models.current(ws).get("version")
    except (FileNotFoundError, statefiles.Damaged):  # no current model: nothing to drop
        return []
    held_line = _line(ws, _version_name(_started_from(job)))
    first = next(held_line, (None, None))[0]  # None: it started from a base
    ahead = []
    for job_id, name in _line(ws, current):
        if job_id == first:  # from here on both lines are the same
            return ahead
        ahead.append((job_id, name))
    # The current model is not built on the held version's start (a rollback or a rebase went elsewhere).
    kept = {first, *(job_id for job_id, _ in held_line)}
    return [(job_id, name) for job_id, name in ahead if job_id not in kept]


def _started_from(job: jobs.Job) -> str | None:
    attempts = job.record.get("attempts") or []
    return attempts[-1].get("model_in") if attempts else None


def _version_name(source: str | None) -> str | None:
    """The version a worker's `model_in` names (an absolute path under models/, recorded where the workspace
    was then); None for a base outside the workspace or a hub id."""
    path = Path(source) if source else None
    return path.name if path is not None and path.parent.name == "models" else None


def _line(ws: Workspace, version: str | None) -> Iterator[tuple[str, str]]:
    """The jobs whose training model `version` holds, newest first, as (job id, original name): the job that
    made it, the one that made the model that job started from, and so on to a base. A restored version's
    marker keeps its job's; a rebased one stands for the version it came from."""
    seen: set[str] = set()
    while version and version not in seen:
        seen.add(version)
        marker = statefiles.read_or_none(ws.models / version / MODEL_MARKER, statefiles.MODEL_MARKER) or {}
        if isinstance(marker.get("rebased_from"), str):
            version = marker["rebased_from"]
            continue
        job_id = marker.get("job_id")
        record = statefiles.read_or_none(ws.run_dir(job_id) / "job.json", statefiles.JOB) \
            if isinstance(job_id, str) and job_id else None
        if record is None:  # a base, or a job whose record is gone: the line ends here
            return
        yield job_id, record["original_name"]
        version = _version_name(record["attempts"][-1].get("model_in") if record["attempts"] else None)


def requeue(ws: Workspace, job_id: str) -> str:
    """The held job's file goes back to the inbox, to be trained again as a new job. Returns what was done."""
    job = _held(ws, job_id)
    target = _free_name(ws.inbox, job.record["original_name"])
    job.save(state="requeued", requeued_as=target.name, requeued_at=time.time())
    _finish_requeue(ws, job, target)
    return f"requeued: {job.name} is back in the inbox as {target.name}; models/{job.id} is no longer kept for it"


def _finish_requeue(ws: Workspace, job: jobs.Job, target: Path) -> None:
    # The reason first, kept with the job's record (queue/held/ lists only what is held): cut short after it,
    # the file is still held and a second requeue, or `settle`, finishes.
    reason = job.path_in("held").with_name(job.name + jobs.REASON_SUFFIX)
    if reason.exists():
        durable_rename(reason, job.run_dir / ("held" + jobs.REASON_SUFFIX))
    durable_rename(job.path_in("held"), target)


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
