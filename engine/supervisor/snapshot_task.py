"""The daemon's snapshot work: verification at start, scheduled and on-demand snapshots, rollbacks.

`run` is a background task: it verifies every snapshot once at start, then
checks every SCHEDULE_CHECK_SECONDS (and at once after each finished file)
whether a scheduled snapshot is due (engine/store/schedule.py), takes it, verifies it
at once and applies retention. Commands take and verify snapshots and roll back
through the same methods. One lock serialises snapshots, verification passes
and rollbacks; hashing, verification and every rollback phase run in threads,
never on the event loop. A rollback puts the daemon in `rolling_back`: no job
starts until it ends.

The store, the checks and the rollback's phases are engine/store/snapshots.py,
engine/store/verification.py and engine/store/restore.py; this module only runs them.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.core import atomic, reading
from engine.quality import gate
from engine.store import bases, jobs, restore, retention, schedule, snapshots, verification
from engine.core.aio import wait_event
from engine.core.atomic import WriteFailed
from engine.supervisor.attempt import stop_and_wait

if TYPE_CHECKING:
    from engine.supervisor.daemon import Daemon

SCHEDULE_CHECK_SECONDS = 30.0  # how often a scheduled snapshot is looked for (and at once after each file)


class SnapshotTask:
    def __init__(self, daemon: "Daemon"):
        self.d = daemon
        self.lock = asyncio.Lock()  # one snapshot, verification pass or rollback at a time
        self.wake = asyncio.Event()  # set after each finished file: a snapshot may be due

    async def run(self) -> None:
        """Verify every snapshot once at start (in the background), then take scheduled ones when due."""
        try:
            async with self.lock:
                await asyncio.to_thread(self.summarize)
                started = time.monotonic()
                results = [await self.verify(snap.name, quiet=True)
                           for snap in await asyncio.to_thread(snapshots.list_snapshots, self.d.ws)]
                if results:  # one line for the pass; each corrupt one has its own alert
                    bad = sum(1 for r in results if not r["ok"])
                    self.d.events.emit("snapshots_verified", f"snapshots verified at start: {len(results) - bad} ok"
                                       + (f", {bad} corrupt" if bad else "") + f" ({time.monotonic() - started:.1f}s)",
                                       "warning" if bad else "info", ok=len(results) - bad, corrupt=bad)
        except WriteFailed as e:  # verify.json refused: those snapshots are verified again at the next start
            self.d.storage.failed(e)
        while True:
            try:
                await self.take_scheduled()
            except WriteFailed as e:
                self.d.storage.failed(e)
                self.d.alert("snapshot_failed", f"scheduled snapshot not taken: {e.problem}")
            except Exception as e:  # a bug must not stop scheduling for good
                self.d.alert("snapshot_failed", f"scheduled snapshot failed: {type(e).__name__}: {e}")
            self.wake.clear()
            await wait_event(self.wake, SCHEDULE_CHECK_SECONDS)

    def scheduled_history(self) -> tuple[float, int]:
        """When the last scheduled snapshot was taken (or the daemon started), and files trained since."""
        scheduled = [s for s in snapshots.list_snapshots(self.d.ws) if s.kind == "scheduled"]
        since = max([s.created_at for s in scheduled], default=self.d.started_at)
        done = self.d.ws.queue("done")  # a file's ctime is when it was renamed into done/
        files = sum(1 for name in jobs.listing(self.d.ws, "done") if (done / name).lstat().st_ctime > since)
        return since, files

    async def take_scheduled(self) -> None:
        if self.d.rolling_back or self.d.stopping:
            return
        since, files = await asyncio.to_thread(self.scheduled_history)
        why = schedule.snapshot_due(time.time(), since, files, self.d.config.snapshots)
        if why is not None:
            await self.take("scheduled", reason={"daily": "daily", "interval": "scheduled",
                                                 "files": f"after {files} files"}[why])

    async def take(self, kind: str, name: str | None = None, reason: str = "on demand") -> snapshots.Snapshot:
        async with self.lock:
            snap = await asyncio.to_thread(snapshots.create, self.d.ws, kind, name, reserve=self.d.config.disk.reserve, eval_summary=gate.summary,
                                           include_optimizer=self.d.config.snapshots.include_optimizer)
            placed = snap.manifest.get("placement", {})
            self.d.events.emit("snapshot", f"snapshot {snap.name} ({reason}) of {snap.source.get('model_version') or 'the model'}: "
                               f"{placed.get('linked', 0)} files linked, {placed.get('copied', 0)} copied", name=snap.name)
            await self.verify(snap.name)
            if kind == "scheduled":
                await asyncio.to_thread(self.apply_retention)
        return snapshots.get(self.d.ws, snap.name)

    async def verify(self, name: str, quiet: bool = False) -> dict[str, Any]:
        """Verify one snapshot; a corrupt one is always an alert, a good one a line unless `quiet`."""
        self.d.snapshot_summary["verifying"] = name
        result = await asyncio.to_thread(verification.verify, self.d.ws, name)
        if result["ok"] and not quiet:
            self.d.events.emit("snapshot_verified", f"snapshot {name} verified ({result['seconds']:.1f}s)", name=name)
        elif not result["ok"]:
            self.d.alert("snapshot_corrupt", f"snapshot {name} is corrupt: {verification.describe_problems(result)}; "
                         "it will never be restored", name=name)
        await asyncio.to_thread(self.summarize)
        return result

    async def rollback(self, target: str) -> str:
        """Make a snapshot the current model; see engine/store/restore.py. Raises RollbackRefused or SnapshotError."""
        async with self.lock:
            journal = await asyncio.to_thread(restore.begin, self.d.ws, target)
            self.d.rolling_back = True
            self.d.refresh()
            try:
                await stop_and_wait(self.d)
                await self.test_pause("rollback_started")
                await asyncio.to_thread(restore.verify_target, self.d.ws, journal)  # refused before anything is made
                await self.test_pause("rollback_verified")
                pre = await asyncio.to_thread(restore.pre_snapshot, self.d.ws, journal, self.d.config.disk.reserve,
                                                gate.summary)
                await self.test_pause("rollback_pre_snapshot")
                version = await asyncio.to_thread(restore.restore, self.d.ws, journal, self.d.config.disk.reserve)
                await self.test_pause("rollback_restored")
                await asyncio.to_thread(restore.switch, self.d.ws, journal)
                await self.test_pause("rollback_switched")
                requeued = await asyncio.to_thread(restore.requeue, self.d.ws, journal)
            except BaseException:
                if restore.read_journal(self.d.ws) and journal.get("phase") != "switched":
                    restore.finish(self.d.ws)
                raise
            finally:
                self.d.rolling_back = False
                self.d.resume = [jobs.load(self.d.ws, j.id) for j in self.d.resume]  # records changed on disk
                await asyncio.to_thread(self.summarize)
                self.d.refresh()
                self.d.wake.set()
        again = restore.restarted_text(requeued)
        message = f"rolled back to {target} (now models/{version}); the previous model is snapshot {pre.name}{again}"
        self.d.events.emit("rolled_back_model", message, "warning", name=target)
        for name in await asyncio.to_thread(restore.prune_pre_rollback, self.d.ws):
            self.d.events.emit("snapshot_removed", f"snapshot {name} removed by retention (the newest "
                               f"{retention.PRE_ROLLBACK_KEPT} pre-rollback snapshots are kept)", name=name)
        return message

    async def test_pause(self, point: str) -> None:
        """Test-only: hold here so a test can kill the daemon at this point of a rollback."""
        if self.d.test_hooks.get("daemon", {}).get("pause_at") == point:
            atomic.write_json_atomic(self.d.ws.state / "test-paused.json", {"point": point})
            await asyncio.sleep(3600)

    def summarize(self) -> None:
        """The status document's `snapshots`."""
        self.d.snapshot_summary = snapshots.summary(self.d.ws)

    def apply_retention(self) -> None:
        """Runs in a thread under the snapshot lock: old scheduled snapshots, then unreferenced model versions."""
        d = self.d
        snaps = snapshots.list_snapshots(d.ws)
        c = d.config.snapshots
        for name in retention.snapshots_to_remove(snaps, time.time(), c.keep_daily, c.keep_weekly):
            try:
                snapshots.remove(d.ws, name)
                d.events.emit("snapshot_removed", f"snapshot {name} removed by retention", name=name)
            except snapshots.SnapshotError as e:
                d.events.emit("snapshot_kept", f"snapshot {name} kept: {e}", "warning", name=name)
        in_use = {Path(d.attempt.spec.model_in).name} if d.attempt else set()
        in_use |= {reading.stem(name) for name in jobs.listing(d.ws, "held")}  # until promoted or requeued
        if d.attempt and d.attempt.spec.adapter:
            in_use.add(Path(d.attempt.spec.adapter["base"]["path"]).name)
        current = snapshots.current_version(d.ws)
        kept = [*([d.ws.models / current] if current else []), *(s.path for s in snaps)]
        in_use |= bases.needed_versions(d.ws, kept)  # the bases their adapters were trained on
        for version in retention.versions_to_prune(snapshots.model_versions(d.ws), current,
                                                   snapshots.versions_in_snapshots(d.ws), in_use):
            snapshots.remove_version(d.ws, version)
            d.events.emit("version_pruned", f"model version {version} pruned (not current, in no snapshot)")
        self.summarize()
