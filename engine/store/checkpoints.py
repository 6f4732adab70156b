"""Checkpoints of a job: which ones are complete, marking one complete, rotating them.

A job's checkpoints live in `run_dir/checkpoints/checkpoint-N/` (the Trainer's
own layout). A checkpoint counts only once `protocol.CHECKPOINT_MARKER` is in it:
the worker writes that file last, after every other file of the checkpoint is
fsynced, and records each file's size in it, so a checkpoint cut short by a
crash, or whose files were truncated since, is never resumed from.

Rollback (after an anomaly at step K): `rollback_base` finds the newest complete
checkpoint c < K, and `derive` makes a new complete `checkpoint-K` out of it: c's
files hard-linked (copied where links are refused), only `trainer_state.json`
rewritten with `global_step = K`, the marker last, recording `derived_from: c`
and `skipped: [c+1, K]`. Resuming from it, the Trainer restores c's weights,
optimizer, scheduler and RNG, skips the batches of steps 1..K, and goes on at
K+1: the batches of steps c+1..K, where the anomaly came from, are never trained.

Both the daemon and the worker use this module: it must never import torch or
transformers.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from engine.core import atomic, crashpoints, hashing
from engine.store import statefiles
from engine.core.protocol import CHECKPOINT_MARKER

CHECKPOINTS_DIR = "checkpoints"
TRAINER_STATE = "trainer_state.json"  # the Trainer's own: global_step is where a resume continues from
_NAME = re.compile(r"checkpoint-([0-9]+)")


def checkpoints_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR


def checkpoint_path(run_dir: str | os.PathLike, step: int) -> Path:
    return checkpoints_dir(run_dir) / f"checkpoint-{step}"


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
    return statefiles.read_or_none(Path(ckpt_dir) / CHECKPOINT_MARKER, statefiles.CHECKPOINT_MARKER)


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


def write_marker(ckpt_dir: str | os.PathLike, info: dict[str, Any],
                 known_hashes: dict[str, str] | None = None) -> dict[str, Any]:
    """Make a finished checkpoint count: fsync its files, then write the marker last.

    `info` (step, loss, time, ...) goes into the marker with the size of every file, and the hash of every
    pickle; `known_hashes` are those already taken (a sharded checkpoint's shards, by the ranks that wrote them,
    with hashing.algorithm()).
    """
    ckpt_dir = Path(ckpt_dir)
    files = fsync_tree(ckpt_dir)
    algo = hashing.algorithm()
    known = {rel: digest for rel, digest in (known_hashes or {}).items() if rel in files}
    pickles = [rel for rel in files if hashing.is_pickle(rel) and rel not in known]  # optimizer, scheduler, RNG
    marker = {**info, "files": files, "hash_algorithm": algo,
              "hashes": {**known, **hashing.hash_files(ckpt_dir, pickles, algo)}}
    crashpoints.reached("checkpoint")
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


def size_on_disk(ckpt_dir: str | os.PathLike) -> int:
    """Bytes of a complete checkpoint (its files as the marker lists them, and the marker); 0 if not complete."""
    marker = read_marker(ckpt_dir)
    if marker is None or not isinstance(marker.get("files"), dict):
        return 0
    try:
        own = (Path(ckpt_dir) / CHECKPOINT_MARKER).stat().st_size
    except OSError:
        own = 0
    return own + sum(size for size in marker["files"].values() if isinstance(size, int))


# --- rollback -----------------------------------------------------------------------------------


def _finite_loss(marker: dict[str, Any]) -> bool:
    loss = marker.get("loss")
    if loss is None:  # nothing logged yet when it was saved: the guard still checked every step before it
        return True
    return isinstance(loss, (int, float)) and not isinstance(loss, bool) and math.isfinite(loss)


def untrusted_pickles(ckpt_dir: Path) -> list[str]:
    """Pickled files of a complete checkpoint that do not hash to what its marker recorded.

    Unpickling runs code: a pickle is loaded only if traind wrote it, as far as
    the hash in the marker can tell. A marker with no hashes trusts no pickle.
    """
    marker = read_marker(ckpt_dir) or {}
    recorded = marker.get("hashes") or {}
    pickles = [rel for rel in marker.get("files", {}) if hashing.is_pickle(rel)]
    unrecorded = [rel for rel in pickles if rel not in recorded]
    try:
        return unrecorded + hashing.mismatched(ckpt_dir, recorded, marker.get("hash_algorithm", ""))
    except hashing.HashError:
        return pickles


def newest_trusted(run_dir: str | os.PathLike, before_step: int | None = None,
                   accept: Callable[[dict[str, Any]], bool] = lambda marker: True,
                   log: Callable[[str], None] = print) -> tuple[int, Path] | None:
    """The newest complete checkpoint (before `before_step`) whose pickles are intact and that `accept`s."""
    for step, path in reversed(complete_checkpoints(run_dir)):
        if before_step is not None and step >= before_step:
            continue
        if not accept(read_marker(path) or {}):
            continue
        bad = untrusted_pickles(path)
        if bad:
            log(f"not resuming from {path.name}: {', '.join(bad)} changed since traind wrote it")
            continue
        return step, path
    return None


def rollback_base(run_dir: str | os.PathLike, bad_step: int, log: Callable[[str], None] = print,
                  accept: Callable[[dict[str, Any]], bool] = lambda marker: True) -> tuple[int, Path] | None:
    """The newest trusted checkpoint before `bad_step` whose recorded loss is finite and that `accept`s (one the
    attempt can resume from); None: start from the model."""
    return newest_trusted(run_dir, bad_step, lambda marker: _finite_loss(marker) and accept(marker), log)


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)  # no copy: a checkpoint's files are never written again once it is complete
    except OSError:  # another filesystem, or one without hard links
        shutil.copy2(src, dst)


def derive(run_dir: str | os.PathLike, base_step: int, bad_step: int, *,
           populate: Callable[[Path], None] | None = None,
           trainer_state: dict[str, Any] | None = None) -> Path:
    """Make a complete `checkpoint-<bad_step>` that resumes with `checkpoint-<base_step>`'s state, past bad_step.

    base_step > 0: that checkpoint must be complete; its files are hard-linked
    (or copied), its trainer state rewritten with global_step = bad_step.
    base_step == 0 (no checkpoint before the anomaly): `populate(dir)` writes the
    starting model into the new directory, and `trainer_state` (the Trainer's
    state fields: train_batch_size, save_steps, ...) is written with
    global_step = bad_step. The marker is written last either way; a derive cut
    short leaves an incomplete checkpoint, which the next attempt removes.
    """
    if not 0 <= base_step < bad_step:
        raise ValueError(f"cannot derive checkpoint-{bad_step} from step {base_step}")
    target = checkpoint_path(run_dir, bad_step)
    if target.exists():
        if is_complete(bad_step, target):
            raise FileExistsError(f"{target} is already a complete checkpoint")
        remove_checkpoint(target)
    info: dict[str, Any] = {"step": bad_step, "loss": None, "loss_step": base_step}
    if base_step > 0:
        source = checkpoint_path(run_dir, base_step)
        marker = read_marker(source)
        if marker is None or not is_complete(base_step, source):
            raise ValueError(f"{source} is not a complete checkpoint")
        info.update(loss=marker.get("loss"), loss_step=marker.get("loss_step", base_step))
        state = json.loads((source / TRAINER_STATE).read_text())
        target.mkdir(parents=True)
        for rel in marker["files"]:
            if rel != TRAINER_STATE:
                _link_or_copy(source / rel, target / rel)
        if isinstance(state.get("epoch"), (int, float)) and state.get("global_step"):
            state["epoch"] = state["epoch"] * bad_step / state["global_step"]  # informational; the Trainer recomputes it
    else:
        if populate is None or trainer_state is None:
            raise ValueError("deriving from the starting model needs populate and trainer_state")
        target.mkdir(parents=True)
        populate(target)
        state = dict(trainer_state)
    state["global_step"] = bad_step
    # The Trainer's own format (it may hold NaN in a log history written with the guard off): plain json.
    atomic.write_bytes_atomic(target / TRAINER_STATE, (json.dumps(state, indent=2, sort_keys=True) + "\n").encode())
    write_marker(target, {**info, "time": time.time(), "derived_from": base_step,
                          "skipped": [base_step + 1, bad_step]})
    return target
