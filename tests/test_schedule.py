"""Scheduled snapshots come when the config says, on a simulated clock."""

import datetime as dt

from engine.core.config import SnapshotsConfig
from engine.store.schedule import snapshot_due


def at(day: int, hour: int, minute: int = 0) -> float:
    return dt.datetime(2026, 11, day, hour, minute).timestamp()


def test_daily_snapshots_fall_once_a_day_at_the_configured_time():
    config = SnapshotsConfig(daily_at="03:00")
    started = at(1, 14)
    taken, since = [], started
    for hour in range(14, 24 * 5):  # five simulated days, checked every hour
        now = at(1, 0) + hour * 3600
        if snapshot_due(now, since, 0, config):
            taken.append(dt.datetime.fromtimestamp(now))
            since = now
    assert [t.day for t in taken] == [2, 3, 4, 5] and all(t.hour == 3 for t in taken)


def test_interval_files_and_off():
    assert snapshot_due(at(1, 5), at(1, 0), 0, SnapshotsConfig(interval_hours=6)) is None
    assert snapshot_due(at(1, 6), at(1, 0), 0, SnapshotsConfig(interval_hours=6)) == "interval"
    assert snapshot_due(at(1, 1), at(1, 0), 3, SnapshotsConfig(daily_at="off", every_files=3)) == "files"
    assert snapshot_due(at(9, 1), at(1, 0), 2, SnapshotsConfig(daily_at="off", every_files=3)) is None
