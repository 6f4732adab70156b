"""Anomaly guards: nothing non-finite is ever applied to the weights or saved.

- `NonFiniteGuard`: the Trainer subclass (trainer.py) hands it each
  micro-batch's loss and the gradient norm the Trainer computes anyway (tensors,
  no host sync); `GuardCallback.on_pre_optimizer_step` checks both with one sync
  and raises `Anomaly` *before* `optimizer.step()`, so the bad step is never
  applied, and nothing of it saved. Under fp16 the grad scaler owns overflowing
  gradients (it skips that step and lowers its scale), so only the loss is
  checked there.
- `SpikeDetector`: in `on_log`, a loss above `spike_factor` x the median of the
  last `spike_window` logged losses raises before that step's checkpoint.
- `nonfinite_tensor`: belt and braces before every checkpoint and the final
  model: every parameter and optimizer state tensor must be finite.

This module raises; __main__ reports (`anomaly` event, EXIT_ROLLBACK). It never
writes a file.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Iterable

import torch
from transformers import TrainerCallback

from engine.worker.errors import Anomaly, nonfinite_kind
from engine.worker.ranks import any_rank
from engine.worker.sharding import is_sharded, local

MIN_SPIKE_HISTORY = 3  # logged losses needed before a spike can be judged


class NonFiniteGuard:
    def __init__(self, check_grad_norm: bool = True):
        self.check_grad_norm = check_grad_norm
        self.loss: torch.Tensor | None = None  # sum of this optimizer step's micro-batch losses
        self.grad_norm: torch.Tensor | float | None = None

    def observe_loss(self, loss: torch.Tensor) -> None:
        loss = loss.detach().float().reshape(())
        self.loss = loss if self.loss is None else self.loss + loss  # NaN and inf survive a sum

    def observe_grad_norm(self, grad_norm) -> None:
        self.grad_norm = grad_norm

    def check(self, step: int) -> None:
        """Raise Anomaly if this step's loss or gradient norm is not finite (one host sync)."""
        loss, grad_norm = self.loss, self.grad_norm
        self.loss = self.grad_norm = None
        values = [] if loss is None else [loss]
        if self.check_grad_norm and grad_norm is not None:
            device = loss.device if loss is not None else None
            values.append(torch.as_tensor(grad_norm, dtype=torch.float32, device=device).reshape(()))
        if not values:
            return
        stacked = torch.stack([v.to(values[0].device) for v in values])
        if not bool(any_rank(~torch.isfinite(stacked).all())):
            return
        loss_value = float(loss) if loss is not None else None
        norm_value = float(grad_norm) if self.check_grad_norm and grad_norm is not None else None
        if all(v is None or math.isfinite(v) for v in (loss_value, norm_value)):
            shown = "loss or gradient norm on another rank"
        else:
            shown = f"loss {loss_value!r}, grad_norm {norm_value!r}"
        raise Anomaly(step, nonfinite_kind(loss_value, norm_value), loss_value, norm_value,
                      message=f"non-finite {shown} at step {step}: not applied")


class SpikeDetector:
    def __init__(self, factor: float, window: int):
        self.factor = factor
        self.history: deque[float] = deque(maxlen=window)

    def check(self, step: int, loss, grad_norm=None) -> None:
        if loss is None or not math.isfinite(loss):
            return  # non-finite losses are the other guard's (and never reach a log with it on)
        if len(self.history) >= MIN_SPIKE_HISTORY:
            median = statistics.median(self.history)
            if median > 0 and loss > self.factor * median:
                raise Anomaly(step, "spike", loss, grad_norm,
                              message=f"loss spike at step {step}: {loss!r} > {self.factor:g} x median {median:.6g} "
                                      f"of the last {len(self.history)} logged losses")
        self.history.append(float(loss))


class GuardCallback(TrainerCallback):
    """Runs the guards at their points of the loop. Listed before EventsCallback: a spike is not reported as a step."""

    def __init__(self, nonfinite: NonFiniteGuard | None, spikes: SpikeDetector | None):
        self.nonfinite, self.spikes = nonfinite, spikes

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.nonfinite is not None:
            self.nonfinite.check(state.global_step + 1)  # global_step counts applied steps: this is the next one

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.spikes is not None and logs and "loss" in logs:
            self.spikes.check(state.global_step, logs["loss"], logs.get("grad_norm"))


def _tensors(model: torch.nn.Module, optimizer) -> Iterable[tuple[str, torch.Tensor]]:
    for name, param in model.named_parameters():
        if param.requires_grad:  # a frozen base cannot change (and may be 4-bit integers)
            yield name, local(param.detach())
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the torch optimizer
    state = getattr(inner, "state", None) or {}
    for i, per_param in enumerate(state.values()):
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                yield f"optimizer state {i}.{key}", local(value.detach())


def nonfinite_tensor(model: torch.nn.Module, optimizer=None) -> tuple[str, str] | None:
    """(name, "nan"|"inf") of the first parameter or optimizer state tensor that is not finite, else None.

    Sharded (FSDP2), each rank looks at its own shards and the ranks agree: one
    that finds nothing while another does answers ("a shard on another rank",
    "nan"), so every rank raises at the same save.

    One host sync in the normal case: each tensor's fp32-accumulated sum is finite
    exactly when its elements are (NaN and inf propagate), short of a sum beyond
    3e38, which the exact per-element check below then clears. No temporary the
    size of a tensor is made unless a sum is not finite.
    """
    found = _nonfinite_here(list(_tensors(model, optimizer)))
    if not is_sharded(model):
        return found
    # the collective's device, not the parameters' (on the host with cpu_offload, which NCCL cannot reduce)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    flagged = bool(any_rank(torch.tensor(found is not None, device=device)))
    return ("a shard on another rank", "nan") if flagged and found is None else found


def _nonfinite_here(named: list[tuple[str, torch.Tensor]]) -> tuple[str, str] | None:
    if not named:
        return None
    device = named[0][1].device
    sums = torch.stack([torch.sum(t, dtype=torch.float32).to(device) for _, t in named])
    suspects = (~torch.isfinite(sums)).nonzero().flatten().tolist()
    for index in suspects:
        name, tensor = named[index]
        if not bool(torch.isfinite(tensor).all()):
            return name, "nan" if bool(torch.isnan(tensor).any()) else "inf"
    return None


def check_before_save(model: torch.nn.Module, optimizer, step: int, what: str) -> None:
    """Raise Anomaly rather than let a non-finite tensor reach `what` (a checkpoint or the final model)."""
    bad = nonfinite_tensor(model, optimizer)
    if bad is not None:
        name, kind = bad
        raise Anomaly(step, kind, message=f"{kind} in {name} at step {step}: {what} not written")
