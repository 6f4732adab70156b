"""The same file given twice: found by content hash, trained again only when asked.

Each claimed file's content hash (BLAKE3, or SHA-256 without blake3; of the
file's bytes as given, so a compressed copy of a file is another file) is kept
in its job record (`content_hash`). A file whose hash matches a job that
trained, trains, waits or was held is a duplicate: `traind add` refuses it
(exit 1) unless given `--again`, and the daemon rejects one dropped into the
inbox directly (to `queue/rejected/`, kept, with a reason naming the earlier
job and how to train it again). `traind add --again` leaves a marker beside its
copy (`inbox/.NAME.again`, written before the copy is renamed in); the daemon
takes the marker with the file and removes it, so that one file trains again.

It never deletes a data file, and never imports torch.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from engine.core import hashing
from engine.store import statefiles
from engine.store.workspace import Workspace

# A job in one of these states has trained on its file, or will: the same content again is a duplicate.
TRAINS = ("queued", "validating", "training", "done", "held")
_CHUNK = 1 << 22


def hash_fd(fd: int) -> str:
    """`ALGORITHM:HEX` of an open file's bytes, read with pread (the file position is left alone)."""
    algo = hashing.algorithm()
    if algo == "blake3":
        import blake3

        h = blake3.blake3()
    else:
        h = hashlib.sha256()
    offset = 0
    while block := os.pread(fd, _CHUNK, offset):
        h.update(block)
        offset += len(block)
    return f"{algo}:{h.hexdigest()}"


def again_marker(inbox: Path, name: str) -> Path:
    """The dot-file `traind add --again` leaves beside `inbox/NAME` (the scan ignores dot-files)."""
    return inbox / f".{name}.again"


class Known:
    """Content hash -> the job that trained it, from the job records; kept up to date by `add`."""

    def __init__(self, ws: Workspace):
        self.ws = ws
        self.jobs: dict[str, str] | None = None  # read at first use

    def _load(self) -> dict[str, str]:
        if self.jobs is None:
            self.jobs = {}
            for run in sorted(self.ws.runs.iterdir()) if self.ws.runs.is_dir() else []:
                record = statefiles.read_or_none(run / "job.json", statefiles.JOB)
                if record and record.get("content_hash") and record["state"] in TRAINS:
                    self.jobs.setdefault(record["content_hash"], record["id"])
        return self.jobs

    def earlier(self, digest: str, other_than: str | None = None) -> dict | None:
        """The record of a job with this content that trained (or will), if any; its state is read again,
        since a job may have failed since it was seen."""
        job_id = self._load().get(digest)
        if job_id is None or job_id == other_than:
            return None
        record = statefiles.read_or_none(self.ws.run_dir(job_id) / "job.json", statefiles.JOB)
        if record is None or record["state"] not in TRAINS or record.get("content_hash") != digest:
            del self._load()[digest]
            return None
        return record

    def add(self, digest: str, job_id: str) -> None:
        self._load().setdefault(digest, job_id)


def describe(record: dict) -> str:
    """'job 00003-chats (chats.jsonl, done)'."""
    return f"job {record['id']} ({record['original_name']}, {record['state']})"
