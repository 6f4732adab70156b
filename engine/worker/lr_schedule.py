"""The learning rate of every step: a warm-up counted across the stream, times the shape of one file's schedule.

A stream is one long run cut into files. Its warm-up happens once, at the start
of the chain (`training.warmup_steps` optimizer steps, counted across files:
`JobSpec.chain_steps` is how many the model this job starts from has taken,
from its model marker); a later file starts at the peak. With
`training.warmup_per_file` every file warms up again from its own step 0
(re-warming, see docs/continual.md). Either way the warm-up is linear and
counted from one: the k-th step of it (from 0) runs at (k + 1) / (W + 1) of the
peak, as torchtitan's is, so no step ever trains at learning rate 0.

The shape within a file is transformers' own schedule (`lr_scheduler`), built
with no warm-up of its own: constant, linear or cosine decay over the file, or
warmup_stable_decay's anneal over the file's last `decay_fraction` of steps.
`constant` has no warm-up at all.

The steps are counted from the Trainer's own total, the `num_training_steps` it
hands `create_scheduler` (max_steps: the dataset's length, the effective batch
and the epochs), never from a checkpoint. So an attempt that resumes, or one
whose micro-batch auto_batch halved (same effective batch, same steps per
epoch), gets the same schedule as a function of the global step as an
uninterrupted run, and its loaded scheduler state (the step) means the same
thing. The rate is a pure function of (chain_steps, step), so nothing else
needs saving.

A rollback's checkpoint-K (checkpoints.derive) carries the scheduler of the
earlier checkpoint it was made from, while the Trainer goes on from step K: the
skipped steps count as taken, so `catch_up` moves the scheduler past them too,
and every schedule stays the same function of the global step.

This module only sizes, builds and moves the schedule; it never reads the config file.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

from torch.optim.lr_scheduler import LambdaLR
from transformers import SchedulerType, get_scheduler

from engine.store import checkpoints
from engine.core.config import TrainingConfig

WSD = SchedulerType.WARMUP_STABLE_DECAY.value
NO_WARMUP = SchedulerType.CONSTANT.value
DECAY_SHAPE = "1-sqrt"  # Hägele et al. 2024 found this cooldown shape better than a linear one
_SHAPES = {NO_WARMUP: "the peak throughout", SchedulerType.CONSTANT_WITH_WARMUP.value: "the peak after the warm-up",
           SchedulerType.LINEAR.value: "a linear decay to 0", SchedulerType.COSINE.value: "a cosine decay to 0"}


def decay_steps(total_steps: int, decay_fraction: float) -> int:
    """warmup_stable_decay's anneal: decay_fraction of the file's steps, rounded, at least one."""
    return min(total_steps, max(1, round(total_steps * decay_fraction)))


def warmup_factor(chain_step: int, warmup_steps: int) -> float:
    """The share of the peak at the warm-up's step `chain_step` (from 0): linear, never 0, 1 once it is done."""
    return 1.0 if chain_step >= warmup_steps else (chain_step + 1) / (warmup_steps + 1)


@dataclass(frozen=True)
class Schedule:
    """A job's learning-rate schedule: traind.toml's training keys and where the chain's warm-up stands."""

    kind: str  # training.lr_scheduler
    warmup_steps: int
    per_file: bool  # training.warmup_per_file
    chain_steps: int  # optimizer steps the chain took before this job
    decay_fraction: float
    min_lr_ratio: float

    @classmethod
    def of(cls, t: TrainingConfig, chain_steps: int) -> "Schedule":
        return cls(t.lr_scheduler, 0 if t.lr_scheduler == NO_WARMUP else t.warmup_steps, t.warmup_per_file,
                   chain_steps, t.decay_fraction, t.min_lr_ratio)

    def _shape(self, optimizer, total_steps: int):
        """transformers' schedule for one file, without a warm-up: its multiplier as a function of the file's step."""
        if self.kind not in (SchedulerType.LINEAR.value, SchedulerType.COSINE.value, WSD):
            return lambda step: 1.0
        specific = {}
        if self.kind == WSD:
            specific = {"num_decay_steps": decay_steps(total_steps, self.decay_fraction),
                        "min_lr_ratio": self.min_lr_ratio, "decay_type": DECAY_SHAPE}
        return get_scheduler(self.kind, optimizer, num_warmup_steps=0, num_training_steps=total_steps,
                             scheduler_specific_kwargs=specific).lr_lambdas[0]

    def create(self, optimizer, total_steps: int) -> LambdaLR:
        """The job's scheduler: the file's shape times the warm-up, which starts `chain_steps` into the chain (or
        at the file's start with warmup_per_file)."""
        shape, start = self._shape(optimizer, total_steps), 0 if self.per_file else self.chain_steps

        def multiplier(step: int) -> float:
            return warmup_factor(start + step, self.warmup_steps) * shape(step)

        return LambdaLR(optimizer, multiplier)

    def describe(self, total_steps: int) -> str:
        """One log line: the file's schedule, and where the warm-up stands."""
        what = _SHAPES.get(self.kind, self.kind)
        if self.kind == WSD:
            what = (f"the peak, then {decay_steps(total_steps, self.decay_fraction)} annealing ({DECAY_SHAPE}) to "
                    f"{self.min_lr_ratio:g} x the peak")
        if not self.warmup_steps:
            warm = "no warm-up"
        elif self.per_file:
            warm = f"{min(self.warmup_steps, total_steps)} warm-up steps at the file's start"
        else:
            done = min(self.chain_steps, self.warmup_steps)
            warm = (f"warm-up {done} of {self.warmup_steps} steps done before this file, "
                    f"{min(self.warmup_steps - done, total_steps)} in it")
        return f"learning rate: {self.kind} over {total_steps} steps: {what}; {warm}"


def skipped_steps(checkpoint: str | os.PathLike) -> int:
    """How many steps a rollback skipped to make this checkpoint (its marker's "skipped" [first, last]); 0 for
    a checkpoint the Trainer saved itself."""
    marker = checkpoints.read_marker(checkpoint) or {}
    if "derived_from" not in marker:
        return 0
    first, last = marker["skipped"]
    return last - first + 1


def catch_up(scheduler, steps: int) -> None:
    """Step the scheduler past `steps` skipped optimizer steps (none of which was taken)."""
    with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()": here, on purpose
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(steps):
            scheduler.step()
