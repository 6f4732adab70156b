"""GPU monitoring (real NVML where present, a fake NVML otherwise) and host resources: memory, disk, OOM kills."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from engine.core import resources
from engine.core.gpu import GpuMonitor, parse_visible_devices
from engine.core.resources import OomCounter, dir_size, disk_usage, format_bytes, machine_memory, process_group_rss

pynvml = pytest.importorskip("pynvml")

GiB = 2**30
DEVICE_KEYS = {"index", "name", "uuid", "memory_total", "memory_used", "memory_free", "utilization_percent",
               "temperature_c", "power_w", "power_limit_w", "worker_memory", "error"}


# ---------------------------------------------------------------------------------------------
# A fake NVML: the pynvml functions engine.core.gpu calls, answering for scripted devices.


class FakeNvml:
    def __init__(self, devices: list[dict]) -> None:
        self.devices = devices
        self.calls: dict[str, int] = {}
        self.initialized = False

    def _count(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1

    def _dev(self, handle: int, name: str) -> dict:
        self._count(name)
        dev = self.devices[handle]
        err = dev.get("fail", {}).get(name) or dev.get("fail", {}).get("*")
        if err is not None:
            raise pynvml.NVMLError(err)
        return dev

    def nvmlInit(self):
        self._count("nvmlInit")
        self.initialized = True

    def nvmlShutdown(self):
        self._count("nvmlShutdown")
        self.initialized = False

    def nvmlDeviceGetCount(self):
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index):
        self._dev(index, "nvmlDeviceGetHandleByIndex")
        return index

    def nvmlDeviceGetName(self, h):
        return self._dev(h, "nvmlDeviceGetName")["name"]

    def nvmlDeviceGetUUID(self, h):
        return self._dev(h, "nvmlDeviceGetUUID")["uuid"]

    def nvmlDeviceGetMemoryInfo(self, h):
        d = self._dev(h, "nvmlDeviceGetMemoryInfo")
        return SimpleNamespace(total=d["total"], used=d["used"], free=d["total"] - d["used"])

    def nvmlDeviceGetUtilizationRates(self, h):
        return SimpleNamespace(gpu=self._dev(h, "nvmlDeviceGetUtilizationRates")["util"], memory=0)

    def nvmlDeviceGetTemperature(self, h, sensor):
        assert sensor == pynvml.NVML_TEMPERATURE_GPU
        return self._dev(h, "nvmlDeviceGetTemperature")["temp"]

    def nvmlDeviceGetPowerUsage(self, h):
        return self._dev(h, "nvmlDeviceGetPowerUsage")["power_mw"]

    def nvmlDeviceGetEnforcedPowerLimit(self, h):
        return self._dev(h, "nvmlDeviceGetEnforcedPowerLimit")["limit_mw"]

    def nvmlDeviceGetComputeRunningProcesses(self, h):
        d = self._dev(h, "nvmlDeviceGetComputeRunningProcesses")
        if d.get("old_driver"):  # what pynvml raises when the driver lacks the _v3 symbol
            raise pynvml.NVMLLibraryMismatchError("Unversioned function called ...")
        return [SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in d["procs"]]

    def nvmlDeviceGetComputeRunningProcesses_v3(self, h):
        d = self._dev(h, "nvmlDeviceGetComputeRunningProcesses_v3")
        if d.get("old_driver"):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)
        return [SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in d["procs"]]

    def nvmlDeviceGetComputeRunningProcesses_v2(self, h):
        d = self._dev(h, "nvmlDeviceGetComputeRunningProcesses_v2")
        return [SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in d["procs"]]

    def install(self, monkeypatch) -> FakeNvml:
        for name in dir(self):
            if name.startswith("nvml"):
                monkeypatch.setattr(pynvml, name, getattr(self, name))
        return self


def two_devices() -> list[dict]:
    return [
        dict(name="NVIDIA H100 80GB HBM3", uuid="GPU-aaaa-0000", total=80 * GiB, used=10 * GiB, util=97, temp=61,
             power_mw=512_345, limit_mw=700_000, procs=[(4242, 9 * GiB), (999, GiB)]),
        dict(name=b"NVIDIA A10", uuid=b"GPU-bbbb-1111", total=24 * GiB, used=2 * GiB, util=0, temp=35,
             power_mw=60_000, limit_mw=150_000, procs=[(4243, 512 * 2**20), (4244, None)]),
    ]


@pytest.fixture
def fake_nvml(monkeypatch):
    return FakeNvml(two_devices()).install(monkeypatch)


# ---------------------------------------------------------------------------------------------
# CPU mode


def test_this_machine_samples_without_raising_and_cpu_mode_says_why():
    with GpuMonitor() as mon:
        snap = mon.sample({os.getpid()})
        assert snap["mode"] == mon.mode
        if snap["mode"] == "cpu":
            assert snap["reason"] and snap["devices"] == []
            assert mon.preflight(80 * GiB) is None  # nothing to check on a CPU
        else:  # a GPU machine: every device reports the documented fields
            assert snap["devices"] and all(set(d) == DEVICE_KEYS for d in snap["devices"])


@pytest.mark.parametrize("code, words", [
    (pynvml.NVML_ERROR_LIBRARY_NOT_FOUND, "no NVIDIA driver (libnvidia-ml.so.1 not found)"),
    (pynvml.NVML_ERROR_DRIVER_NOT_LOADED, "NVIDIA driver is not loaded"),
    (pynvml.NVML_ERROR_NO_PERMISSION, "no permission"),
    (pynvml.NVML_ERROR_UNKNOWN, "NVML failed to start (Unknown Error)"),
])
def test_nvml_init_failure_gives_cpu_mode_with_a_reason(monkeypatch, code, words):
    def fail():
        raise pynvml.NVMLError(code)

    monkeypatch.setattr(pynvml, "nvmlInit", fail)
    mon = GpuMonitor()
    snap = mon.sample()
    assert snap == {"mode": "cpu", "reason": mon.reason, "devices": []}
    assert words in snap["reason"]
    assert mon.preflight(GiB) is None
    mon.close()


def test_missing_pynvml_gives_cpu_mode(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml now raises ImportError
    snap = GpuMonitor().sample()
    assert snap["mode"] == "cpu" and "pynvml" in snap["reason"] and snap["devices"] == []


def test_no_devices_is_cpu_mode_and_releases_nvml(monkeypatch):
    fake = FakeNvml([]).install(monkeypatch)
    mon = GpuMonitor()
    assert mon.mode == "cpu" and mon.reason == "no NVIDIA GPU found"
    assert fake.calls.get("nvmlShutdown") == 1


# ---------------------------------------------------------------------------------------------
# A fake NVML with two devices


def test_two_devices_report_every_field(fake_nvml):
    mon = GpuMonitor(visible_devices=None)
    assert mon.mode == "gpu" and mon.reason is None
    snap = mon.sample({4242, 4243, 4244})
    assert snap["mode"] == "gpu" and snap["reason"] is None
    d0, d1 = snap["devices"]
    assert set(d0) == DEVICE_KEYS and set(d1) == DEVICE_KEYS
    assert d0 == {"index": 0, "name": "NVIDIA H100 80GB HBM3", "uuid": "GPU-aaaa-0000",
                  "memory_total": 80 * GiB, "memory_used": 10 * GiB, "memory_free": 70 * GiB,
                  "utilization_percent": 97, "temperature_c": 61, "power_w": 512.3, "power_limit_w": 700.0,
                  "worker_memory": 9 * GiB, "error": None}  # pid 999 is not ours
    # bytes names from older pynvml are decoded; a process whose usage NVML cannot see adds nothing
    assert d1["name"] == "NVIDIA A10" and d1["uuid"] == "GPU-bbbb-1111"
    assert d1["worker_memory"] == 512 * 2**20
    mon.close()
    assert fake_nvml.calls["nvmlShutdown"] == 1 and mon.sample()["mode"] == "cpu"


def test_unsupported_field_is_null_not_a_failure(monkeypatch):
    devs = two_devices()
    devs[0]["fail"] = {"nvmlDeviceGetPowerUsage": pynvml.NVML_ERROR_NOT_SUPPORTED,
                       "nvmlDeviceGetTemperature": pynvml.NVML_ERROR_NO_PERMISSION,
                       "nvmlDeviceGetComputeRunningProcesses": pynvml.NVML_ERROR_NOT_SUPPORTED}
    FakeNvml(devs).install(monkeypatch)
    d0 = GpuMonitor(visible_devices=None).sample({4242})["devices"][0]
    assert d0["power_w"] is None and d0["temperature_c"] is None and d0["worker_memory"] is None
    assert d0["error"] is None and d0["memory_free"] == 70 * GiB and d0["power_limit_w"] == 700.0


def test_older_driver_falls_back_to_older_process_query(monkeypatch):
    devs = two_devices()
    devs[0]["old_driver"] = True
    fake = FakeNvml(devs).install(monkeypatch)
    d0 = GpuMonitor(visible_devices=None).sample({4242})["devices"][0]
    assert d0["worker_memory"] == 9 * GiB
    assert fake.calls["nvmlDeviceGetComputeRunningProcesses_v2"] == 1


@pytest.mark.parametrize("where", ["nvmlDeviceGetMemoryInfo", "nvmlDeviceGetUtilizationRates",
                                   "nvmlDeviceGetHandleByIndex"])
def test_lost_gpu_is_reported_and_the_sample_still_returns(monkeypatch, where):
    fake = FakeNvml(two_devices()).install(monkeypatch)
    mon = GpuMonitor(visible_devices=None, min_interval=0)
    assert mon.sample()["devices"][1]["error"] is None
    fake.devices[1]["fail"] = {where: pynvml.NVML_ERROR_GPU_IS_LOST}
    snap = mon.sample()
    assert snap["mode"] == "gpu"
    assert snap["devices"][0]["error"] is None and snap["devices"][0]["memory_free"] == 70 * GiB
    lost = snap["devices"][1]
    assert lost["index"] == 1 and lost["error"] == "GPU is lost" and lost["memory_free"] is None
    assert mon.preflight(0) == ("GPU unavailable: device 1: GPU is lost. "
                                "Hint: check `nvidia-smi`; the driver may need a restart")


def test_sample_is_rate_limited(fake_nvml):
    mon = GpuMonitor(visible_devices=None, min_interval=60)
    first = mon.sample()
    reads = fake_nvml.calls["nvmlDeviceGetMemoryInfo"]
    fake_nvml.devices[0]["used"] = 50 * GiB
    again = mon.sample({4242})
    assert again == first and fake_nvml.calls["nvmlDeviceGetMemoryInfo"] == reads
    again["devices"].clear()  # callers get a copy: mutating it does not corrupt the cache
    assert mon.sample() == first
    forced = mon.sample(force=True)
    assert forced["devices"][0]["memory_used"] == 50 * GiB

    quick = GpuMonitor(visible_devices=None, min_interval=0.05)
    quick.sample()
    n = fake_nvml.calls["nvmlDeviceGetMemoryInfo"]
    time.sleep(0.06)
    quick.sample()
    assert fake_nvml.calls["nvmlDeviceGetMemoryInfo"] == n + 2  # both devices read again


def test_preflight_messages(fake_nvml):
    mon = GpuMonitor(visible_devices=None)
    assert mon.preflight(0) is None
    assert mon.preflight(20 * GiB) is None
    fake_nvml.devices[0]["used"] = 80 * GiB - int(3.1 * GiB)
    assert mon.preflight(8 * GiB) == \
        "GPU unavailable: device 0 has 3.1 GiB free, 8.0 GiB required by gpu.min_free_memory"
    # memory the warm worker already holds will be the job's: it counts as free
    assert mon.preflight(8 * GiB, worker_pids={4242}) is None
    fake_nvml.devices[0]["used"] = 10 * GiB
    assert mon.preflight(30 * GiB) == \
        "GPU unavailable: device 1 has 22.0 GiB free, 30.0 GiB required by gpu.min_free_memory"


def test_cuda_visible_devices_selects_what_the_worker_will_use(fake_nvml, monkeypatch):
    assert parse_visible_devices(None) is None
    assert parse_visible_devices("1,0") == [1, 0]
    assert parse_visible_devices("0,x,1") == [0]  # CUDA stops at the first bad entry
    assert parse_visible_devices("MIG-abc") is None

    assert [d["index"] for d in GpuMonitor(visible_devices="1").sample()["devices"]] == [1]
    assert [d["index"] for d in GpuMonitor(visible_devices="GPU-bbbb").sample()["devices"]] == [1]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    assert [d["index"] for d in GpuMonitor().sample()["devices"]] == [0]
    hidden = GpuMonitor(visible_devices="")
    assert hidden.mode == "cpu" and "CUDA_VISIBLE_DEVICES" in hidden.reason
    assert fake_nvml.calls["nvmlShutdown"] == 1  # the monitor that gave up released NVML


# ---------------------------------------------------------------------------------------------
# Host memory, disk


def test_process_group_rss_follows_a_live_group():
    child = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        deadline = time.monotonic() + 5
        while (rss := process_group_rss(child.pid)) is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert rss is not None and rss > 0
        assert process_group_rss(os.getpgrp()) > 0
    finally:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
    assert process_group_rss(child.pid) is None


def test_machine_memory_and_disk_usage(tmp_path):
    mem = machine_memory()
    assert mem["total"] >= mem["available"] > 0
    usage = disk_usage(tmp_path)
    st = os.statvfs(tmp_path)
    assert usage == {"path": str(tmp_path), "total": st.f_blocks * st.f_frsize, "free": st.f_bavail * st.f_frsize}


def test_dir_size_counts_hard_links_once_and_follows_no_links(tmp_path):
    root = tmp_path / "snap"
    (root / "sub").mkdir(parents=True)
    (root / "a.bin").write_bytes(b"x" * 1000)
    os.link(root / "a.bin", root / "sub" / "a-link.bin")
    (root / "sub" / "b.bin").write_bytes(b"y" * 24)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "big.bin").write_bytes(b"z" * 10_000)
    (root / "to-big").symlink_to(outside / "big.bin")
    (root / "to-outside").symlink_to(outside, target_is_directory=True)
    assert dir_size(root) == 1024
    assert dir_size(tmp_path / "missing") == 0


def test_format_bytes():
    assert format_bytes(0) == "0 B"
    assert format_bytes(1023) == "1023 B"
    assert format_bytes(int(3.1 * GiB)) == "3.1 GiB"
    assert format_bytes(8 * GiB) == "8.0 GiB"
    assert format_bytes(1536 * 2**20) == "1.5 GiB"
    assert format_bytes(2**20 - 1) == "1.0 MiB"
    assert format_bytes(-2 * 2**10) == "-2.0 KiB"


# ---------------------------------------------------------------------------------------------
# OOM kills: a fake cgroup tree


@pytest.fixture
def fake_roots(tmp_path, monkeypatch):
    proc, cg = tmp_path / "proc", tmp_path / "cgroup"
    proc.mkdir()
    cg.mkdir()
    monkeypatch.setattr(resources, "PROC_ROOT", proc)
    monkeypatch.setattr(resources, "CGROUP_ROOT", cg)
    return proc, cg


def write_events(path: Path, oom_kill: int) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "memory.events").write_text(f"low 0\nhigh 0\nmax 12\noom 1\noom_kill {oom_kill}\noom_group_kill 0\n")


def test_oom_counter_v2_rises_at_the_level_whose_limit_was_hit(fake_roots):
    proc, cg = fake_roots
    (proc / "123").mkdir()
    (proc / "123" / "cgroup").write_text("0::/traind.slice/worker\n")
    (cg / "cgroup.controllers").write_text("cpu memory\n")
    write_events(cg / "traind.slice", 2)
    write_events(cg / "traind.slice" / "worker", 0)

    counter = OomCounter.for_pid(123)
    assert counter.killed_by_oom() is False
    write_events(cg / "traind.slice", 3)  # the slice's limit was hit
    assert counter.killed_by_oom() is True

    counter = OomCounter.for_pid(123)
    write_events(cg / "traind.slice" / "worker", 1)
    assert counter.killed_by_oom() is True


def test_oom_counter_v1_memory_controller(fake_roots):
    proc, cg = fake_roots
    (proc / "7").mkdir()
    (proc / "7" / "cgroup").write_text("5:cpu,cpuacct:/\n4:memory:/docker/abc\n0::/\n")
    leaf = cg / "memory" / "docker" / "abc"
    leaf.mkdir(parents=True)
    (leaf / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 0\n")
    counter = OomCounter.for_pid(7)
    assert counter.baseline == {leaf / "memory.oom_control": 0}
    assert counter.killed_by_oom() is False
    (leaf / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 1\n")
    assert counter.killed_by_oom() is True


def test_oom_counter_without_cgroup_files_is_unknowable_or_uses_vmstat(fake_roots):
    proc, cg = fake_roots
    (proc / "9").mkdir()
    (proc / "9" / "cgroup").write_text("0::/\n")  # the v2 root has no memory.events
    assert OomCounter.for_pid(9).killed_by_oom() is None
    assert OomCounter.for_pid(424242).killed_by_oom() is None  # no such process

    (proc / "vmstat").write_text("pgfault 1\noom_kill 4\n")
    counter = OomCounter.for_pid(9)
    assert counter.killed_by_oom() is False
    (proc / "vmstat").write_text("pgfault 1\noom_kill 5\n")
    assert counter.killed_by_oom() is True


def test_oom_counter_when_the_cgroup_went_away_with_the_process(fake_roots):
    proc, cg = fake_roots
    (proc / "5").mkdir()
    (proc / "5" / "cgroup").write_text("0::/user.slice/run-1.scope\n")
    (cg / "cgroup.controllers").write_text("memory\n")
    write_events(cg / "user.slice", 0)
    write_events(cg / "user.slice" / "run-1.scope", 0)
    counter = OomCounter.for_pid(5)
    (cg / "user.slice" / "run-1.scope" / "memory.events").unlink()
    (cg / "user.slice" / "run-1.scope").rmdir()
    write_events(cg / "user.slice", 1)  # v2 counts the kill in every ancestor too
    assert counter.killed_by_oom() is True


def _spawn_in(cgroup: Path, code: str) -> subprocess.Popen:
    def enter():
        (cgroup / "cgroup.procs").write_text(str(os.getpid()))

    return subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, preexec_fn=enter)


def test_a_real_oom_kill_is_recognised(small_memory_cgroup):
    # The child waits for a go before allocating, so the counters are read while it is alive.
    child = _spawn_in(small_memory_cgroup, "import sys; sys.stdin.readline(); b = b'x' * (200 << 20)")
    counter = OomCounter.for_pid(child.pid)
    assert any(p.parent == small_memory_cgroup for p in counter.baseline), counter.baseline
    child.communicate(b"go\n", timeout=60)
    assert child.returncode == -signal.SIGKILL
    assert counter.killed_by_oom() is True


def test_a_real_sigkill_is_not_an_oom_kill(small_memory_cgroup):
    child = _spawn_in(small_memory_cgroup, "import sys; sys.stdin.readline()")
    counter = OomCounter.for_pid(child.pid)
    child.kill()
    child.wait(timeout=10)
    assert child.returncode == -signal.SIGKILL
    assert counter.killed_by_oom() is False
