"""Checkpoints of a job: which ones are complete, marking one complete, rotating them.

A job's checkpoints live in `run_dir/checkpoints/checkpoint-N/` (the Trainer's
own layout). A checkpoint counts only once `protocol.CHECKPOINT_MARKER` is in it:
the worker writes that file last, after every other file of the checkpoint is
fsynced, and records each file's size in it, so a checkpoint cut short by a
crash, or whose files were truncated since, is never resumed from.

Both the daemon and the worker use this module: it must never import torch or
transformers.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

from engine import atomic
from engine.protocol import CHECKPOINT_MARKER

CHECKPOINTS_DIR = "checkpoints"
_NAME = re.compile(r"checkpoint-([0-9]+)")


def checkpoints_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR


def _all(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    try:
        entries = list(os.scandir(checkpoints_dir(run_dir)))
    except FileNotFoundError:
        return []
    out = []
    for entry in entries:
        m = _NAME.fullmatch(entry.name)
        if m and entry.is_dir(follow_symlinks=False):
            out.append((int(m.group(1)), Path(entry.path)))
    return sorted(out)


def read_marker(ckpt_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The marker's contents, or None when there is no readable marker."""
    try:
        data = atomic.read_json(Path(ckpt_dir) / CHECKPOINT_MARKER)
    except (FileNotFoundError, NotADirectoryError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_complete(step: int, ckpt_dir: Path) -> bool:
    """Marker present, for this step, and every file it lists still has its recorded size."""
    marker = read_marker(ckpt_dir)
    if marker is None or marker.get("step") != step:
        return False
    files = marker.get("files")
    if not isinstance(files, dict):
        return False
    for rel, size in files.items():
        try:
            if (ckpt_dir / rel).stat().st_size != size:
                return False
        except OSError:
            return False
    return True


def complete_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint, oldest first."""
    return [(s, p) for s, p in _all(run_dir) if is_complete(s, p)]


def incomplete_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint directory that is not complete, oldest first."""
    return [(s, p) for s, p in _all(run_dir) if not is_complete(s, p)]


def newest_complete(run_dir: str | os.PathLike) -> tuple[int, Path] | None:
    done = complete_checkpoints(run_dir)
    return done[-1] if done else None


def _files(ckpt_dir: Path) -> dict[str, int]:
    out = {}
    for root, dirs, names in os.walk(ckpt_dir):
        dirs.sort()
        for name in sorted(names):
            path = Path(root) / name
            rel = path.relative_to(ckpt_dir).as_posix()
            if rel == CHECKPOINT_MARKER or name.startswith(atomic.TEMP_PREFIX):
                continue
            out[rel] = path.stat().st_size
    return out


def fsync_tree(directory: str | os.PathLike) -> dict[str, int]:
    """fsync every file and folder under `directory`; returns {relative path: size}."""
    directory = Path(directory)
    for root, _dirs, names in os.walk(directory, topdown=False):
        for name in names:
            fd = os.open(Path(root) / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        atomic.fsync_dir(root)
    return _files(directory)


def write_marker(ckpt_dir: str | os.PathLike, info: dict[str, Any]) -> dict[str, Any]:
    """Make a finished checkpoint count: fsync its files, then write the marker last.

    `info` (step, loss, time, ...) goes into the marker with the size of every file.
    """
    ckpt_dir = Path(ckpt_dir)
    marker = {**info, "files": fsync_tree(ckpt_dir)}
    atomic.write_json_atomic(ckpt_dir / CHECKPOINT_MARKER, marker)
    atomic.fsync_dir(ckpt_dir.parent)
    return marker


def remove_checkpoint(ckpt_dir: str | os.PathLike) -> None:
    """Delete a checkpoint; its marker goes first, so a deletion cut short leaves an incomplete one."""
    ckpt_dir = Path(ckpt_dir)
    try:
        os.unlink(ckpt_dir / CHECKPOINT_MARKER)
        atomic.fsync_dir(ckpt_dir)
    except FileNotFoundError:
        pass
    shutil.rmtree(ckpt_dir, ignore_errors=True)


def remove_incomplete(run_dir: str | os.PathLike) -> list[Path]:
    """Delete every incomplete checkpoint (at the start of an attempt, when none can be in progress)."""
    removed = []
    for _step, path in incomplete_checkpoints(run_dir):
        remove_checkpoint(path)
        removed.append(path)
    return removed


def rotate(run_dir: str | os.PathLike, keep: int) -> list[Path]:
    """Keep the newest `keep` complete checkpoints; delete older complete ones and incomplete
    ones older than the newest complete (newer incomplete ones may be a save in progress)."""
    done = complete_checkpoints(run_dir)
    if not done:
        return []
    newest_step = done[-1][0]
    doomed = [p for _s, p in done[:-max(1, keep)]]
    doomed += [p for s, p in incomplete_checkpoints(run_dir) if s < newest_step]
    for path in doomed:
        remove_checkpoint(path)
    return doomed
