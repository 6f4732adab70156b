"""Why a job stopped early, as exceptions that __main__ turns into an event and an exit code.

- `Anomaly`: a non-finite loss or gradient norm, a non-finite parameter about to
  be saved, or a loss spike -> `anomaly` event, EXIT_ROLLBACK. Raised before
  anything of that step is applied or saved.
- `GpuUnavailable`: the GPU check at start failed -> `error` (kind
  "gpu_unavailable"), EXIT_GPU_UNAVAILABLE.
- `ModelUnavailable`: the model or its tokenizer cannot be loaded (a missing or
  incomplete directory, a corrupt safetensors header, a hub id that cannot be
  fetched) -> `error` (kind "model_unavailable"), EXIT_MODEL_UNAVAILABLE. Raised
  only around loading, so a bug in training is never taken for it.
- A CUDA out-of-memory error is torch's own (`is_cuda_oom`) -> `error` (kind
  "cuda_oom"), EXIT_CUDA_OOM.

This module imports nothing heavy: __main__ catches these before it knows
whether torch imported.
"""

from __future__ import annotations

import math
from typing import Any


class Anomaly(Exception):
    def __init__(self, step: int, kind: str, loss: Any = None, grad_norm: Any = None, message: str = ""):
        self.step, self.kind, self.loss, self.grad_norm = step, kind, _number(loss), _number(grad_norm)
        self.message = message or f"{kind} at step {step}: loss {self.loss}, grad norm {self.grad_norm}"
        super().__init__(self.message)

    def event_fields(self) -> dict[str, Any]:
        """The `anomaly` event's fields: non-finite numbers become null (the raw value is in `message`)."""
        return {"step": self.step, "kind": self.kind, "loss": _finite(self.loss), "grad_norm": _finite(self.grad_norm),
                "message": self.message}


class GpuUnavailable(Exception):
    pass


class ModelUnavailable(Exception):
    """Its message starts with model_check.UNAVAILABLE ("model unavailable: ..."), as the daemon shows it."""


def nonfinite_kind(*values: Any) -> str:
    """"nan" or "inf": the kind of the first non-finite value (the loss before the gradient norm it caused)."""
    for v in values:
        if isinstance(v, float) and not math.isfinite(v):
            return "nan" if math.isnan(v) else "inf"
    return "nan"


def is_cuda_oom(error: BaseException) -> bool:
    return type(error).__name__ == "OutOfMemoryError" or (
        isinstance(error, RuntimeError) and "CUDA out of memory" in str(error))


def _number(value: Any) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None
