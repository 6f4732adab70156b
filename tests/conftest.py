"""Shared fixtures. The tiny model is built once per session (a second, offline)."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from engine.core import testing
from engine.ops.forkserver import ForkServer
from engine.ops.worker_process import worker_env

TESTS = Path(__file__).resolve().parent

# Every daemon any test starts (by tests/workspaces.py, the UI's launcher or a command) runs with the thread guard:
# the supervisor's state written from a thread other than the event loop's ends it (engine/core/testing.py).
os.environ.update(testing.with_switches(os.environ, thread_guard=True))


# The files that take longest in make test (docs/testing.md, "Where the time goes"), started first: the three
# test processes then end together, instead of one running a long file alone while the others idle. make test
# keeps this order (--no-loadscope-reorder); a file missing here only runs later.
LONGEST_FIRST = ("test_forkserver.py", "test_end_to_end_control.py", "test_write_faults.py", "test_nodes.py",
                 "test_worker.py", "test_supervisor.py", "test_supervisor_machine.py", "test_adapters.py",
                 "test_worker_control.py", "test_sharding.py",
                 "test_end_to_end.py", "test_tui_edges.py", "test_disk_full.py", "test_model_unavailable.py")


def pytest_collection_modifyitems(items):
    """Every property test (hypothesis) is marked `fuzz`: the thorough suite runs them again at full size
    (tests/budget.py). The longest files come first."""
    for item in items:
        if getattr(getattr(item, "obj", None), "is_hypothesis_test", False):
            item.add_marker(pytest.mark.fuzz)
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file's tests stay in order


@pytest.fixture(scope="session")
def fork_server():
    """One fork server per test process (engine/worker/forkserver.py), started by the first test that uses the
    real tiny model: every real worker a test or its daemon starts is then forked with torch already imported, not
    a new python paying 6-9 s of imports. A daemon's own server, and plain spawns, are tested where a test turns
    this one off (tests/worker_runs.py's `without_shared_fork_server`)."""
    folder = Path(tempfile.mkdtemp(prefix="traind-fs-"))  # short: a unix socket's path has 107 bytes at most
    env = dict(worker_env(), OMP_NUM_THREADS="1")  # as the tests' daemons and tests/worker_runs.py give it
    server = ForkServer.start(folder / "fork.sock", folder / "forkserver.log", env, TESTS.parent)
    deadline = time.monotonic() + 120
    while not server.serving and server.problem is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.serving, f"the fork server did not start: {(folder / 'forkserver.log').read_text()}"
    os.environ.update(testing.with_switches(os.environ, fork_server=str(server.path)))
    yield server
    rest = testing.with_switches(os.environ, fork_server=None)
    os.environ.pop(testing.ENV, None)
    os.environ.update(rest)
    server.close()
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, fork_server):
    """A real tiny causal LM + tokenizer directory (engine.worker.tiny_model); treat it as read-only."""
    from engine.worker.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def text_data(tmp_path_factory) -> Path:
    """400 demo text examples, made once per test module that asks."""
    from engine.data.demo_data import write_demo_file

    return write_demo_file(tmp_path_factory.mktemp("data") / "text.jsonl", 400, "text", seed=1)


@pytest.fixture(scope="module")
def text_reference(tmp_path_factory, tiny_model_dir, text_data):
    """One uninterrupted text job on the real worker: the baseline resume and guard tests compare against."""
    from worker_runs import make_spec, run_worker

    spec = make_spec(tmp_path_factory.mktemp("ref"), tiny_model_dir, "text", text_data, "ref")
    rc, events = run_worker(spec)
    return spec, rc, events


# ---------------------------------------------------------------------------------------------
# OOM kills for real: a child cgroup with a small memory limit


def _own_cgroup_dirs() -> list[tuple[str, Path]]:
    """(version, folder) of this process's memory cgroup: v2 first where it has the memory controller."""
    found = []
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        hierarchy, controllers, rel = line.split(":", 2)
        if hierarchy == "0" and controllers == "":
            for base in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified")):
                if (base / "cgroup.controllers").exists():
                    found.insert(0, ("v2", base / rel.lstrip("/")))
                    break
        elif "memory" in controllers.split(","):
            found.append(("v1", Path("/sys/fs/cgroup/memory") / rel.lstrip("/")))
    return found


@pytest.fixture
def small_memory_cgroup(request):
    """A fresh memory cgroup limited to 32 MiB (or the test's `memory_limit` mark), without swap;
    skips where none can be made."""
    mark = request.node.get_closest_marker("memory_limit")
    limit = mark.args[0] if mark else 32 * 2**20
    why = []
    for version, parent in _own_cgroup_dirs():
        child = parent / f"traind-test-{os.getpid()}"
        try:
            if version == "v2":
                if "memory" not in (parent / "cgroup.subtree_control").read_text().split():
                    why.append(f"v2 cgroup {parent} does not delegate the memory controller")
                    continue
                child.mkdir()
                (child / "memory.max").write_text(str(limit))
                if (child / "memory.swap.max").exists():
                    (child / "memory.swap.max").write_text("0")
            else:
                child.mkdir()
                (child / "memory.limit_in_bytes").write_text(str(limit))
                if (child / "memory.memsw.limit_in_bytes").exists():
                    (child / "memory.memsw.limit_in_bytes").write_text(str(limit))
        except OSError as err:
            why.append(f"{version} cgroup under {parent}: {err}")
            if child.exists():
                child.rmdir()
            continue
        try:
            yield child
        finally:
            deadline = time.monotonic() + 10
            while True:
                try:
                    child.rmdir()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
        return
    pytest.skip("cannot create a memory cgroup here: " + ("; ".join(why) or "no memory controller mounted"))


# ---------------------------------------------------------------------------------------------
# A real small filesystem, for disk-full tests


@pytest.fixture
def small_filesystem(tmp_path):
    """A 40 MiB tmpfs mounted at tmp_path/fs (root only; skips with the reason elsewhere)."""
    import subprocess

    mount_point = tmp_path / "fs"
    mount_point.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m,mode=0755", "tmpfs", str(mount_point)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip() or 'mount failed'}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


def fill_disk(folder: Path, keep: int = 0) -> Path:
    """Write one file in `folder` until the filesystem refuses more (less `keep` bytes); returns the file."""
    import errno

    filler = folder / "filler.bin"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        block = b"\0" * (1 << 20)
        while True:
            try:
                os.write(fd, block)
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                if len(block) == 1:
                    break
                block = block[: len(block) // 2]
    finally:
        os.close(fd)
    if keep:
        os.truncate(filler, max(0, filler.stat().st_size - keep))
    return filler

