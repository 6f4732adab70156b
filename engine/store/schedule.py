"""When the next scheduled snapshot is due: daily at a time of day, every N hours, or after N files.

Pure functions of the clock and the workspace's history, so tests can run a
simulated month in milliseconds.
"""

from __future__ import annotations

import datetime as dt

from engine.core.config import SnapshotsConfig


def daily_moment(now: float, daily_at: str) -> float:
    """Today's HH:MM (local time) as a timestamp; the most recent one at or before `now`."""
    hour, minute = map(int, daily_at.split(":"))
    today = dt.datetime.fromtimestamp(now).replace(hour=hour, minute=minute, second=0, microsecond=0)
    if today.timestamp() > now:
        today -= dt.timedelta(days=1)
    return today.timestamp()


def snapshot_due(now: float, since: float, files_since: int, config: SnapshotsConfig) -> str | None:
    """Why a scheduled snapshot is due now ("daily", "interval", "files"), or None.

    `since` is when the last scheduled snapshot was taken or, before the first,
    when the daemon started: the first daily snapshot comes at the first daily
    time after that, not at once.
    """
    if config.every_files and files_since >= config.every_files:
        return "files"
    if config.interval_hours > 0:
        return "interval" if now - since >= config.interval_hours * 3600 else None
    if config.daily_at == "off":
        return None
    return "daily" if since < daily_moment(now, config.daily_at) else None
