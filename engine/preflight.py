"""Will the next write fit? Size estimates and the disk check made before a job starts.

The worker makes the same check before each checkpoint and model save; the
daemon's check keeps a job from starting at all when its first checkpoint
could not be written. Sizes of complete checkpoints are cached: they never
change once marked complete.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from engine import checkpoints, jobs, models
from engine.resources import dir_size, disk_usage, format_bytes
from engine.workspace import Workspace

# Weights plus AdamW's two moments, plus RNG, scheduler and tokenizer files.
CHECKPOINT_TO_WEIGHTS = 3.1
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


@lru_cache(maxsize=64)
def _complete_size(path: Path) -> int:
    return dir_size(path)


def last_checkpoint_bytes(ws: Workspace, job: jobs.Job | None) -> int | None:
    """Size of the job's newest complete checkpoint, if it has one."""
    if job is None:
        return None
    newest = checkpoints.newest_complete(job.run_dir)
    return _complete_size(newest[1]) if newest else None


def weight_bytes(ws: Workspace) -> int | None:
    """Bytes of the current model's weight files, when it is a local directory."""
    try:
        path = Path(models.current_source(ws))
    except (FileNotFoundError, ValueError, KeyError):
        return None
    if not path.is_dir():
        return None
    return sum(p.stat().st_size for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file())


def checkpoint_estimate(ws: Workspace, job: jobs.Job | None) -> int:
    known = last_checkpoint_bytes(ws, job)
    if known is not None:
        return known
    return int((weight_bytes(ws) or 0) * CHECKPOINT_TO_WEIGHTS)


def disk_problem(ws: Workspace, job: jobs.Job | None, reserve: int) -> str | None:
    """None when the next checkpoint fits with the reserve left over, else the reason, for status and alerts."""
    estimate = checkpoint_estimate(ws, job)
    free = disk_usage(ws.root)["free"]
    need = estimate + reserve
    if free >= need:
        return None
    return (f"disk: need {format_bytes(need)} free on {ws.root}, have {format_bytes(free)} "
            f"(next checkpoint about {format_bytes(estimate)}, disk.reserve {format_bytes(reserve)})")
