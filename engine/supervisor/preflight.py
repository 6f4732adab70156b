"""Can the next attempt start? The disk and GPU-memory checks made before a job starts, and the wait for a model.

The worker makes the same disk check before each checkpoint and model save;
the daemon's check keeps a job from starting at all when its first checkpoint
could not be written. Sizes of complete checkpoints are cached: they never
change once marked complete.

The GPU-memory check compares engine/ops/memory.py's estimate for the job with
the free memory NVML reports on each GPU it will use; in CPU mode, or for a
model whose files do not say its shape, nothing is checked. With [distributed]
sharding = "fsdp" the estimate is a rank's; a replica that does not fit is
told whether fsdp would, on the job's ranks or on every GPU of the machine.

After a worker could not load the model (EXIT_MODEL_UNAVAILABLE), `ModelWait`
holds the next attempt, looking at the source once a minute: a local directory
must look loadable again (engine/core/model_check.py); a hub id is simply tried again.
"""

from __future__ import annotations

import time
from functools import lru_cache
from pathlib import Path
from typing import Any

from engine.core import config, model_check
from engine.ops import memory
from engine.store import checkpoints, jobs, models
from engine.core.resources import dir_size, disk_usage, format_bytes
from engine.store.workspace import Workspace

# Weights plus AdamW's two moments, plus RNG, scheduler and tokenizer files.
CHECKPOINT_TO_WEIGHTS = 3.1
FIRST_ADAPTER_TO_WEIGHTS = 0.02  # a LoRA adapter's size beside its base's, when the base's shape is unknown
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
MODEL_RECHECK_SECONDS = 60.0  # while the model is unavailable, how often its source is looked at again


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


def checkpoint_estimate(ws: Workspace, job: jobs.Job | None, adapter: dict[str, Any] | None = None) -> int:
    """The job's last checkpoint's size; else the current model's weights (an adapter's, when it goes on training
    one) times CHECKPOINT_TO_WEIGHTS; for a chain's first adapter, its trainable parameters in fp32 instead."""
    known = last_checkpoint_bytes(ws, job)
    if known is not None:
        return known
    if adapter and not adapter.get("adapter_in"):
        shaped = memory.estimate_job(adapter["base"]["path"], {}, adapter, "fp32")
        trained = shaped.trainable * 4 if shaped else (weight_bytes(ws) or 0) * FIRST_ADAPTER_TO_WEIGHTS
        return int(trained * CHECKPOINT_TO_WEIGHTS)
    return int((weight_bytes(ws) or 0) * CHECKPOINT_TO_WEIGHTS)


def disk_problem(ws: Workspace, job: jobs.Job | None, reserve: int, adapter: dict[str, Any] | None = None) -> str | None:
    """None when the next checkpoint fits with the reserve left over, else the reason, for status and alerts."""
    estimate = checkpoint_estimate(ws, job, adapter)
    free = disk_usage(ws.root)["free"]
    need = estimate + reserve
    if free >= need:
        return None
    return (f"disk: need {format_bytes(need)} free on {ws.root}, have {format_bytes(free)} "
            f"(next checkpoint about {format_bytes(estimate)}, disk.reserve {format_bytes(reserve)})")


def current_source(ws: Workspace) -> str | None:
    try:
        return models.current_source(ws)
    except (FileNotFoundError, ValueError, KeyError):
        return None


def gpu_memory_estimate(source: str, training: dict[str, Any], adapter: dict[str, Any] | None,
                        sharding: dict[str, Any] | None = None, ranks: int | None = None
                        ) -> tuple[memory.MemoryEstimate | None, int]:
    """The job's estimate (a rank's, with `sharding`), and the micro-batch it is for: with training.auto_batch, 1
    (where a CUDA OOM's retries could take it), since a job that fits at some batch should start and let them
    find it."""
    batch = 1 if training.get("auto_batch", True) else training.get("batch_size", 8)
    precision = "bf16" if training.get("precision", "auto") == "auto" else training["precision"]  # a GPU of this decade
    return memory.estimate_job(source, training, adapter, precision, batch_size=batch, sharding=sharding,
                               ranks=ranks), batch


FSDP = config.Config(distributed=config.DistributedConfig(sharding="fsdp")).sharding_plan()  # its defaults


def _free(device: dict[str, Any]) -> int:
    return device["memory_free"] + (device.get("worker_memory") or 0)  # a warm worker's memory is ours to take


def _fsdp_fit(source: str, training: dict[str, Any], adapter: dict[str, Any] | None, devices: list[dict[str, Any]],
              nodes: int) -> str | None:
    """For a replica that does not fit: the ranks on which fsdp would, as a sentence; None if none. Tried: the
    job's own ranks, then one rank on each GPU of this machine (as many on every other node)."""
    processes = max(1, training.get("processes", 1))
    for n in [processes] + ([len(devices)] if len(devices) > processes else []):
        if n * nodes < 2:  # one rank shards nothing
            continue
        estimate, _ = gpu_memory_estimate(source, dict(training, processes=n), adapter, FSDP, n * nodes)
        if estimate is not None and estimate.total + memory.CUDA_OVERHEAD <= min(_free(d) for d in devices[:n]):
            more = "" if n == processes else f" (training.processes = {n}, the GPUs this machine has)"
            return (f"it fits with distributed.sharding = 'fsdp' on {n * nodes} ranks{more}: about "
                    f"{format_bytes(estimate.total + memory.CUDA_OVERHEAD)} a rank")
    return None


def gpu_memory_problem(source: str | None, training: dict[str, Any], adapter: dict[str, Any] | None,
                       gpu_sample: dict[str, Any], sharding: dict[str, Any] | None = None,
                       nodes: int = 1) -> str | None:
    """None when the job's estimated peak fits in the free memory of every GPU it will use, else the reason.

    `training` and `adapter` are traind.toml's [training] and [adapter] sections as dicts (no [adapter]: full
    fine-tuning); `gpu_sample` is GpuMonitor.sample()'s, with the warm worker's pids, whose memory counts as free.
    `sharding` is Config.sharding_plan() and `nodes` distributed.nodes: with fsdp the estimate is a rank's, of
    training.processes x nodes ranks; a replica that does not fit is told where fsdp would.
    """
    if gpu_sample.get("mode") != "gpu" or source is None:
        return None
    devices = [d for d in gpu_sample.get("devices", []) if d.get("memory_free") is not None]
    processes, nodes = max(1, training.get("processes", 1)), max(1, nodes)
    used = devices[:processes]
    if not used:
        return None
    estimate, batch = gpu_memory_estimate(source, training, adapter, sharding, processes * nodes)
    if estimate is None:
        return None
    need = estimate.total + memory.CUDA_OVERHEAD
    device = min(used, key=_free)
    free = _free(device)
    if need <= free:
        return None
    at = " even at batch_size 1 (as far as training.auto_batch would go)" if training.get("auto_batch", True) else ""
    said = (f"GPU memory: needs about {format_bytes(need)}{' a rank' if estimate.sharding else ''}{at}, "
            f"GPU {device['index']} has {format_bytes(free)} free: ")
    why = f" (estimate {estimate.describe()}, plus {format_bytes(memory.CUDA_OVERHEAD)} for CUDA itself)"
    fit = _fsdp_fit(source, training, adapter, devices, nodes) if sharding is None else None
    if fit:
        return said + fit + why
    method = (adapter or {}).get("method", "full")
    tries = {"full": ["adapter.method = lora"], "lora": ["adapter.method = qlora"]}.get(method, [])
    if not training.get("gradient_checkpointing"):
        tries.append("training.gradient_checkpointing = true")
    tries.append(("distributed.sharding = 'fsdp' across" if sharding is None else "fsdp across")
                 + " more GPUs (training.processes, distributed.nodes)")
    if not (sharding or {}).get("cpu_offload"):
        tries.append("distributed.cpu_offload = true" + (" with fsdp" if sharding is None else ""))
    tries.append("a smaller training.batch_size" if batch > 1 else "a smaller training.max_seq_length")
    return said + f"try {', '.join(tries[:-1])} or {tries[-1]}" + why


class ModelWait:
    """The reason the model could not be loaded, held until a look at its source finds nothing wrong."""

    def __init__(self, recheck_seconds: float = MODEL_RECHECK_SECONDS) -> None:
        self.recheck_seconds = recheck_seconds
        self.reason: str | None = None
        self.next_look = 0.0

    def unavailable(self, reason: str) -> None:
        self.reason, self.next_look = reason, time.monotonic() + self.recheck_seconds

    def problem(self, ws: Workspace) -> str | None:
        """None once the wait is over (a local directory looks loadable, or a hub id's minute has passed)."""
        if self.reason is None or time.monotonic() < self.next_look:
            return self.reason
        problem = model_check.source_problem(models.current_source(ws))
        if problem is None:
            self.reason = None
        else:
            self.unavailable(problem)
        return problem
