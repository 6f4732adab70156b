"""Trainer callbacks: what traind adds to a Hugging Face training loop.

- `EventsCallback`: `job_start` when the loop begins, a `step` event and a
  `traind-worker: step N/M ...` log line per log (the Trainer's own printer of
  log dicts is removed), a summary line at the end.
- `StepControlCallback`: at each step boundary, a stop request (SIGTERM, or
  `stop` on stdin) makes the Trainer save a checkpoint and stop; a `checkpoint`
  request, or `every_minutes` passed since the last save, makes it save
  (`every_steps` is the Trainer's own `save_steps`); a `pause` request is noted
  for the hold after this step's log and save (trainer.py). Under torchrun rank
  0 decides and broadcasts, so every rank acts on the same step.
- `CompletenessCallback`: after the Trainer wrote checkpoint-N, fsync it, write
  the completeness marker last, report a `checkpoint` event, then rotate. The
  Trainer's own rotation is off (`save_total_limit=None`): it could delete the
  previous complete checkpoint before the new one is marked complete.
- `TestHooksCallback` (with `loss_scale` for trainer.py): fault injection for
  tests, off unless `spec.test_hooks` names a hook:
    `step_sleep_seconds` (float): sleep after every optimizer step, so a kill
        lands mid-job;
    `fail_at_step` (int): raise at the end of that step, before it is saved;
    `fail_times` (int, with fail_at_step or cuda_oom_at_step): fail only this
        many attempts of the job, counted in run_dir/test-hooks.json, so a
        retry can succeed;
    `inject_nonfinite` ({"step": K, "value": "nan"|"inf", "every": bool, "rank": R}):
        multiply step K's loss (every step's from K with every) by NaN or inf
        inside the training step, so it flows through backward for real (on rank
        R only, with "rank");
    `inject_loss_scale` ({"step": K, "factor": F}): multiply step K's loss by F
        (a crafted spike);
    `cuda_oom_at_step` (int): raise a real torch.cuda.OutOfMemoryError as step
        K begins;
    `gpu_memory_limit_bytes` (int): the most this process may allocate on its
        GPU (torch's per-process memory fraction): a smaller card, played;
    `gpu_check_error` (str): make the GPU check at start fail with this error;
    `eval_sleep_seconds` (float): sleep before each source of the final evaluation, so a kill lands in it.
    `samples_sleep_seconds` (float): sleep before answering the prompts, so a kill lands there.

No callback writes anywhere but the job's run directory, and none but rank 0
writes at all.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from engine.core import atomic
from engine.store import checkpoints
from engine.worker import sharding
from engine.worker.control import Commands, Interrupted, StopControl
from engine.worker.events import EventSink
from engine.worker.ranks import agree, distributed

TEST_HOOKS = {"step_sleep_seconds": (int, float), "fail_at_step": int, "fail_times": int,
              "inject_nonfinite": dict, "inject_loss_scale": dict, "cuda_oom_at_step": int, "gpu_check_error": str,
              "eval_sleep_seconds": (int, float), "gpu_memory_limit_bytes": int, "samples_sleep_seconds": (int, float)}


def _finite(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _shown(value: Any, fmt: str) -> str:
    """A logged number for a log line: formatted, 'nan' or 'inf' as it was, '-' when there is none."""
    if value is None:
        return "-"
    try:
        return format(float(value), fmt)
    except (TypeError, ValueError):
        return str(value)


def log_line(message: str) -> None:
    print(f"traind-worker: {message}", flush=True)


class LossTracker:
    """The most recently logged loss, shared by the callbacks that report it."""

    def __init__(self) -> None:
        self.loss: float | None = None
        self.step = 0


class EventsCallback(TrainerCallback):
    def __init__(self, events: EventSink, job_id: str, examples: int, tokens: int, tracker: LossTracker,
                 extra: dict[str, Any] | None = None):
        self.events, self.job_id, self.examples, self.tokens = events, job_id, examples, tokens
        self.tracker = tracker
        self.extra = extra or {}
        self._mark = (time.monotonic(), 0)

    def restart_clock(self, state) -> None:
        """After a hold (paused, blocked): tokens/s counts training time only."""
        self._mark = (time.monotonic(), state.num_input_tokens_seen)

    def on_train_begin(self, args, state, control, **kwargs):
        self._mark = (time.monotonic(), state.num_input_tokens_seen)
        if state.is_world_process_zero:
            self.events.emit("job_start", job_id=self.job_id, total_steps=state.max_steps,
                             resumed_from_step=state.global_step, examples=self.examples, tokens=self.tokens,
                             **self.extra)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs:  # the closing summary (train_runtime, ...) is for the log file only
            if logs and "train_runtime" in logs and state.is_world_process_zero:
                log_line(f"trained to step {state.global_step} in {_shown(logs['train_runtime'], '.1f')}s, mean loss "
                         f"{_shown(logs.get('train_loss'), '.4f')}")
            return
        now, seen = time.monotonic(), state.num_input_tokens_seen
        then, seen_then = self._mark
        self._mark = (now, seen)
        loss = _finite(logs.get("loss"))
        self.tracker.loss, self.tracker.step = loss, state.global_step
        if state.is_world_process_zero:
            lr, grad_norm = _finite(logs.get("learning_rate")), _finite(logs.get("grad_norm"))
            tokens_per_s = (seen - seen_then) / (now - then) if now > then else None
            self.events.emit("step", step=state.global_step, total_steps=state.max_steps, epoch=state.epoch,
                             loss=loss, learning_rate=lr, grad_norm=grad_norm, tokens_per_s=tokens_per_s,
                             tokens_seen=seen)
            log_line(f"step {state.global_step}/{state.max_steps} loss {_shown(logs.get('loss'), '.4f')} "
                     f"lr {_shown(lr, '.3g')} grad norm {_shown(logs.get('grad_norm'), '.3g')} "
                     f"{_shown(tokens_per_s, ',.0f')} tokens/s")


class StepControlCallback(TrainerCallback):
    def __init__(self, stop: StopControl, commands: Commands, every_minutes: float):
        self.stop = stop
        self.commands = commands
        self.every_seconds = every_minutes * 60.0
        self._last_save = time.monotonic()
        self.stopped_at: int | None = None
        self.pause_pending = False  # agreed at this step's end; the hold comes after its log and save

    def on_train_begin(self, args, state, control, **kwargs):
        (stop,) = agree(args.device, self.stop.requested)
        if stop:  # asked (on stdin) while loading: nothing to save yet, every rank leaves
            raise Interrupted(self.stop.signal_name or "stop")
        self.stop.defer()  # from here on a stop request waits for the step boundary, where we can save
        self._last_save = time.monotonic()

    def on_step_end(self, args, state, control, **kwargs):
        rank0 = args.process_index == 0
        due = time.monotonic() - self._last_save >= self.every_seconds
        asked = self.commands.take_checkpoint() if rank0 else False
        stop, save, pause = agree(args.device, self.stop.requested, due or asked, self.commands.pause)
        if stop:
            self.stopped_at = state.global_step
            control.should_save = True
            control.should_training_stop = True
        elif save:
            control.should_save = True
        self.pause_pending = bool(pause) and not stop
        return control

    def on_save(self, args, state, control, **kwargs):
        self._last_save = time.monotonic()


class CompletenessCallback(TrainerCallback):
    def __init__(self, events: EventSink, run_dir: str | Path, keep: int, tracker: LossTracker, gate):
        self.events, self.run_dir, self.keep, self.tracker = events, Path(run_dir), keep, tracker
        self.gate = gate  # disk.DiskGate: `skipped` when a stop came while the disk was full

    def on_save(self, args, state, control, **kwargs):
        if self.gate.skipped:  # nothing was written: nothing to mark
            return
        step = state.global_step
        ckpt = Path(args.output_dir) / f"checkpoint-{step}"
        known: dict[str, str] = {}
        if distributed():
            # Every rank has written its part (its RNG state, its shard) before the marker says "complete"; a
            # sharded checkpoint's shards are hashed by the ranks that wrote them, at once, not all by rank 0.
            own = sharding.own_shard_hashes(ckpt, state.is_world_process_zero, args.process_index)
            gathered: list[dict[str, str] | None] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, own)
            known = {rel: digest for part in gathered for rel, digest in (part or {}).items()}
        if not state.is_world_process_zero:
            return
        loss = self.tracker.loss  # the latest logged loss; loss_step says which step it was logged at
        checkpoints.write_marker(ckpt, {"step": step, "loss": loss, "loss_step": self.tracker.step,
                                        "time": time.time()}, known_hashes=known)
        self.events.emit("checkpoint", step=step, path=str(ckpt), loss=loss)
        log_line(f"saved checkpoint {ckpt.name} (complete)")
        for path in checkpoints.rotate(self.run_dir, self.keep):
            log_line(f"removed checkpoint {path.name}")


class TestHookFailure(RuntimeError):
    """Raised by the fail_at_step test hook."""


class TestHooksCallback(TrainerCallback):
    def __init__(self, hooks: dict[str, Any], run_dir: str | Path):
        self.hooks = validate_test_hooks(hooks)
        self.record = Path(run_dir) / "test-hooks.json"

    def _take_failure(self, state, key: str) -> int | None:
        """The number of this failure, or None when fail_times failures of this kind were already counted."""
        record = atomic.read_json(self.record) if self.record.exists() else {}
        done = record.get(key, 0)
        limit = self.hooks.get("fail_times")
        if limit is not None and done >= limit:
            return None
        if state.is_world_process_zero:
            atomic.write_json_atomic(self.record, {**record, key: done + 1})
        return done + 1

    def on_step_begin(self, args, state, control, **kwargs):
        step = state.global_step + 1
        if step == self.hooks.get("cuda_oom_at_step") and (n := self._take_failure(state, "cuda_oom")):
            raise torch.cuda.OutOfMemoryError(
                f"CUDA out of memory. Tried to allocate 2.00 GiB (test hook: cuda_oom_at_step={step}, failure {n})")

    def on_step_end(self, args, state, control, **kwargs):
        sleep = self.hooks.get("step_sleep_seconds")
        if sleep:
            time.sleep(sleep)
        if state.global_step == self.hooks.get("fail_at_step") and (n := self._take_failure(state, "failures")):
            raise TestHookFailure(f"test hook: fail_at_step={state.global_step} (failure {n})")


def loss_scale(hooks: dict[str, Any], step: int, rank: int = 0) -> float | None:
    """What the inject_nonfinite / inject_loss_scale hooks multiply step `step`'s loss by on this rank, if anything
    (inject_nonfinite's `rank`: on that rank only, so the others must learn it from the guard)."""
    bad = hooks.get("inject_nonfinite")
    if bad and bad.get("rank", rank) == rank and (step == bad["step"] or (bad.get("every") and step >= bad["step"])):
        return float(bad.get("value", "nan"))
    spike = hooks.get("inject_loss_scale")
    if spike and step == spike["step"]:
        return float(spike["factor"])
    return None


_DICT_HOOKS = {"inject_nonfinite": {"step": int, "value": str, "every": bool, "rank": int},
               "inject_loss_scale": {"step": int, "factor": (int, float)}}


def validate_test_hooks(hooks: dict[str, Any]) -> dict[str, Any]:
    """The hooks this worker knows; an unknown one is an error (a typo would silently test nothing)."""
    hooks = {k: v for k, v in hooks.items() if k != "fake"}  # tests/fake_worker.py's script, not ours
    for key, value in hooks.items():
        if key not in TEST_HOOKS:
            raise ValueError(f"unknown test hook {key!r}: expected one of {', '.join(TEST_HOOKS)}")
        if isinstance(value, bool) or not isinstance(value, TEST_HOOKS[key]):
            raise ValueError(f"test hook {key} = {value!r}: wrong type")
        for field, kind in _DICT_HOOKS.get(key, {}).items():
            given = value.get(field)
            if field == "step" and (isinstance(given, bool) or not isinstance(given, int)):
                raise ValueError(f"test hook {key} needs an integer step: {value!r}")
            if given is not None and (not isinstance(given, kind) or (kind is not bool and isinstance(given, bool))):
                raise ValueError(f"test hook {key}.{field} = {given!r}: wrong type")
        if key == "inject_nonfinite" and value.get("value", "nan") not in ("nan", "inf"):
            raise ValueError(f"test hook inject_nonfinite.value must be 'nan' or 'inf': {value!r}")
        if key == "inject_loss_scale" and "factor" not in value:
            raise ValueError(f"test hook inject_loss_scale needs a factor: {value!r}")
    return dict(hooks)
