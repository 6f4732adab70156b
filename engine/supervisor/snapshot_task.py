"""The daemon's snapshot work: verification at start, scheduled and on-demand snapshots, rollbacks, promotes.

A task of its own that owns everything a snapshot touches: its summary for
status.json, and a queue of requests that commands `await` (take a snapshot,
remove one, verify, roll back, promote a held version), served one at a time,
as PostgreSQL's backends ask the checkpointer. Between requests it verifies
every snapshot once at start, then checks every SCHEDULE_CHECK_SECONDS (and at
once after each finished file) whether a scheduled snapshot is due
(engine/store/schedule.py), takes it, verifies it and applies retention.
Hashing, verification and every rollback phase run in threads, never on the
event loop.

A rollback or a promote changes the current model under the queue: it asks the
supervisor to quiesce (`ModelChanges.quiesce`: the attempt in hand stops with a
checkpoint, and no job starts until the change is made). The store, the checks
and the rollback's phases are engine/store/snapshots.py,
engine/store/verification.py and engine/store/restore.py; this module only
runs them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol, TypeVar

from engine.core import aio, atomic, reading
from engine.quality import gate, held
from engine.store import bases, jobs, restore, retention, schedule, snapshots, verification
from engine.store.eventlog import Reporter
from engine.store.storage import Storage
from engine.store.workspace import Workspace
from engine.supervisor.state import SupervisorState

SCHEDULE_CHECK_SECONDS = 30.0  # how often a scheduled snapshot is looked for (and at once after each file)
T = TypeVar("T")


class ModelChanges(Protocol):
    """What the snapshot task needs of the supervisor (engine/supervisor/daemon.py)."""

    state: SupervisorState  # read only: the settings, whether it is stopping, what trains

    def quiesce(self, why: str) -> AbstractAsyncContextManager[None]:
        """While inside, no attempt runs or starts: the one in hand stopped with a checkpoint. `why` is
        "rollback" or "promote"."""

    def models_in_use(self) -> set[str]:
        """The model versions the attempt in hand reads (its starting model, its adapter's base)."""


class SnapshotTask:
    def __init__(self, ws: Workspace, supervisor: ModelChanges, report: Reporter, storage: Storage,
                 started_at: float, pause_at: str | None = None):
        self.ws = ws
        self.supervisor = supervisor
        self.report = report
        self.storage = storage
        self.started_at = started_at
        self.pause_at = pause_at  # test-only: a rollback phase to hold at (engine/core/testing.py)
        self.summary: dict[str, Any] = {}  # the status document's `snapshots`
        self.requests: asyncio.Queue[tuple[Callable[[], Awaitable[Any]], asyncio.Future] | None] = asyncio.Queue()
        self.check_due = False  # a scheduled check is queued (after a finished file)

    # -- what commands ask ---------------------------------------------------------------

    async def take(self, kind: str, name: str | None = None, reason: str = "on demand") -> snapshots.Snapshot:
        return await self._ask(lambda: self._take(kind, name, reason))

    async def remove(self, name: str) -> None:
        return await self._ask(lambda: self._remove(name))

    async def listing(self, verify: bool = False) -> list[snapshots.Snapshot]:
        if not verify:  # it only reads: no need to wait for the work under way
            return await asyncio.to_thread(snapshots.list_snapshots, self.ws)
        return await self._ask(self._verified_listing)

    async def verify(self, names: list[str] | None = None) -> dict[str, dict[str, Any]]:
        """Each snapshot named (every one if None) verified; SnapshotError for a name that is none."""
        return await self._ask(lambda: self._verify_all(names))

    async def rollback(self, target: str) -> str:
        """Make a snapshot the current model (engine/store/restore.py); RollbackRefused or SnapshotError."""
        return await self._ask(lambda: self._rollback(target))

    async def promote(self, job_id: str, force: bool) -> str:
        """Make a held version current (engine/quality/held.py); HeldError when refused."""
        return await self._ask(lambda: self._promote(job_id, force))

    def file_done(self) -> None:
        """A file finished: a scheduled snapshot may be due after this many files."""
        if not self.check_due:
            self.check_due = True
            self.requests.put_nowait(None)

    async def _ask(self, work: Callable[[], Awaitable[T]]) -> T:
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self.requests.put_nowait((work, future))
        return await future

    # -- the task ------------------------------------------------------------------------

    async def run(self) -> None:
        """Verify every snapshot once at start, then serve requests and take scheduled snapshots when due: every
        SCHEDULE_CHECK_SECONDS, however many requests come between, and at once after a finished file."""
        try:
            await self.verify_at_start()
            next_check = time.monotonic()
            while True:
                request = await aio.get_within(self.requests, max(0.0, next_check - time.monotonic()))
                if request is not None:
                    await self.serve(request)
                elif self.check_due or time.monotonic() >= next_check:
                    self.check_due = False
                    await self.scheduled()
                    next_check = time.monotonic() + SCHEDULE_CHECK_SECONDS
        finally:  # leaving (the daemon stops): no requester waits for an answer that will not come
            while not self.requests.empty():
                if (request := self.requests.get_nowait()) is not None:
                    request[1].cancel()

    async def serve(self, request: tuple[Callable[[], Awaitable[Any]], asyncio.Future]) -> None:
        work, future = request
        try:
            result = await work()
        except asyncio.CancelledError:
            future.cancel()
            raise
        except Exception as e:  # the requester's to answer (a refusal, a refused write, a bug)
            if not future.done():
                future.set_exception(e)
        else:
            if not future.done():
                future.set_result(result)

    async def serve_waiting(self) -> None:
        """The requests that came meanwhile, served now (a long pass gives way between its steps)."""
        while not self.requests.empty():
            if (request := self.requests.get_nowait()) is not None:
                await self.serve(request)

    async def verify_at_start(self) -> None:
        """Every snapshot verified once, in the background: a command asked meanwhile waits for one snapshot's
        verification at most. A refused write or a failure is said, and the task goes on serving."""
        try:
            with self.storage.refusals():  # verify.json refused: those snapshots are verified again at the next start
                await self._verify_at_start()
        except Exception as e:
            self.report.alert("snapshot_failed", f"snapshots not verified at start: {type(e).__name__}: {e}")

    async def _verify_at_start(self) -> None:
        self.summary = await asyncio.to_thread(snapshots.summary, self.ws)
        started = time.monotonic()
        results = []
        for snap in await asyncio.to_thread(snapshots.list_snapshots, self.ws):
            await self.serve_waiting()
            try:
                results.append(await self._verify(snap.name, quiet=True))
            except snapshots.SnapshotError:
                continue  # removed by a request served meanwhile
        if results:  # one line for the pass; each corrupt one has its own alert
            bad = sum(1 for r in results if not r["ok"])
            self.report.emit("snapshots_verified", f"snapshots verified at start: {len(results) - bad} ok"
                             + (f", {bad} corrupt" if bad else "") + f" ({time.monotonic() - started:.1f}s)",
                             "warning" if bad else "info", ok=len(results) - bad, corrupt=bad)

    async def scheduled(self) -> None:
        """A scheduled snapshot, if one is due; a failure is alerted, and scheduling goes on."""
        try:
            with self.storage.refusals() as refused:
                await self._take_scheduled()
            if refused:
                self.report.alert("snapshot_failed", f"scheduled snapshot not taken: {refused.problem}")
        except Exception as e:  # a bug must not stop scheduling for good
            self.report.alert("snapshot_failed", f"scheduled snapshot failed: {type(e).__name__}: {e}")

    def scheduled_history(self) -> tuple[float, int]:
        """When the last scheduled snapshot was taken (or the daemon started), and files trained since."""
        scheduled = [s for s in snapshots.list_snapshots(self.ws) if s.kind == "scheduled"]
        since = max([s.created_at for s in scheduled], default=self.started_at)
        done = self.ws.queue("done")  # a file's ctime is when it was renamed into done/
        files = sum(1 for name in jobs.listing(self.ws, "done") if (done / name).lstat().st_ctime > since)
        return since, files

    async def _take_scheduled(self) -> None:
        if self.supervisor.state.stopping:
            return
        since, files = await asyncio.to_thread(self.scheduled_history)
        why = schedule.snapshot_due(time.time(), since, files, self.supervisor.state.config.snapshots)
        if why is not None:
            await self._take("scheduled", reason={"daily": "daily", "interval": "scheduled",
                                                  "files": f"after {files} files"}[why])

    # -- the work, one piece at a time ---------------------------------------------------

    async def _take(self, kind: str, name: str | None = None, reason: str = "on demand") -> snapshots.Snapshot:
        config = self.supervisor.state.config
        snap = await asyncio.to_thread(snapshots.create, self.ws, kind, name, reserve=config.disk.reserve,
                                       include_optimizer=config.snapshots.include_optimizer,
                                       eval_summary=gate.summary)
        placed = snap.manifest.get("placement", {})
        self.report.emit("snapshot", f"snapshot {snap.name} ({reason}) of "
                         f"{snap.source.get('model_version') or 'the model'}: {placed.get('linked', 0)} files "
                         f"linked, {placed.get('copied', 0)} copied", name=snap.name)
        await self._verify(snap.name)
        if kind == "scheduled":
            in_use = self.supervisor.models_in_use()  # read here, on the loop: the thread only gets the answer
            await asyncio.to_thread(self.apply_retention, in_use)
            self.summary = await asyncio.to_thread(snapshots.summary, self.ws)
        return await asyncio.to_thread(snapshots.get, self.ws, snap.name)

    async def _remove(self, name: str) -> None:
        await asyncio.to_thread(snapshots.remove, self.ws, name)
        self.summary = await asyncio.to_thread(snapshots.summary, self.ws)

    async def _verified_listing(self) -> list[snapshots.Snapshot]:
        for snap in await asyncio.to_thread(snapshots.list_snapshots, self.ws):
            await self._verify(snap.name)
        return await asyncio.to_thread(snapshots.list_snapshots, self.ws)

    async def _verify_all(self, names: list[str] | None) -> dict[str, dict[str, Any]]:
        if names is None:
            names = [s.name for s in await asyncio.to_thread(snapshots.list_snapshots, self.ws)]
        return {name: await self._verify(name) for name in names}

    async def _verify(self, name: str, quiet: bool = False) -> dict[str, Any]:
        """Verify one snapshot; a corrupt one is always an alert, a good one a line unless `quiet`."""
        self.summary["verifying"] = name
        result = await asyncio.to_thread(verification.verify, self.ws, name)
        if result["ok"] and not quiet:
            self.report.emit("snapshot_verified", f"snapshot {name} verified ({result['seconds']:.1f}s)", name=name)
        elif not result["ok"]:
            self.report.alert("snapshot_corrupt", f"snapshot {name} is corrupt: "
                              f"{verification.describe_problems(result)}; it will never be restored", name=name)
        self.summary = await asyncio.to_thread(snapshots.summary, self.ws)
        return result

    async def _rollback(self, target: str) -> str:
        journal = await asyncio.to_thread(restore.begin, self.ws, target)
        reserve = self.supervisor.state.config.disk.reserve
        try:
            async with self.supervisor.quiesce("rollback"):
                try:
                    await self.test_pause("rollback_started")
                    await asyncio.to_thread(restore.verify_target, self.ws, journal)  # refused before anything is made
                    await self.test_pause("rollback_verified")
                    pre = await asyncio.to_thread(restore.pre_snapshot, self.ws, journal, reserve, gate.summary)
                    await self.test_pause("rollback_pre_snapshot")
                    version = await asyncio.to_thread(restore.restore, self.ws, journal, reserve)
                    await self.test_pause("rollback_restored")
                    await asyncio.to_thread(restore.switch, self.ws, journal)
                    await self.test_pause("rollback_switched")
                    requeued = await asyncio.to_thread(restore.requeue, self.ws, journal)
                finally:  # what status.json shows as the daemon leaves rolling_back
                    self.summary = await asyncio.to_thread(snapshots.summary, self.ws)
        except BaseException:  # cut short, in the quiesce or a phase: the journal is settled unless it switched
            if restore.read_journal(self.ws) and journal.get("phase") != "switched":
                restore.finish(self.ws)
            raise
        again = restore.restarted_text(requeued)
        message = f"rolled back to {target} (now models/{version}); the previous model is snapshot {pre.name}{again}"
        self.report.emit("rolled_back_model", message, "warning", name=target)
        for name in await asyncio.to_thread(restore.prune_pre_rollback, self.ws):
            self.report.emit("snapshot_removed", f"snapshot {name} removed by retention (the newest "
                             f"{retention.PRE_ROLLBACK_KEPT} pre-rollback snapshots are kept)", name=name)
        return message

    async def _promote(self, job_id: str, force: bool) -> str:
        """A file training meanwhile stops with a checkpoint, and starts again from step 0 on the promoted model
        (its next attempt finds the current model changed). Refused, unless `force`, when the current model
        holds training accepted after the held version's start (engine/quality/held.py)."""
        await asyncio.to_thread(held.check, self.ws, job_id, force)  # refused before anything stops
        s = self.supervisor.state
        training = s.job.name if s.attempt is not None and s.job is not None else None
        async with self.supervisor.quiesce("promote"):
            message = await asyncio.to_thread(held.promote, self.ws, job_id, self.supervisor.state.config, force)
        if training:
            message += f"; {training} starts again from step 0 on it"
        self.report.emit("promoted", message, "warning", job_id=job_id)
        return message

    async def test_pause(self, point: str) -> None:
        """Test-only: hold here so a test can kill the daemon at this point of a rollback."""
        if self.pause_at == point:
            atomic.write_json_atomic(self.ws.state / "test-paused.json", {"point": point})
            await asyncio.sleep(3600)

    def apply_retention(self, in_use: set[str]) -> None:
        """In a thread, between requests: old scheduled snapshots, then unreferenced model versions."""
        ws, c = self.ws, self.supervisor.state.config.snapshots
        snaps = snapshots.list_snapshots(ws)
        for name in retention.snapshots_to_remove(snaps, time.time(), c.keep_daily, c.keep_weekly):
            try:
                snapshots.remove(ws, name)
                self.report.emit("snapshot_removed", f"snapshot {name} removed by retention", name=name)
            except snapshots.SnapshotError as e:
                self.report.emit("snapshot_kept", f"snapshot {name} kept: {e}", "warning", name=name)
        in_use = in_use | {reading.stem(name) for name in jobs.listing(ws, "held")}  # until promoted or requeued
        current = snapshots.current_version(ws)
        kept = [*([ws.models / current] if current else []), *(s.path for s in snaps)]
        in_use |= bases.needed_versions(ws, kept)  # the bases their adapters were trained on
        for version in retention.versions_to_prune(snapshots.model_versions(ws), current,
                                                   snapshots.versions_in_snapshots(ws), in_use):
            snapshots.remove_version(ws, version)
            self.report.emit("version_pruned", f"model version {version} pruned (not current, in no snapshot)")
