"""Disk preflight: a checkpoint or model write starts only when it fits with the reserve left free.

Before every checkpoint save and before the final model, `DiskGate.wait_for_room`
compares the filesystem's free space (`statvfs`: f_bavail x f_frsize) with the
estimated size of the write plus the disk reserve (`spec.disk_reserve`, changed
live by `set_disk_reserve`). If it does not fit, the write is not started: the
worker emits `blocked`, holds at the step boundary (model in memory, every rank
waiting on rank 0's broadcast) and looks again every `RECHECK_SECONDS`, or at
once after a new reserve arrives; then `unblocked`, and the write goes ahead. A
stop while blocked gives up the write: the last complete checkpoint stays the
resume point, and no partial checkpoint is ever left because of a full disk.

Estimates: a checkpoint is the larger of the job's newest complete checkpoint
and 3 x the parameter bytes (weights + AdamW's two moments) + the small files
(tokenizer, trainer state, RNG); the final model is the parameter bytes + the
small files.

This module reads the disk and holds; it never writes a file.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from engine.store import checkpoints
from engine.worker.control import Commands, StopControl
from engine.worker.events import EventSink
from engine.worker.ranks import agree

POLL_SECONDS = 0.2  # how often rank 0 tells the others whether to go on (no collective times out)
RECHECK_SECONDS = 2.0
SMALL_FILES = 2**20  # trainer state, scheduler, RNG, configs
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt")
UNKNOWN_TOKENIZER_BYTES = 16 * 2**20


def free_bytes(path: str | os.PathLike) -> int:
    st = os.statvfs(existing_parent(path))
    return st.f_bavail * st.f_frsize


def existing_parent(path: str | os.PathLike) -> Path:
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def tokenizer_bytes(model_in: str) -> int:
    """What a model directory holds besides weights (tokenizer, configs); a guess for a hub id."""
    root = Path(model_in)
    if not root.is_dir():
        return UNKNOWN_TOKENIZER_BYTES
    total = 0
    for entry in root.rglob("*"):
        if entry.is_file() and not entry.name.endswith(WEIGHT_SUFFIXES):
            total += entry.stat().st_size
    return total


def human(n: int) -> str:
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


class DiskGate:
    def __init__(self, events: EventSink, commands: Commands, stop: StopControl, run_dir: str | os.PathLike,
                 param_bytes: int, small_bytes: int, rank0: bool):
        self.events, self.commands, self.stop = events, commands, stop
        self.run_dir = Path(run_dir)
        self.param_bytes, self.small_bytes = param_bytes, small_bytes + SMALL_FILES
        self.rank0 = rank0
        self.skipped = False  # the last checkpoint save was given up (a stop while blocked)
        self.held = False  # the last wait_for_room held (blocked) before it returned

    def checkpoint_bytes(self) -> int:
        newest = checkpoints.newest_complete(self.run_dir)
        last = checkpoints.size_on_disk(newest[1]) if newest else 0
        return max(last, 3 * self.param_bytes + self.small_bytes)

    def model_bytes(self) -> int:
        return self.param_bytes + self.small_bytes

    def _look(self, path: Path, write: int) -> tuple[bool, int, int]:
        need = write + self.commands.disk_reserve
        free = free_bytes(path)
        return free >= need, need, free

    def wait_for_room(self, device, path: str | os.PathLike, write: int, what: str, collective: bool = True) -> bool:
        """True once `write` bytes fit under `path` with the reserve left; False if a stop came first.

        Every rank calls it (collective) and gets the same answer; rank 0 alone
        looks at the disk and reports. `collective=False`: rank 0 alone calls it.
        """
        path = existing_parent(path)
        share = (lambda *v: agree(device, *v)) if collective else (lambda *v: tuple(int(x) for x in v))
        fits, need, free = self._look(path, write) if self.rank0 else (True, 0, 0)
        (fits,) = share(fits)
        self.held = not fits
        if fits:
            return True
        if self.rank0:
            reason = f"disk: need {human(need)} free on {path}, have {human(free)}"
            self._log(f"blocked before writing {what}: {reason} ({human(write)} to write + "
                      f"{human(self.commands.disk_reserve)} reserve)")
            self.events.emit("blocked", reason=reason, path=str(path), need_bytes=need, free_bytes=free, what=what)
        looked = time.monotonic()
        while True:
            stop = False
            if self.rank0:
                self.commands.wait(POLL_SECONDS)
                if self.commands.take_disk_reserve_change() or time.monotonic() - looked >= RECHECK_SECONDS:
                    fits, need, free = self._look(path, write)
                    looked = time.monotonic()
                stop = self.stop.requested
            fits, stop = share(fits, stop)
            if fits:
                if self.rank0:
                    self._log(f"unblocked: {human(free)} free on {path}, writing {what}")
                    self.events.emit("unblocked", path=str(path), free_bytes=free)
                return True
            if stop:
                if self.rank0:
                    self._log(f"stop while blocked: {what} not written")
                return False

    @staticmethod
    def _log(message: str) -> None:
        print(f"traind-worker: {message}", flush=True)
