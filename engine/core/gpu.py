"""The GPUs as the daemon sees them, through NVML (`pynvml`, from nvidia-ml-py).

NVML reads the driver directly: no CUDA context, no torch, milliseconds a call,
so the daemon can watch GPU memory without ever importing torch. Where there is
no NVIDIA driver, library or device, the monitor runs in "cpu" mode and says
why in one line; nothing here raises on a machine without a GPU, and a device
that stops answering mid-run is reported in the sample, not raised.

NVML calls can block (a lost GPU may take seconds to answer), so the daemon
should call `sample` and `preflight` from a thread, not from its event loop.
"""

from __future__ import annotations

import copy
import os
import threading
import time
from collections.abc import Callable, Collection
from typing import Any

from engine.core.resources import format_bytes

HINT = "Hint: check `nvidia-smi`; the driver may need a restart"

# Errors that mean the device (or the driver) no longer answers, as opposed to one field
# being unsupported on this model: the whole device is reported with an "error".
_FATAL_NAMES = ("GPU_IS_LOST", "RESET_REQUIRED", "DRIVER_NOT_LOADED", "UNINITIALIZED", "TIMEOUT",
                "IRQ_ISSUE", "LIB_RM_VERSION_MISMATCH")

_FROM_ENV = object()


def _describe(err: BaseException) -> str:
    try:
        text = str(err)
    except Exception:  # pynvml's __str__ asks the library, which may be gone
        text = ""
    return text or type(err).__name__


def parse_visible_devices(value: str | None) -> list[int | str] | None:
    """CUDA_VISIBLE_DEVICES as NVML selectors: ints are indices, "GPU-..." are UUID prefixes.

    None means every device. Like CUDA, parsing stops at the first entry that is not a
    device. A MIG entry cannot be mapped to a whole GPU here, so it means every device.
    Integer indices are CUDA's order; NVML counts in PCI bus order, which CUDA's default
    order matches on machines with identical GPUs (set CUDA_DEVICE_ORDER=PCI_BUS_ID to be sure).
    """
    if value is None:
        return None
    selected: list[int | str] = []
    for token in (t.strip() for t in value.split(",")):
        if token.startswith("MIG-"):
            return None
        if token.startswith("GPU-"):
            selected.append(token)
            continue
        try:
            index = int(token)
        except ValueError:
            break
        if index < 0:
            break
        selected.append(index)
    return selected


class GpuMonitor:
    """Samples NVML devices for the status document and checks them before a job starts.

    `mode` is "gpu" when NVML started and selected at least one device, else "cpu",
    with `reason` saying why in words a user can act on. `sample()` is rate-limited
    to one NVML read per `min_interval` seconds; callers get a copy of the cached
    result in between. Call `close()` (or use it as a context manager) when done.
    """

    def __init__(self, min_interval: float = 1.0, *, visible_devices: Any = _FROM_ENV) -> None:
        self.min_interval = min_interval
        self.mode = "cpu"
        self.reason: str | None = None
        self._nvml: Any = None
        self._indices: list[int] = []
        self._lock = threading.Lock()
        self._cached: dict | None = None
        self._cached_at = 0.0
        if visible_devices is _FROM_ENV:
            visible_devices = os.environ.get("CUDA_VISIBLE_DEVICES")
        selectors = parse_visible_devices(visible_devices) if isinstance(visible_devices, str | None) \
            else list(visible_devices)
        self._start(selectors)

    # -- start and stop ------------------------------------------------------------------------

    def _start(self, selectors: list[int | str] | None) -> None:
        try:
            import pynvml
        except ImportError:
            self.reason = "nvidia-ml-py (pynvml) is not installed"
            return
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as err:
            self.reason = self._init_reason(pynvml, err)
            return
        except Exception as err:  # an odd ctypes or OS failure must not take the daemon down
            self.reason = f"NVML failed to start ({_describe(err)})"
            return
        self._nvml = pynvml
        try:
            count = pynvml.nvmlDeviceGetCount()
            indices = self._select(count, selectors)
        except pynvml.NVMLError as err:
            self._shutdown()
            self.reason = f"NVML could not list devices ({_describe(err)})"
            return
        if count == 0:
            self._shutdown()
            self.reason = "no NVIDIA GPU found"
            return
        if not indices:
            self._shutdown()
            self.reason = "CUDA_VISIBLE_DEVICES selects no GPU"
            return
        self._indices = indices
        self.mode = "gpu"

    @staticmethod
    def _init_reason(pynvml: Any, err: BaseException) -> str:
        value = getattr(err, "value", None)
        known = {
            "LIBRARY_NOT_FOUND": "no NVIDIA driver (libnvidia-ml.so.1 not found)",
            "DRIVER_NOT_LOADED": "NVIDIA driver is not loaded",
            "NO_PERMISSION": "no permission to use the NVIDIA driver",
            "LIB_RM_VERSION_MISMATCH": "NVIDIA driver and library versions differ (a driver update needs a reboot)",
        }
        for name, text in known.items():
            if value is not None and value == getattr(pynvml, f"NVML_ERROR_{name}", object()):
                return text
        return f"NVML failed to start ({_describe(err)})"

    def _select(self, count: int, selectors: list[int | str] | None) -> list[int]:
        if selectors is None:
            return list(range(count))
        chosen: list[int] = []
        uuids: dict[int, str] = {}
        for sel in selectors:
            if isinstance(sel, int):
                if 0 <= sel < count and sel not in chosen:
                    chosen.append(sel)
                continue
            for index in range(count):
                if index not in uuids:
                    try:
                        handle = self._nvml.nvmlDeviceGetHandleByIndex(index)
                        uuids[index] = _text(self._nvml.nvmlDeviceGetUUID(handle))
                    except self._nvml.NVMLError:
                        uuids[index] = ""
                if uuids[index] and uuids[index].startswith(sel) and index not in chosen:
                    chosen.append(index)
                    break
        return chosen

    def _shutdown(self) -> None:
        nvml, self._nvml = self._nvml, None
        if nvml is None:
            return
        try:
            nvml.nvmlShutdown()
        except Exception:
            pass  # shutting down a library whose driver went away: nothing left to release

    def close(self) -> None:
        """Release NVML. The monitor reports "cpu" afterwards."""
        with self._lock:
            self._shutdown()
            if self.mode == "gpu":
                self.mode, self.reason = "cpu", "GPU monitor closed"
            self._cached = None

    def __enter__(self) -> GpuMonitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- sampling ------------------------------------------------------------------------------

    def sample(self, worker_pids: Collection[int] = (), *, force: bool = False) -> dict:
        """{"mode": "gpu"|"cpu", "reason": str|None, "devices": [device, ...]}.

        A device: index (NVML's, as nvidia-smi numbers them), name, uuid, memory_total,
        memory_used, memory_free (bytes), utilization_percent, temperature_c, power_w,
        power_limit_w, worker_memory (bytes held on it by `worker_pids`) and error (None, or
        why the device stopped answering, with the other fields null). A field this device
        cannot report is null. In cpu mode `devices` is empty and `reason` says why.

        Within `min_interval` of the previous read, the cached result is returned (even for
        other `worker_pids`) unless `force`. Never raises.
        """
        with self._lock:
            now = time.monotonic()
            if not force and self._cached is not None and now - self._cached_at < self.min_interval:
                return copy.deepcopy(self._cached)
            if self.mode != "gpu" or self._nvml is None:
                result = {"mode": "cpu", "reason": self.reason, "devices": []}
            else:
                result = self._read(set(worker_pids))
            self._cached, self._cached_at = result, now
            return copy.deepcopy(result)

    def _read(self, worker_pids: set[int]) -> dict:
        devices = []
        for index in self._indices:
            try:
                devices.append(self._read_device(index, worker_pids))
            except Exception as err:  # a bug or an odd binding failure: report it, keep the daemon
                devices.append(_device_with_error(index, f"NVML read failed ({_describe(err)})"))
        return {"mode": "gpu", "reason": None, "devices": devices}

    def _read_device(self, index: int, worker_pids: set[int]) -> dict:
        nvml = self._nvml
        fatal = {getattr(nvml, f"NVML_ERROR_{n}") for n in _FATAL_NAMES if hasattr(nvml, f"NVML_ERROR_{n}")}
        device = _device_with_error(index, None)
        try:
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                mem = nvml.nvmlDeviceGetMemoryInfo(handle)
            except nvml.NVMLError as err:
                # Memory is what the daemon needs; a device that cannot say it is not usable.
                raise _DeviceLost(err) from err

            def field(fn: Callable[[], Any]) -> Any:
                try:
                    return fn()
                except nvml.NVMLError as err:
                    if getattr(err, "value", None) in fatal:
                        raise _DeviceLost(err) from err
                    return None  # NotSupported, NoPermission...: this model cannot say
                except (AttributeError, getattr(nvml, "NVMLLibraryMismatchError", AttributeError)):
                    return None

            device.update(
                name=field(lambda: _text(nvml.nvmlDeviceGetName(handle))),
                uuid=field(lambda: _text(nvml.nvmlDeviceGetUUID(handle))),
                memory_total=int(mem.total),
                memory_used=int(mem.used),
                memory_free=int(mem.free),
                utilization_percent=field(lambda: int(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)),
                temperature_c=field(lambda: int(_versioned(
                    nvml, ("nvmlDeviceGetTemperature", "nvmlDeviceGetTemperatureV"),
                    handle, nvml.NVML_TEMPERATURE_GPU))),
                power_w=field(lambda: _milliwatts(nvml.nvmlDeviceGetPowerUsage(handle))),
                power_limit_w=field(lambda: _milliwatts(nvml.nvmlDeviceGetEnforcedPowerLimit(handle))),
                worker_memory=field(lambda: _worker_memory(nvml, handle, worker_pids)),
            )
        except _DeviceLost as lost:
            device["error"] = _describe(lost.err)
        return device

    # -- preflight -----------------------------------------------------------------------------

    def preflight(self, min_free_bytes: int, worker_pids: Collection[int] = ()) -> str | None:
        """None when a job may start on the GPUs (always, in cpu mode), else a sentence saying why not.

        Every selected device must answer and have `min_free_bytes` free; memory already held
        by `worker_pids` (a warm worker that will run the job) counts as free.
        """
        snap = self.sample(worker_pids, force=True)
        if snap["mode"] != "gpu":
            return None
        if snap["reason"]:
            return f"GPU unavailable: {snap['reason']}. {HINT}"
        for dev in snap["devices"]:
            if dev.get("error"):
                return f"GPU unavailable: device {dev['index']}: {dev['error']}. {HINT}"
        for dev in snap["devices"]:
            free = (dev["memory_free"] or 0) + (dev["worker_memory"] or 0)
            if free < min_free_bytes:
                return (f"GPU unavailable: device {dev['index']} has {format_bytes(free)} free, "
                        f"{format_bytes(min_free_bytes)} required by gpu.min_free_memory")
        return None


class _DeviceLost(Exception):
    def __init__(self, err: BaseException) -> None:
        super().__init__(_describe(err))
        self.err = err


def _device_with_error(index: int, error: str | None) -> dict:
    return {"index": index, "name": None, "uuid": None, "memory_total": None, "memory_used": None,
            "memory_free": None, "utilization_percent": None, "temperature_c": None, "power_w": None,
            "power_limit_w": None, "worker_memory": None, "error": error}


def _text(value: str | bytes) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _milliwatts(value: int) -> float:
    return round(value / 1000.0, 1)


def _versioned(nvml: Any, names: tuple[str, ...], *args: Any) -> Any:
    """Call the first of `names` that this pynvml and this driver both have."""
    missing: tuple[type[BaseException], ...] = (AttributeError,)
    if hasattr(nvml, "NVMLLibraryMismatchError"):
        missing += (nvml.NVMLLibraryMismatchError,)
    not_found = getattr(nvml, "NVML_ERROR_FUNCTION_NOT_FOUND", None)
    last: BaseException | None = None
    for name in names:
        try:
            return getattr(nvml, name)(*args)
        except missing as err:
            last = err
        except nvml.NVMLError as err:
            if getattr(err, "value", None) != not_found:
                raise
            last = err
    assert last is not None
    raise last


def _worker_memory(nvml: Any, handle: Any, worker_pids: set[int]) -> int:
    """GPU bytes held on this device by the worker's processes.

    NVML reports host pids: inside a container with its own pid namespace they do not
    match ours, and the worker appears to hold nothing.
    """
    procs = _versioned(nvml, ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetComputeRunningProcesses_v3",
                              "nvmlDeviceGetComputeRunningProcesses_v2"), handle)
    total = 0
    for proc in procs:
        used = getattr(proc, "usedGpuMemory", None)
        if used is not None and _in_worker(getattr(proc, "pid", None), worker_pids):
            total += int(used)
    return total


def _in_worker(pid: int | None, worker_pids: set[int]) -> bool:
    """A worker's pid, or a process in its group (the ranks under engine.worker.launch)."""
    if pid is None:
        return False
    if pid in worker_pids:
        return True
    try:
        return os.getpgid(pid) in worker_pids
    except OSError:
        return False
