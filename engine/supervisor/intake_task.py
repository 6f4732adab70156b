"""The daemon's intake: files claimed and validated ahead of training, as a task of their own.

Each wake-up (the inbox watch, or every half second for files still settling)
scans inbox/ once and claims every complete file, oldest first (INTAKE_BATCH a
pass), renaming it into queue/pending/ under the next job number, then
validates it in a thread: an invalid file moves to queue/rejected/ with its
reason at once, whatever is training; a valid one waits in queue/pending/, in
claim order, until the daemon takes it (`next_validated`). A held queue still
takes files in. What a file in the inbox may be, and how it is opened, is
engine/data/intake.py's.

It owns the pending queue, the next job number, the known content hashes and
the flag that has queue/pending/ read again after a refused write (`reload`).
Its pass runs in a thread that touches only what the pass needs (the inbox
scan, the claims, the hashes); each valid job is posted to the loop, which
queues it at once (it may train before the pass ends), and what the pass says
goes through the Reporter.

It never trains, and it never deletes a file it was handed: a file it cannot
take is left in the inbox, one it refuses is kept in queue/rejected/.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import deque
from pathlib import Path
from collections.abc import Callable
from typing import Any

from engine.core.aio import until_woken
from engine.core.atomic import WriteFailed
from engine.core.config import Config
from engine.data import duplicates, intake, validate
from engine.store import jobs
from engine.store.eventlog import Reporter
from engine.store.storage import Storage
from engine.store.workspace import Workspace

INTAKE_BATCH = 500  # files claimed and validated per pass


class IntakeTask:
    def __init__(self, ws: Workspace, config: Callable[[], Config], report: Reporter, storage: Storage,
                 took: Callable[[], None]):
        self.ws = ws
        self.config = config  # the settings as they are now (a reload changes them)
        self.report = report
        self.storage = storage
        self.took = took  # files were taken: the queue may go on
        self.wake = asyncio.Event()  # set by the inbox watch
        self.taking_in = False
        self.reload_pending = False  # after a refused write, queue/pending/ is read again before the next pass
        self.seen: dict = {}  # inbox observations between scans (settling files)
        self.ignored: set[str] = set()
        self.pending: deque[str] = deque()  # validated jobs waiting in queue/pending/, in claim order
        self.unvalidated: list[jobs.Job] = []  # claimed jobs whose validation was cut short
        self.sequence = 0  # the next job number, derived from the folders at start
        self.known = duplicates.Known(ws)  # content hashes of the files trained (or to be)

    def has_work(self) -> bool:
        """Files pending, being validated or waiting in the inbox (for --once)."""
        return bool(self.pending or self.unvalidated or self.reload_pending or self.taking_in or self.inbox_has_work())

    def inbox_has_work(self) -> bool:
        scan = intake.scan_inbox(self.ws.inbox, self.config().inbox.settle_seconds, time.time(), self.seen)
        return bool(scan.ready or scan.rejected or scan.waiting)

    def reload(self) -> None:
        """A write was refused: queue/pending/ is read again before the next pass (what it holds decides)."""
        self.reload_pending = True

    def recover(self) -> None:
        """At start: what queue/pending/ holds taken back in order, and the next job number."""
        self.take_back_pending()
        self.sequence = jobs.next_sequence(self.ws)

    def next_validated(self) -> jobs.Job | None:
        """The oldest validated job, moved into queue/active/: its turn has come."""
        while self.pending:
            job_id = self.pending.popleft()
            job = jobs.load(self.ws, job_id)
            if not os.path.lexists(job.path_in("pending")):
                continue  # taken back meanwhile (after a refused write): where it is now decides
            jobs.start(job)
            return job
        return None

    async def run(self) -> None:
        """Claim and validate what arrives, whatever the trainer is doing: a burst of files is checked at
        once (rejections reported at once), and valid files wait in queue/pending/ for their turn."""
        loop = asyncio.get_running_loop()

        def accepted(job_id: str) -> None:  # from the pass's thread: the job may train before the pass ends
            loop.call_soon_threadsafe(self.queue_valid, job_id)

        while True:
            if not self.storage.problem:
                self.taking_in = True
                taken = 0
                try:
                    with self.storage.refusals() as refused:
                        if self.reload_pending:
                            self.reload_pending = False
                            self.requeue(await asyncio.to_thread(self.still_pending))
                        taken = await asyncio.to_thread(self.take_in, accepted)
                    if refused:
                        self.reload_pending = True
                    elif taken:
                        self.took()
                        continue  # more may be waiting past the batch
                except Exception as e:  # a bug must not stop intake for good
                    self.report.alert("internal_error", f"intake: {type(e).__name__}: {e}")
                    await asyncio.sleep(5.0)
                finally:
                    self.taking_in = False
            await until_woken(self.wake, 0.5)  # the inbox watch wakes it; the timeout re-checks settling files

    def queue_valid(self, job_id: str) -> None:
        """On the loop: a validated job waits its turn in queue/pending/, and the queue is told."""
        self.pending.append(job_id)
        self.took()

    def take_in(self, accepted: Callable[[str], None]) -> int:
        """In a thread: one scan of the inbox, then claim every settled file in arrival order (a batch at a
        time) and validate it. Returns how many files it took; each valid one's id is given to `accepted`."""
        taken = 0
        while self.unvalidated:  # claimed, but validation was cut short
            self.accept(self.unvalidated[0], accepted)
            self.unvalidated.pop(0)  # only once accepted: a pass cut short leaves the rest for the next
            taken += 1
        scan = intake.scan_inbox(self.ws.inbox, self.config().inbox.settle_seconds, time.time(), self.seen)
        for path in scan.ignored:
            if path.name not in self.ignored:
                self.ignored.add(path.name)
                self.report.emit("ignored", f"inbox/{path.name}: ignored (only *.jsonl, *.jsonl.gz and *.jsonl.zst "
                                   "files are taken; dot-files, .part and .tmp are in-progress writes)")
        for path, reason in scan.rejected:
            if (job := self.claim(path)) is not None:
                self.reject(job, reason)
                taken += 1
        for path in scan.ready[:INTAKE_BATCH]:
            if (job := self.claim(path)) is not None:
                self.accept(job, accepted)
                taken += 1
        return taken

    def accept(self, job: jobs.Job, accepted: Callable[[str], None]) -> None:
        """Validate a claimed file: valid, it waits its turn in queue/pending/; invalid, it is rejected."""
        report = self.validate(job)
        if report is None:
            return
        marker = duplicates.again_marker(self.ws.inbox, job.record["original_name"])
        digest = job.record["content_hash"]
        if not job.record.get("again") and (earlier := self.known.earlier(digest, other_than=job.id)) is not None:
            self.reject(job, f"the same content as {duplicates.describe(earlier)}: a file is not trained twice "
                        f"unless asked; to train it again, 'traind add --again FILE' (this copy is kept here)")
            return
        self.known.add(digest, job.id)
        self.record_valid(job, report)
        marker.unlink(missing_ok=True)  # its one file is taken; the file itself is never removed
        accepted(job.id)

    def record_valid(self, job: jobs.Job, report: dict[str, Any]) -> None:
        """A valid file's record (its format, examples and the bad lines skipped, which its every attempt
        passes over) and its `accepted` event, which names the lines skipped (the first few) and counts them."""
        skipped = report["skipped"]
        job.save(state="queued", format=report["format"], examples=report["examples"], validated_at=time.time(),
                 skipped_lines=report["skipped_lines"], skipped=skipped)
        count = report["skipped_count"]
        named = ", ".join(f"line {s['line']}: {s['message'][:80]}" for s in skipped[:3]) + (", ..." if count > 3 else "")
        self.report.emit("accepted", f"{job.record['original_name']}: valid, {report['examples']} examples "
                           f"({report['format']}); job {job.id}"
                           + (f"; {count} bad line{'s' if count != 1 else ''} skipped ({named})" if count else "")
                           + ("; trained again, as 'traind add --again' asked" if job.record.get("again") else ""),
                           job_id=job.id, skipped_count=count, skipped=skipped)

    def take_back_pending(self) -> None:
        """What queue/pending/ holds, in claim order: at start, and after a refused write."""
        self.requeue(self.still_pending())

    def still_pending(self) -> list[jobs.Job]:
        """What queue/pending/ still holds, in claim order (a job that had ended is moved on, as its record says)."""
        return [job for job, ended in jobs.take_back(self.ws, "pending") if not ended]

    def requeue(self, waiting: list[jobs.Job]) -> None:
        self.pending = deque(job.id for job in waiting if job.record.get("validated_at"))
        self.unvalidated = [job for job in waiting if not job.record.get("validated_at")]

    def claim(self, path: Path) -> jobs.Job | None:
        try:
            again = duplicates.again_marker(path.parent, path.name).exists()  # before the claim takes the name
            job = jobs.claim(self.ws, path, self.sequence, save=False)  # written once, with the validation
            self.sequence += 1
            if again:
                job.record["again"] = True
            return job
        except FileNotFoundError:  # taken away between the scan and the claim
            return None
        except WriteFailed:  # the disk, not the file: blocked; what reached queue/active/ is taken back later
            raise
        except OSError as e:  # e.g. no permission to move it: say so once, leave it where it is
            if path.name not in self.ignored:
                self.ignored.add(path.name)
                self.report.alert("claim_failed", f"inbox/{path.name}: cannot be taken ({e.strerror or e}); left in the inbox")
            return None

    def reject(self, job: jobs.Job, reason: str, report: dict[str, Any] | None = None) -> None:
        if job.record.get("again"):  # the marker was for this file: it must not pass to a later one of its name
            duplicates.again_marker(self.ws.inbox, job.record["original_name"]).unlink(missing_ok=True)
        dst = job.finish("rejected", {"reason": reason, **({"validation": report} if report else {})})
        self.report.alert("rejected", f"{job.record['original_name']}: rejected, {reason} (moved to "
                          f"queue/rejected/{dst.name})", "warning", job_id=job.id)

    def validate(self, job: jobs.Job) -> dict[str, Any] | None:
        """Runs in a thread. Returns the validation report if the file may be trained on."""
        path = job.path_in(job.location or "pending")
        try:
            with intake.open_claimed(path) as f:
                config = self.config()
                report = validate.validate_fileobj(f, job.record["original_name"], config.validation,
                                                   config.inbox.skip_up_to())
                job.record["content_hash"] = duplicates.hash_fd(f.fileno())  # what was read, by the same handle
        except intake.UnsafeFile as e:
            self.reject(job, str(e))
            return None
        except OSError as e:
            self.reject(job, f"unreadable: {e.strerror or e}")
            return None
        if not report.ok:
            first = report.errors[0] if report.errors else (0, "invalid")
            where = f"line {first[0]}: " if first[0] else ""
            count = f"{report.error_count} errors, the first: " if report.error_count > 1 else ""
            hint = f"; {validate.SKIP_HINT}" if report.could_skip else ""
            self.reject(job, f"{count}{where}{first[1]}{hint}", report.to_json())
            return None
        return report.to_json()

