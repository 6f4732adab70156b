"""The Hugging Face Trainer, with what traind needs inside its step: guard feeds, save gate, holds.

`TraindTrainer` overrides these of the Trainer's own methods and nothing else:

- `compute_loss`: test hooks only (inject_nonfinite, inject_loss_scale) scale
  the loss before backward, so a NaN flows through the real gradient path.
- `training_step` / `_get_grad_norm`: hand each micro-batch's loss and the
  gradient norm the Trainer computes anyway to the `NonFiniteGuard` (tensors:
  no sync); `GuardCallback.on_pre_optimizer_step` checks them.
- `_save_checkpoint`: before writing checkpoint-N, every parameter and optimizer
  state tensor must be finite (else `Anomaly`), and the write must fit on disk
  (`DiskGate`: hold while it does not; a stop meanwhile gives the save up).
- `_maybe_log_save_evaluate`: after the step's log and save, hold while paused
  (`hold_if_paused`): a `paused` event, every rank waiting on rank 0's
  broadcast each `POLL_SECONDS`; a checkpoint request saves and stays paused, a
  stop saves and ends the loop, a resume emits `resumed` and goes on.
- `create_scheduler`: the chain's warm-up times the file's schedule
  (lr_schedule.py), which needs the job's `chain_steps`; a layer-wise
  optimizer keeps the Trainer's own scheduler.
- `_load_optimizer_and_scheduler`: resuming from a rollback's checkpoint, the
  scheduler is moved past the skipped steps, as the step count is.
- `_prepare_for_training`: the eval suite's figures of the starting model are
  measured here, once the Trainer has prepared the model for training, as its
  own `eval_on_start` is. An `evaluate()` before `train()` would prepare the
  model for evaluation only, and accelerate never prepares a model twice: with
  several ranks it would never be wrapped in DDP, and each rank would train a
  replica of its own on its share of the batches (the published model rank 0's).
- `_track_num_input_tokens`: a packed micro-batch has no attention_mask, and
  its padding is told by position (packing.real_tokens), not by token id.

With sharding = "fsdp" (engine/worker/sharding.py) they also say where the
state goes: `save_model` writes each rank's shard to a checkpoint (DCP) and
gathers the finished model once to rank 0; `_save_checkpoint` adds the
scheduler and every rank's RNG state, which the Trainer leaves out for a model
sharded outside it; `_load_from_checkpoint` and `_load_optimizer_and_scheduler`
read a sharded checkpoint (on any number of ranks, with or without sharding)
once the optimizer exists; `_wrap_model` never wraps the sharded model again;
`_defer_fsdp_gradient_reduction` reduce-scatters every micro-batch; and
`_get_grad_norm` takes the norm of the whole across the shards.

Rank 0 alone emits events and writes; every rank runs the same holds.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
from torch.distributed.tensor import DTensor
from transformers import Trainer
from transformers.optimization import LayerWiseDummyOptimizer
from transformers.trainer import SCHEDULER_NAME

from engine.store import checkpoints
from engine.worker import callbacks as cb
from engine.worker import lr_schedule, packing, sharding
from engine.worker.control import Commands, StopControl
from engine.worker.disk import DiskGate
from engine.worker.events import EventSink
from engine.worker.guard import NonFiniteGuard, check_before_save
from engine.worker.ranks import agree

POLL_SECONDS = 0.2  # while paused, rank 0 broadcasts this often (no collective times out, commands act fast)


class TraindTrainer(Trainer):
    def __init__(self, *args, guard: NonFiniteGuard | None, gate: DiskGate, step_control: cb.StepControlCallback,
                 events: EventSink, commands: Commands, stop: StopControl, hooks: dict[str, Any], suite=None,
                 eval_every: int = 0, schedule: lr_schedule.Schedule | None = None, sharded: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.sharded = sharded  # the model was sharded with FSDP2 before it was handed over (sharding.shard)
        self.guard, self.gate, self.step_control = guard, gate, step_control
        self.events, self.commands, self.stop, self.hooks = events, commands, stop, hooks
        self.suite, self.eval_every = suite, eval_every  # [eval] every_steps: the suite measured mid-file too
        self.before: dict[str, dict] | None = None  # the suite's figures of the starting model
        self.last_saved_step: int | None = None
        self.schedule = schedule

    # --- the learning-rate schedule -------------------------------------------------------------

    def create_scheduler(self, num_training_steps, optimizer=None):
        optimizer = optimizer or self.optimizer
        if self.lr_scheduler is None and self.schedule and not isinstance(optimizer, LayerWiseDummyOptimizer):
            self.lr_scheduler = self.schedule.create(optimizer, num_training_steps)
            self._created_lr_scheduler = True  # as the Trainer's own: made again on another train() call
            if self.args.process_index == 0:
                print(f"traind-worker: {self.schedule.describe(num_training_steps)}", flush=True)
        return super().create_scheduler(num_training_steps, optimizer)

    def _load_optimizer_and_scheduler(self, checkpoint):
        if checkpoint and sharding.is_sharded_checkpoint(checkpoint):
            sharding.load_checkpoint(checkpoint, self.model, self.optimizer)  # the model, not its DDP or compile wrapper
            scheduler = Path(checkpoint) / SCHEDULER_NAME  # hashed in the marker, like every pickle traind loads
            self.lr_scheduler.load_state_dict(torch.load(scheduler, weights_only=True))
        else:
            super()._load_optimizer_and_scheduler(checkpoint)
        skipped = lr_schedule.skipped_steps(checkpoint) if checkpoint else 0
        if skipped:
            lr_schedule.catch_up(self.lr_scheduler, skipped)

    def _prepare_for_training(self, max_steps, train_dataloader, resume_from_checkpoint):
        prepared = super()._prepare_for_training(max_steps, train_dataloader, resume_from_checkpoint)
        if self.suite is not None:  # only now: see the module docstring
            self.before = self.suite.before(self, self.events, self.args.process_index == 0)
        return prepared

    def _track_num_input_tokens(self, inputs):
        packed = "position_ids" in inputs and "attention_mask" not in inputs
        if packed and self.args.include_num_input_tokens_seen == "non_padding":
            seen = torch.as_tensor(packing.real_tokens(inputs), device=self.args.device, dtype=torch.int64)
            self.state.num_input_tokens_seen += self.accelerator.gather(seen).sum().item()
            return
        super()._track_num_input_tokens(inputs)

    # --- sharded state ---------------------------------------------------------------------------

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if sharding.is_sharded_checkpoint(resume_from_checkpoint):
            return  # read with the optimizer state, once the optimizer exists (_load_optimizer_and_scheduler)
        if self.sharded:
            return  # no sharded state: a rollback's checkpoint derived from the starting model, which is loaded
        super()._load_from_checkpoint(resume_from_checkpoint, model)

    def save_model(self, output_dir=None, _internal_call=False):
        if not self.sharded:
            return super().save_model(output_dir, _internal_call)
        if _internal_call:  # a checkpoint: each rank writes its own shard, nothing is gathered
            sharding.save_checkpoint(output_dir, self.model, self.optimizer)
            return
        # every rank takes part; rank 0 holds the whole (an adapter: its own weights, never the frozen base's)
        state = sharding.full_state_dict(self.model, trained_only=hasattr(self.model, "peft_config"))
        if self.args.process_index == 0:
            self.model.save_pretrained(output_dir, state_dict=state)
            self.processing_class.save_pretrained(output_dir)

    def _defer_fsdp_gradient_reduction(self):
        # Reduce-scatter every micro-batch, as torchtitan does: deferred, FSDP2 would keep each unit's whole
        # gradient (in fp32) on every rank until the last micro-batch, the memory sharding is there to save.
        return contextlib.nullcontext()

    def _wrap_model(self, model, training=True, dataloader=None):
        if self.sharded:
            return model  # the model owns its gradient reduction: never DataParallel or DDP on top
        return super()._wrap_model(model, training, dataloader)

    # --- the guard's feeds ---------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        scale = (cb.loss_scale(self.hooks, self.state.global_step + 1, self.args.process_index)
                 if self.hooks and model.training else None)
        if scale is None:
            return out
        if return_outputs:
            return out[0] * scale, out[1]
        return out * scale

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.guard is not None:
            self.guard.observe_loss(loss)
        return loss

    def _get_grad_norm(self, model, grad_norm=None):
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        if isinstance(grad_norm, DTensor):  # sharded gradients: the norm of the whole, on every rank (collective)
            grad_norm = grad_norm.full_tensor()
        if self.guard is not None:
            self.guard.observe_grad_norm(grad_norm)
        return grad_norm

    # --- saving: finite, and only when it fits --------------------------------------------------

    def _save_checkpoint(self, model, trial):
        step = self.state.global_step
        self.gate.skipped = False
        check_before_save(self.model, self.optimizer, step, f"checkpoint-{step}")
        if not self.gate.wait_for_room(self.args.device, checkpoints.checkpoints_dir(self.gate.run_dir),
                                       self.gate.checkpoint_bytes(), f"checkpoint-{step}"):
            self.gate.skipped = True
            self.step_control.stopped_at = step
            self.control.should_training_stop = True
            return
        if self.gate.held:
            self._restart_clocks()
        super()._save_checkpoint(model, trial)
        if self.sharded:  # what the Trainer leaves out for a model sharded outside it (save_only_model)
            output = checkpoints.checkpoint_path(self.gate.run_dir, step)
            if self.args.process_index == 0:
                torch.save(self.lr_scheduler.state_dict(), output / SCHEDULER_NAME)
            self._save_scaler(str(output))  # fp16's loss scale (nothing otherwise)
            self._save_rng_state(str(output))  # rng_state_RANK.pth, each rank its own
        self.last_saved_step = step

    def save_now(self, model, trial, asked: bool) -> None:
        """A checkpoint of this step, outside the Trainer's own schedule (a request while paused)."""
        step = self.state.global_step
        if self.last_saved_step == step:  # already saved at this step: answer a checkpoint request with it
            if asked and self.args.process_index == 0:
                path = checkpoints.checkpoint_path(self.gate.run_dir, step)
                marker = checkpoints.read_marker(path) or {}
                self.events.emit("checkpoint", step=step, path=str(path), loss=marker.get("loss"))
            return
        self._save_checkpoint(model, trial)
        self.control = self.callback_handler.on_save(self.args, self.state, self.control)

    # --- holding at a step boundary -------------------------------------------------------------

    def _maybe_log_save_evaluate(self, tr_loss, grad_norm, model, trial, *args, **kwargs):
        super()._maybe_log_save_evaluate(tr_loss, grad_norm, model, trial, *args, **kwargs)
        step = self.state.global_step
        if self.suite is not None and self.eval_every and step % self.eval_every == 0 and step < self.state.max_steps:
            self.suite.measure(self, list(self.suite.datasets), "during", self.events, self.args.process_index == 0)
        self.hold_if_paused(model, trial)

    def hold_if_paused(self, model, trial) -> None:
        if not self.step_control.pause_pending:
            return
        self.step_control.pause_pending = False
        if self.step_control.stopped_at is not None:  # a stop already decided (e.g. while the disk was full)
            return
        rank0 = self.args.process_index == 0
        step = self.state.global_step
        if rank0:
            print(f"traind-worker: paused at step {step}", flush=True)
            self.events.emit("paused", step=step)
        while True:
            if rank0:
                self.commands.wait(POLL_SECONDS)
            paused, stop, save = agree(self.args.device, self.commands.pause, self.stop.requested,
                                       self.commands.take_checkpoint() if rank0 else 0)
            given_up = False
            if stop or save:
                self.save_now(model, trial, asked=bool(save))
                given_up = self.gate.skipped  # a stop came while the disk was full
            if stop or given_up:
                self.step_control.stopped_at = step
                self.control.should_training_stop = True
                return
            if not paused:
                if rank0:
                    print(f"traind-worker: resumed at step {step}", flush=True)
                    self.events.emit("resumed", step=step)
                self._restart_clocks()
                return

    def _restart_clocks(self) -> None:
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, cb.EventsCallback):
                callback.restart_clock(self.state)
