"""Retention: which scheduled snapshots and which model versions may go.

Pure functions over what was listed, with the clock passed in, so a test can
simulate a month in a millisecond; deleting is `engine.store.snapshots`'s job. The
rules never pick the current model, the newest verified snapshot, or a manual
snapshot (those stay until a user removes them); of the pre-rollback snapshots,
the newest PRE_ROLLBACK_KEPT stay.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, tzinfo
from typing import Any, Protocol


PRE_ROLLBACK_KEPT = 10  # pre-rollback snapshots kept: each rollback makes one, so they would pile up


class SnapshotLike(Protocol):
    name: str
    kind: str
    created_at: float
    verification: dict[str, Any] | None


def _ok(s: SnapshotLike) -> bool:
    return bool(s.verification and s.verification.get("ok"))


def _corrupt(s: SnapshotLike) -> bool:
    return s.verification is not None and not s.verification.get("ok")


def snapshots_to_remove(snapshots: Iterable[SnapshotLike], now: float, keep_daily: int, keep_weekly: int,
                        tz: tzinfo | None = None) -> list[str]:
    """Names of the scheduled snapshots retention removes, oldest first.

    Each rule on its own, the union kept (restic's and borg's semantics): the newest scheduled
    snapshot of each of the last `keep_daily` days that have one, and the newest of each of the last
    `keep_weekly` ISO weeks that have one. Days are calendar days in `tz` (None: local time, as
    `snapshots.daily_at` is). Also kept: the newest verified snapshot, and anything dated after
    `now` (a clock that went back). A corrupt snapshot never fills a day's or a week's slot, so it
    cannot push out a good one; it is kept while it is newer than the oldest kept one, for
    inspection, and goes after that.
    """
    snapshots = list(snapshots)
    scheduled = sorted((s for s in snapshots if s.kind == "scheduled"), key=lambda s: (s.created_at, s.name),
                       reverse=True)
    keep: set[str] = set()
    usable = [s for s in scheduled if not _corrupt(s) and s.created_at <= now]
    for count, bucket in ((keep_daily, lambda d: d), (keep_weekly, lambda d: d.isocalendar()[:2])):
        seen: list[Any] = []
        for s in usable:  # newest first: the first of each bucket is its newest
            key = bucket(datetime.fromtimestamp(s.created_at, tz).date())
            if key in seen:
                continue
            if len(seen) >= count:
                break
            seen.append(key)
            keep.add(s.name)
    verified = [s for s in snapshots if _ok(s)]
    if verified:
        keep.add(max(verified, key=lambda s: (s.created_at, s.name)).name)
    kept_times = [s.created_at for s in usable if s.name in keep]
    oldest_kept = min(kept_times) if kept_times else None
    remove = []
    for s in reversed(scheduled):
        if s.name in keep or s.created_at > now:
            continue
        if _corrupt(s) and (oldest_kept is None or s.created_at > oldest_kept):
            continue
        remove.append(s.name)
    return remove


def pre_rollback_to_remove(snapshots: Iterable[SnapshotLike], keep: int = PRE_ROLLBACK_KEPT) -> list[str]:
    """Names of the pre-rollback snapshots past the newest `keep`, oldest first."""
    pre = sorted((s for s in snapshots if s.kind == "pre-rollback"), key=lambda s: (s.created_at, s.name))
    return [s.name for s in pre[: max(0, len(pre) - keep)]]


def versions_to_prune(versions: Iterable[str], current_version: str | None, snapshot_sources: Iterable[str],
                      in_use: Iterable[str] = ()) -> list[str]:
    """Model versions that may be deleted: not current, no snapshot's source, not in use (the model
    an active job started from, a restore in progress). Never the current one."""
    protected = {current_version, *snapshot_sources, *in_use} - {None}
    return sorted(v for v in versions if v not in protected)
