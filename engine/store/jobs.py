"""The queue on disk: claiming inbox files as jobs, job records, moving files between queue folders.

A claimed file is renamed to `queue/pending/JOB_ID.jsonl` (`.jsonl.gz`, `.jsonl.zst`: it keeps its
suffix), where JOB_ID is a sequence number and the file's name without its suffix
(`00007-data` for `data.jsonl.gz`), so names never collide
across days and every file sits in exactly one folder. It is validated there,
ahead of training, and renamed into `queue/active/` when its turn comes. `runs/JOB_ID/job.json`
holds the job's state and its attempts; a decision (done, failed, rejected) is
recorded there before the file moves, so recovery after a crash can finish a
move that was cut short. Files are only ever renamed, never deleted.

An attempt ends done, interrupted (stopped, shut down, the daemon died, killed
from outside after it made progress), failed, or in one of the outcomes that
carry their own remedy (rollback, oom, stopped, skipped). Progress means a new
complete checkpoint since the attempt began. Only failed attempts without
progress, in a row, count toward `jobs.max_attempts`; OOM kills have their own
count (`jobs.max_oom_kills`). A job that keeps checkpointing is never given up.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.core import crashpoints, reading
from engine.store import statefiles
from engine.store.statefiles import FINAL_STATES  # the job record's vocabulary, beside its shape
from engine.core.atomic import durable_rename, write_json_atomic
from engine.store.workspace import QUEUE_STATES, Workspace

_SEQ = re.compile(r"^(\d{5,})-")
FAILED = "failed"
OOM_KILLED = "oom_killed"  # taken by the kernel's OOM killer: counted apart from failures
REASON_SUFFIX = ".reason.json"


def _safe_stem(name: str) -> str:
    stem = reading.stem(name)
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._") or "file"
    return stem[:80]


def next_sequence(ws: Workspace) -> int:
    """One past the highest job number in runs/ or any queue folder: derived, never stored."""
    highest = 0
    for folder in [ws.runs, *(ws.queue(s) for s in QUEUE_STATES)]:
        try:
            names = os.listdir(folder)
        except FileNotFoundError:
            continue
        for name in names:
            m = _SEQ.match(name)
            if m:
                highest = max(highest, int(m.group(1)))
    return highest + 1


@dataclass
class Job:
    ws: Workspace
    id: str
    record: dict[str, Any]

    @property
    def name(self) -> str:
        return self.id + (self.record.get("file_suffix") or ".jsonl")

    @property
    def run_dir(self) -> Path:
        return self.ws.run_dir(self.id)

    @property
    def record_path(self) -> Path:
        return self.run_dir / "job.json"

    @property
    def state(self) -> str:
        return self.record["state"]

    def path_in(self, queue_state: str) -> Path:
        return self.ws.queue(queue_state) / self.name

    @property
    def location(self) -> str | None:
        """The queue folder the file is in now (None if in none: never, by the invariant)."""
        for state in QUEUE_STATES:
            if os.path.lexists(self.path_in(state)):
                return state
        return None

    def save(self, **changes: Any) -> None:
        self.record.update(changes)
        self.record["updated_at"] = time.time()
        write_json_atomic(self.record_path, self.record)

    def failures(self, outcome: str = FAILED) -> int:
        """Attempts ending in `outcome` without progress, since the last attempt that made progress."""
        count = 0
        for attempt in reversed(self.record["attempts"]):
            if attempt.get("progress"):
                break
            if attempt.get("outcome") == outcome:
                count += 1
        return count

    def start_attempt(self, **details: Any) -> dict[str, Any]:
        attempts = self.record["attempts"]
        if attempts and "outcome" not in attempts[-1]:  # its end was never recorded (the daemon died or the disk was full)
            attempts[-1].update(outcome="interrupted", exit="the daemon stopped while it ran")
        attempt = {"n": len(attempts) + 1, "started_at": time.time(), **details}
        self.record["attempts"].append(attempt)
        self.save(state="training")
        return attempt

    def end_attempt(self, outcome: str, **details: Any) -> None:
        self.record["attempts"][-1].update(outcome=outcome, ended_at=time.time(), **details)
        self.save()

    def finish(self, final_state: str, reason: dict[str, Any] | None = None) -> Path:
        """Record the decision, then move the file to queue/FINAL_STATE/ with NAME.reason.json beside it."""
        assert final_state in FINAL_STATES
        self.save(state=final_state, reason=reason)
        return complete_move(self)


def complete_move(job: Job) -> Path:
    """Carry out the move a job's record already decided on; safe to repeat after a crash."""
    final_state = job.state
    dst = job.path_in(final_state)
    for waiting in ("active", "pending"):
        src = job.path_in(waiting)
        if os.path.lexists(src):
            durable_rename(src, dst)
    reason = job.record.get("reason")
    if reason is not None:
        write_json_atomic(dst.with_name(dst.name + REASON_SUFFIX), {"file": job.name, "original_name": job.record["original_name"], **reason})
    return dst


def file_identity(path: Path) -> dict[str, int] | None:
    """What a claimed file is, to notice it changing: size, mtime and inode (None if it is gone)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino}


def changed_since_claim(job: Job) -> str | None:
    """How the file in queue/active/ differs from what was claimed, or None. Nothing trained on a changed
    file is published: what was read and what the user has would not be the same data."""
    then = job.record.get("claimed_file")
    if not isinstance(then, dict):
        return None
    now = file_identity(job.path_in(job.location or "active"))
    if now is None:
        return "removed"
    if now["ino"] != then.get("ino"):
        return "replaced by another file"
    grown = now["size"] - then.get("size", 0)
    if grown > 0:
        return f"appended {grown} bytes"
    if grown < 0:
        return f"truncated by {-grown} bytes"
    if now["mtime_ns"] != then.get("mtime_ns"):
        return "rewritten"
    return None


def claim(ws: Workspace, inbox_path: Path, sequence: int | None = None, save: bool = True) -> Job:
    """Rename an inbox entry (file, or a link or FIFO itself: nothing is followed) into queue/pending/.
    `sequence` is the job number to use (the daemon keeps the next one); None derives it from the folders.
    With `save` False the record is written by the caller's next decision (validated or rejected, a
    moment later): a crash in between leaves a file whose record `load` makes anew."""
    job_id = f"{sequence or next_sequence(ws):05d}-{_safe_stem(inbox_path.name)}"
    suffix = reading.suffix(inbox_path.name) or ".jsonl"
    dst = ws.queue("pending") / f"{job_id}{suffix}"
    durable_rename(inbox_path, dst)
    crashpoints.reached("claim")
    return _new_record(ws, job_id, inbox_path.name, save, claimed_file=file_identity(dst), file_suffix=suffix)


def _new_record(ws: Workspace, job_id: str, original_name: str, save: bool = True, **extra: Any) -> Job:
    run_dir = ws.run_dir(job_id)
    run_dir.mkdir(parents=True, exist_ok=True)
    now = time.time()
    job = Job(ws, job_id, {"id": job_id, "original_name": original_name, "claimed_at": now,
                           "state": "queued", "format": None, "attempts": [], "reason": None, **extra})
    if save:
        job.save()
    else:
        job.record["updated_at"] = now
    return job


def load(ws: Workspace, job_id: str) -> Job:
    """A job's record; one never written (claimed, then the daemon died) or damaged (quarantined by the
    reader) is made anew from what the folders say: the file is queued again, validated again, and its
    attempt resumes from its newest complete checkpoint. Only its attempt history is lost."""
    path = ws.run_dir(job_id) / "job.json"
    suffix = next((s for s in reading.SUFFIXES for state in ("active", "pending")
                   if os.path.lexists(ws.queue(state) / f"{job_id}{s}")), ".jsonl")
    name = (_SEQ.sub("", job_id) or job_id) + suffix  # the name it came in under, as far as its id tells
    identity = (file_identity(ws.queue("active") / f"{job_id}{suffix}")
                or file_identity(ws.queue("pending") / f"{job_id}{suffix}"))
    try:
        record = statefiles.read(path, statefiles.JOB)
    except statefiles.Damaged as e:
        return _new_record(ws, job_id, name, rebuilt=e.why, claimed_file=identity, file_suffix=suffix)
    if record is None:
        return _new_record(ws, job_id, name, claimed_file=identity, file_suffix=suffix)
    return Job(ws, job_id, record)


def active_jobs(ws: Workspace, state: str = "active") -> list[Job]:
    """The jobs whose files are in queue/active/ (or queue/pending/, queue/held/), in claim order."""
    names = sorted(n for n in os.listdir(ws.queue(state)) if reading.suffix(n) and not n.startswith("."))
    return [load(ws, reading.stem(n)) for n in names]


def take_back(ws: Workspace, state: str) -> Iterator[tuple[Job, bool]]:
    """What queue/active/ (or queue/pending/) holds, made whole after an interruption, in claim order: each job,
    and whether it had ended (it is then moved on to the folder its record names, as it is reached)."""
    for job in active_jobs(ws, state):
        ended = job.state in FINAL_STATES
        if ended:
            complete_move(job)
        yield job, ended


def start(job: Job) -> None:
    """Its turn: the file moves from queue/pending/ to queue/active/ (no-op if it is there already)."""
    src = job.path_in("pending")
    if os.path.lexists(src):
        durable_rename(src, job.path_in("active"))


def listing(ws: Workspace, state: str) -> list[str]:
    """Job files in one queue folder, oldest first."""
    try:
        return sorted(n for n in os.listdir(ws.queue(state)) if not n.endswith(REASON_SUFFIX) and not n.startswith("."))
    except FileNotFoundError:
        return []
