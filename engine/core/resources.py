"""Host resources the daemon watches: worker memory, machine memory, disk space, OOM kills.

Everything here reads psutil, `os.statvfs`, /proc and the cgroup filesystem; it
never shells out (no `dmesg`, no `df`) and never imports torch. Every function
tolerates the races of a live system (a process exiting mid-scan, a file
removed mid-walk) and answers None for "cannot know" rather than raising.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import psutil

# Where the kernel's views live. Module attributes so tests can point them at a fake tree.
PROC_ROOT = Path("/proc")
CGROUP_ROOT = Path("/sys/fs/cgroup")

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


def format_bytes(n: int | float) -> str:
    """A human size with binary units: 512 -> "512 B", 3328599654 -> "3.1 GiB"."""
    sign = "-" if n < 0 else ""
    value = float(abs(n))
    for unit in _UNITS:
        if round(value, 1) < 1024 or unit == _UNITS[-1]:
            break
        value /= 1024
    if unit == "B":
        return f"{sign}{int(value)} B"
    return f"{sign}{value:.1f} {unit}"


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (ours or another user's)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def process_group_rss(pgid: int) -> int | None:
    """Resident memory of every live process in group `pgid`, summed; None when none is alive.

    RSS counts pages shared between the group's processes (torchrun ranks share
    libraries) once per process, so this is an upper bound on what the group
    holds. Zombies hold no memory and do not make a group alive.
    """
    total, alive = 0, False
    for pid in psutil.pids():
        try:
            if os.getpgid(pid) != pgid:
                continue
            proc = psutil.Process(pid)
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            total += proc.memory_info().rss
            alive = True
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue  # exited (or became unreadable) between the listing and the read
    return total if alive else None


def machine_memory() -> dict[str, int]:
    """{"total", "available"} in bytes for the whole machine (psutil's `available`: what can be
    had without swapping). A container's cgroup limit is not applied here."""
    vm = psutil.virtual_memory()
    return {"total": int(vm.total), "available": int(vm.available)}


def disk_usage(path: str | os.PathLike) -> dict:
    """{"path", "total", "free"} for the filesystem holding `path`; `free` is what an unprivileged
    writer may still use (f_bavail), not counting the blocks reserved for root."""
    st = os.statvfs(path)
    return {"path": os.fspath(path), "total": st.f_blocks * st.f_frsize, "free": st.f_bavail * st.f_frsize}


def dir_size(path: str | os.PathLike) -> int:
    """Bytes of the regular files under `path` (apparent size), not following links; a file with
    several hard links inside the tree counts once. A missing folder is 0 bytes."""
    total = 0
    seen: set[tuple[int, int]] = set()
    stack = [os.fspath(path)]
    while stack:
        try:
            with os.scandir(stack.pop()) as it:
                entries = list(it)
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            continue
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue  # removed mid-walk
            if stat.S_ISDIR(st.st_mode):
                stack.append(entry.path)
            elif stat.S_ISREG(st.st_mode):
                if st.st_nlink > 1:
                    key = (st.st_dev, st.st_ino)
                    if key in seen:
                        continue
                    seen.add(key)
                total += st.st_size
    return total


# ---------------------------------------------------------------------------------------------
# OOM kills


def _read_oom_kill(path: Path) -> int | None:
    """The `oom_kill N` line of a memory.events (v2) or memory.oom_control (v1) file."""
    try:
        text = path.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == "oom_kill":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _inside(base: Path, rel: str) -> Path | None:
    """base/rel, refusing a cgroup path that climbs out of the mount (as seen across namespaces)."""
    parts = [p for p in rel.split("/") if p]
    if any(p in (".", "..") for p in parts):
        return None
    return base.joinpath(*parts)


def _counter_files(pid: int) -> list[Path]:
    """The oom_kill counter files of a process's memory cgroup and of each ancestor.

    v2: `0::/PATH` -> CGROUP_ROOT[/unified]/PATH/memory.events. v1: `N:...memory...:/PATH` ->
    CGROUP_ROOT/memory/PATH/memory.oom_control. Ancestors are included because the kill is
    counted at the level whose limit was hit, which need not be the process's own.
    """
    try:
        lines = (PROC_ROOT / str(pid) / "cgroup").read_text().splitlines()
    except OSError:
        return []
    files: list[Path] = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, rel = parts
        if hierarchy == "0" and controllers == "":
            # Pure v2 mounts the hierarchy at the root; hybrid systems put it under unified/.
            bases, name = [CGROUP_ROOT, CGROUP_ROOT / "unified"], "memory.events"
        elif "memory" in controllers.split(","):
            bases, name = [CGROUP_ROOT / "memory", CGROUP_ROOT / controllers], "memory.oom_control"
        else:
            continue
        for base in bases:
            leaf = _inside(base, rel)
            if leaf is None or not base.is_dir():
                continue
            node = leaf
            while True:
                candidate = node / name
                if candidate not in files and _read_oom_kill(candidate) is not None:
                    files.append(candidate)
                if node == base:
                    break
                node = node.parent
    return files


def _vmstat_oom_kill() -> int | None:
    """The kernel's machine-wide count of OOM kills (/proc/vmstat, Linux >= 4.13)."""
    return _read_oom_kill(PROC_ROOT / "vmstat")


class OomCounter:
    """Tells whether a process that died of SIGKILL was killed by the kernel's OOM killer.

    Create it with `for_pid` right after spawning the process (or, before the
    spawn, for the parent, whose cgroup the child inherits): it remembers the
    `oom_kill` counters of the process's memory cgroup and its ancestors. After the
    process died, `killed_by_oom()` answers True if any of them rose. Where no
    cgroup counter can be read (the process sits in the v2 root, or cgroups are not
    mounted), the machine-wide /proc/vmstat counter stands in. Reading counters
    instead of the kernel log needs no privilege and no `dmesg`.
    """

    def __init__(self, baseline: dict[Path, int], vmstat_baseline: int | None) -> None:
        self.baseline = dict(baseline)
        self.vmstat_baseline = vmstat_baseline

    @classmethod
    def for_pid(cls, pid: int) -> OomCounter:
        baseline = {}
        for path in _counter_files(pid):
            count = _read_oom_kill(path)
            if count is not None:
                baseline[path] = count
        return cls(baseline, _vmstat_oom_kill())

    def killed_by_oom(self) -> bool | None:
        """True if an OOM kill was counted since `for_pid`, False if none was, None if unknowable."""
        readable = False
        for path, before in self.baseline.items():
            now = _read_oom_kill(path)
            if now is None:
                continue  # the cgroup was removed with its last process (systemd scopes do this)
            readable = True
            if now > before:
                return True
        if readable:
            return False
        # No cgroup counter: fall back to the machine-wide one. It also counts other processes'
        # kills, but a rise at the moment our process died of SIGKILL is the likely story.
        if self.vmstat_baseline is None:
            return None
        now = _vmstat_oom_kill()
        if now is None:
            return None
        return now > self.vmstat_baseline
