"""Retention over simulated time: dailies and weeklies kept by restic's rules, manual and
pre-rollback snapshots never touched, the newest verified snapshot never removed; model versions
pruned only when nothing refers to them."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np
import pytest
from safetensors.numpy import save_file

from engine.core import atomic
from engine.store import models, retention, snapshots, verification
from engine.core.protocol import MODEL_MARKER
from engine.store.workspace import Workspace

UTC = timezone.utc
DAY = 86400.0
START = datetime(2026, 10, 1, 3, 0, tzinfo=UTC).timestamp()  # a Thursday, 03:00


@dataclass
class Fake:
    name: str
    kind: str
    created_at: float
    verification: dict | None = None


def expected_kept(times: list[float], keep_daily: int, keep_weekly: int) -> set[float]:
    """Computed independently of the module: group by day and by ISO week, newest of each, newest groups."""
    by_day: dict = {}
    by_week: dict = {}
    for t in times:
        d = datetime.fromtimestamp(t, UTC).date()
        by_day[d] = max(by_day.get(d, t), t)
        week = tuple(d.isocalendar())[:2]
        by_week[week] = max(by_week.get(week, t), t)
    days = sorted(by_day, reverse=True)[:keep_daily]
    weeks = sorted(by_week, reverse=True)[:keep_weekly]
    return {by_day[d] for d in days} | {by_week[w] for w in weeks}


def test_a_simulated_month_of_dailies_on_a_real_workspace(tmp_path):
    ws = Workspace.at(tmp_path / "ws")
    ws.create_folders()
    version = ws.models / "00001-a"
    version.mkdir()
    save_file({"w": np.ones((8, 8), dtype=np.float32)}, str(version / "model.safetensors"))
    (version / "config.json").write_text(json.dumps({"model_type": "llama"}))
    atomic.write_json_atomic(version / MODEL_MARKER, {"job_id": "00001-a", "step": 1, "loss": 2.0, "files": {}})
    models.publish(ws, "00001-a")
    snapshots.create(ws, "manual", name="keep-me", now=START - 40 * DAY)
    snapshots.create(ws, "pre-rollback", now=START - 39 * DAY)

    times = [START + i * DAY for i in range(31)]
    for now in times:  # what the daemon does each day: snapshot, verify, apply retention
        snap = snapshots.create(ws, "scheduled", now=now)
        assert verification.verify(ws, snap.name, now=now + 60)["ok"]
        listed = snapshots.list_snapshots(ws, now=now + 60)
        for name in retention.snapshots_to_remove(listed, now + 60, keep_daily=7, keep_weekly=4, tz=UTC):
            snapshots.remove(ws, name)

    left = snapshots.list_snapshots(ws)
    kept_scheduled = {s.created_at for s in left if s.kind == "scheduled"}
    assert kept_scheduled == expected_kept(times, 7, 4)
    newest_7 = set(times[-7:])
    assert newest_7 <= kept_scheduled and 7 < len(kept_scheduled) <= 7 + 4
    assert {s.name for s in left if s.kind != "scheduled"} == {"keep-me", "pre-rollback-2026-08-23T0300"}
    assert snapshots.list_snapshots(ws)[-1].name == "daily-2026-10-31T0300"


def test_newest_of_each_day_several_a_day_and_one_shot_equals_expected():
    snaps = [Fake(f"s{i}", "scheduled", START + i * 6 * 3600) for i in range(4 * 40)]  # every 6 hours, 40 days
    times = [s.created_at for s in snaps]
    remove = retention.snapshots_to_remove(snaps, times[-1], 7, 4, tz=UTC)
    kept = {s.created_at for s in snaps if s.name not in remove}
    assert kept == expected_kept(times, 7, 4)
    assert remove == [s.name for s in snaps if s.created_at not in kept]  # oldest first


def test_manual_pre_rollback_newest_verified_and_future_ones_are_kept():
    snaps = [Fake(f"d{i}", "scheduled", START + i * DAY) for i in range(20)]
    snaps[2].verification = {"ok": True}  # the only verified one: old, outside both windows
    extra = [Fake("m", "manual", START - DAY), Fake("p", "pre-rollback", START), Fake("f", "scheduled", START + 99 * DAY)]
    remove = retention.snapshots_to_remove(snaps + extra, START + 19 * DAY, keep_daily=0, keep_weekly=0, tz=UTC)
    assert "d2" not in remove and not {"m", "p", "f"} & set(remove)
    assert set(remove) == {s.name for s in snaps} - {"d2"}


def test_a_corrupt_snapshot_never_takes_a_good_ones_slot():
    good = Fake("day5-early", "scheduled", START + 5 * DAY, {"ok": True})
    corrupt = Fake("day5-late", "scheduled", START + 5 * DAY + 3600, {"ok": False})
    older_corrupt = Fake("day0", "scheduled", START, {"ok": False})
    snaps = [older_corrupt, Fake("day3", "scheduled", START + 3 * DAY), good, corrupt]
    remove = retention.snapshots_to_remove(snaps, START + 6 * DAY, keep_daily=1, keep_weekly=0, tz=UTC)
    # day 5's slot goes to the good one; the corrupt one of that day stays (newer than the oldest kept)
    # for inspection; the old corrupt one and day 3 go.
    assert remove == ["day0", "day3"]


@pytest.mark.parametrize("keep_daily,keep_weekly", [(7, 4), (1, 0), (0, 2), (3, 10)])
def test_counts(keep_daily, keep_weekly):
    snaps = [Fake(f"s{i:02d}", "scheduled", START + i * DAY + (i % 3) * 3600) for i in range(45)]
    times = [s.created_at for s in snaps]
    remove = set(retention.snapshots_to_remove(snaps, times[-1] + 1, keep_daily, keep_weekly, tz=UTC))
    assert {s.created_at for s in snaps if s.name not in remove} == expected_kept(times, keep_daily, keep_weekly)


def test_versions_to_prune():
    versions = ["base-tiny", "00001-a", "00002-b", "00003-c", "restored-x-1"]
    prune = retention.versions_to_prune(versions, current_version="00003-c", snapshot_sources={"00001-a"},
                                        in_use={"00002-b"})
    assert prune == ["base-tiny", "restored-x-1"]
    assert retention.versions_to_prune(["a"], current_version="a", snapshot_sources=()) == []
    assert retention.versions_to_prune(["a", "b"], current_version=None, snapshot_sources=[None]) == ["a", "b"]


def test_pruning_a_version_in_a_workspace(tmp_path):
    ws = Workspace.at(tmp_path / "ws")
    ws.create_folders()
    for job in ("00001-a", "00002-b", "00003-c"):
        d = ws.models / job
        d.mkdir()
        (d / "config.json").write_text("{}")
        atomic.write_json_atomic(d / MODEL_MARKER, {"job_id": job, "step": 1, "loss": 1.0, "files": {}})
        models.publish(ws, job)
        if job == "00001-a":
            snapshots.create(ws, "manual", name="of-a")
    prune = retention.versions_to_prune(snapshots.model_versions(ws), snapshots.current_version(ws),
                                        snapshots.versions_in_snapshots(ws))
    assert prune == ["00002-b"]
    for v in prune:
        snapshots.remove_version(ws, v)
    assert snapshots.model_versions(ws) == ["00001-a", "00003-c"]
    assert verification.verify(ws, "of-a")["ok"]
