"""warmup_stable_decay sized to one job: traind.toml's fraction made into transformers' step counts.

transformers' get_wsd_schedule takes its phases in steps, and traind.toml gives the
decay as a fraction of each file's steps (`training.decay_fraction`), since every
file has its own length. The steps are counted from the Trainer's own total, the
`num_training_steps` it hands `create_scheduler` (max_steps: the dataset's length,
the effective batch and the epochs), never from a checkpoint. So an attempt that
resumes, or one whose micro-batch auto_batch halved (same effective batch, same
steps per epoch), gets the same schedule as a function of the global step as an
uninterrupted run, and its loaded scheduler state (the step) means the same thing.

A rollback's checkpoint-K (checkpoints.derive) carries the scheduler of the
earlier checkpoint it was made from, while the Trainer goes on from step K: the
skipped steps count as taken, so `catch_up` moves the scheduler past them too,
and every schedule stays the same function of the global step (a file still
ends annealed after a rollback). This holds for every `lr_scheduler`.

This module only sizes, builds and moves the schedule; it never reads the config file.
"""

from __future__ import annotations

import os
import warnings

from transformers import SchedulerType, TrainingArguments, get_scheduler

from engine import checkpoints
from engine.config import TrainingConfig

WSD = SchedulerType.WARMUP_STABLE_DECAY.value
DECAY_SHAPE = "1-sqrt"  # Hägele et al. 2024 found this cooldown shape better than a linear one


def scheduler_kwargs(t: TrainingConfig) -> dict | None:
    """What TrainingArguments carries for the schedule: for warmup_stable_decay, the fraction (made into steps by
    `create`, once the total is known), the floor and the shape."""
    if t.lr_scheduler != WSD:
        return None
    return {"decay_fraction": t.decay_fraction, "min_lr_ratio": t.min_lr_ratio, "decay_type": DECAY_SHAPE}


def wsd_phases(total_steps: int, warmup_steps: int, decay_fraction: float) -> tuple[int, int, int]:
    """(warm-up, stable, decay) steps of a job of total_steps: the decay is decay_fraction of them, at least one;
    a file too short to hold the warm-up and the decay keeps the decay and has its warm-up cut, so every file
    ends annealed."""
    decay = min(total_steps, max(1, round(total_steps * decay_fraction)))
    warmup = min(warmup_steps, total_steps - decay)
    return warmup, total_steps - warmup - decay, decay


def create(args: TrainingArguments, optimizer, total_steps: int):
    """The job's warmup_stable_decay scheduler, from the arguments `scheduler_kwargs` filled in."""
    kwargs = dict(args.lr_scheduler_kwargs)
    warmup, _, decay = wsd_phases(total_steps, args.get_warmup_steps(total_steps), kwargs.pop("decay_fraction"))
    # get_scheduler (not get_wsd_schedule itself): it also handles the layer-wise optimizers
    return get_scheduler(WSD, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps,
                         scheduler_specific_kwargs={"num_decay_steps": decay, **kwargs})


def describe(args: TrainingArguments, total_steps: int) -> str:
    kwargs = args.lr_scheduler_kwargs
    warmup, stable, decay = wsd_phases(total_steps, args.get_warmup_steps(total_steps), kwargs["decay_fraction"])
    return (f"learning rate: warmup_stable_decay over {total_steps} steps: {warmup} warm-up, {stable} at the peak, "
            f"{decay} annealing ({kwargs['decay_type']}) to {kwargs['min_lr_ratio']:g} x the peak")


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
