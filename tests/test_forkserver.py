"""The fork server (engine/worker/forkserver.py): workers forked with torch already imported train exactly as new
processes do, in a state that is safe to fork; a daemon starts its own, and goes on without it when it dies."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.core import protocol
from engine.ops import forkserver
from engine.ops.forkserver import ForkServer
from engine.ops.worker_process import worker_env
from engine.store.workspace import Workspace
from worker_runs import ROOT, cmdline, make_spec, parent_of, run_worker, without_shared_fork_server
from workspaces import drop, make_workspace, start_daemon, stop_daemon, text_lines, wait_for

pytestmark = pytest.mark.e2e


def gone(pid: int) -> bool:
    """Exited: no process, or a zombie its new parent has not reaped yet."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat[stat.rindex(")") + 2] == "Z"


def threads_of(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def test_a_forked_worker_trains_the_losses_and_weights_of_a_new_process(tmp_path, tiny_model_dir, text_data,
                                                                       fork_server, monkeypatch):
    parents = {}

    def note_parent(proc, event):
        if event["event"] == "ready":
            parents[event["pid"]] = parent_of(event["pid"])

    forked = make_spec(tmp_path / "forked", tiny_model_dir, "text", text_data, "forked")
    rc_forked, events_forked = run_worker(forked, note_parent)
    without_shared_fork_server(monkeypatch)
    spawned = make_spec(tmp_path / "spawned", tiny_model_dir, "text", text_data, "spawned")
    rc_spawned, events_spawned = run_worker(spawned, note_parent)

    assert rc_forked == rc_spawned == protocol.EXIT_DONE
    ready_forked, ready_spawned = (next(e for e in ev if e["event"] == "ready") for ev in (events_forked, events_spawned))
    assert parents[ready_forked["pid"]] == fork_server.proc.pid  # forked by the server...
    assert parents[ready_spawned["pid"]] == os.getpid()  # ...and the other a python of its own
    assert ready_forked["threads"] == ready_spawned["threads"] == 1
    losses = [{e["step"]: e["loss"] for e in ev if e["event"] == "step"} for ev in (events_forked, events_spawned)]
    assert losses[0] == losses[1] and len(losses[0]) > 5
    for name in ("model.safetensors", "config.json"):
        assert (Path(forked.model_out) / name).read_bytes() == (Path(spawned.model_out) / name).read_bytes()


def test_the_server_forks_from_one_thread_and_each_worker_gets_the_threads_it_asked_for(fork_server):
    for threads in (2, 1):  # the server itself was started with 1
        env = dict(worker_env(), OMP_NUM_THREADS=str(threads))
        r, w = os.pipe()
        stdin_r, stdin_w = os.pipe()
        worker = forkserver.fork(fork_server.path, ["-m", "engine.worker", "--events-fd", str(w)], env, ROOT,
                                 stdin_r, os.open(os.devnull, os.O_WRONLY), (w,))
        os.close(w)
        os.close(stdin_r)
        with os.fdopen(r, "rb") as events:
            ready = protocol.parse_event(events.readline())
        assert ready["event"] == "ready" and ready["threads"] == threads
        os.close(stdin_w)  # EOF before a job: the worker leaves, interrupted
        assert worker.wait(10) == protocol.EXIT_INTERRUPTED
        assert threads_of(fork_server.proc.pid) == 1


def test_a_worker_leads_its_own_process_group_by_the_time_its_pid_is_known(fork_server):
    # The daemon ends a worker with one killpg of its pid, at any moment: even at once, before it has run a line.
    for _ in range(20):
        stdin_r, stdin_w = os.pipe()
        worker = forkserver.fork(fork_server.path, ["-m", "engine.worker"], dict(worker_env(), OMP_NUM_THREADS="1"),
                                 ROOT, stdin_r, os.open(os.devnull, os.O_WRONLY))
        os.close(stdin_r)
        os.killpg(worker.pid, signal.SIGKILL)
        assert worker.wait(30) == -signal.SIGKILL
        os.close(stdin_w)


def test_a_server_with_a_second_thread_refuses_to_fork():
    code = ("import threading, time\n"
            "from engine.worker.forkserver import unsafe_to_fork\n"
            "assert unsafe_to_fork() is None\n"
            "threading.Thread(target=time.sleep, args=(5,), daemon=True).start()\n"
            "print(unsafe_to_fork())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "the fork server has 2 threads" in out.stdout


def test_a_server_started_as_a_daemon_starts_it_forks_with_a_new_pythons_threads_and_its_workers_go_with_it(
        tmp_path):
    # A daemon's environment, as a user has it: no OMP_NUM_THREADS (torch's import would start OpenMP's pool, a
    # thread a core, in the server) and none of what torch's import sets (TORCHINDUCTOR_CACHE_DIR).
    env = {k: v for k, v in worker_env().items() if not k.startswith(("TORCHINDUCTOR", "OMP_"))}
    server = ForkServer.start(tmp_path / "fork.sock", tmp_path / "forkserver.log", env, ROOT)
    try:
        wait_for(lambda: server.serving or server.problem, 120, what="the fork server")
        assert server.serving, (tmp_path / "forkserver.log").read_text()
        assert threads_of(server.proc.pid) == 1
        fresh = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"], env=env,
                               capture_output=True, text=True, timeout=120)
        for asked, refused in ((env, None), (dict(env, HF_HOME=str(tmp_path / "elsewhere")), "HF_HOME")):
            r, w = os.pipe()
            stdin_r, stdin_w = os.pipe()
            try:
                worker = forkserver.fork(server.path, ["-m", "engine.worker", "--events-fd", str(w)], asked, ROOT,
                                         stdin_r, os.open(os.devnull, os.O_WRONLY), (w,))
            except forkserver.ForkRefused as e:
                assert refused and refused in str(e) and e.expected, e
                os.close(r)
                continue
            finally:
                for fd in (w, stdin_r):
                    os.close(fd)
            assert refused is None, f"forked with {refused} changed"
            with os.fdopen(r, "rb") as events:
                ready = protocol.parse_event(events.readline())
            assert ready["event"] == "ready" and ready["threads"] == int(fresh.stdout)
            os.close(stdin_w)  # EOF before a job: it leaves
            assert worker.wait(60) == protocol.EXIT_INTERRUPTED
        assert threads_of(server.proc.pid) == 1

        # The server dies under a ready worker: the worker has SIGTERM from the kernel, as a worker the daemon
        # started itself has when the daemon dies, and its end is seen though no one can read its real status.
        r, w = os.pipe()
        stdin_r, stdin_w = os.pipe()
        worker = forkserver.fork(server.path, ["-m", "engine.worker", "--events-fd", str(w)], env, ROOT, stdin_r,
                                 os.open(os.devnull, os.O_WRONLY), (w,))
        os.close(w)
        os.close(stdin_r)
        with os.fdopen(r, "rb") as events:
            assert protocol.parse_event(events.readline())["event"] == "ready"
            os.kill(server.proc.pid, signal.SIGKILL)
            server.proc.wait()
            assert worker.wait(30) == -signal.SIGTERM  # PR_SET_PDEATHSIG's signal, as the worker had it
            assert gone(worker.pid)
        os.close(stdin_w)
    finally:
        server.close()


def test_a_daemon_forks_its_workers_from_its_own_server_and_goes_on_without_it(tmp_path, tiny_model_dir,
                                                                            monkeypatch):
    from test_end_to_end import SETTINGS, checkpoint_steps, demo_lines, starts
    from workspaces import events, files_in

    without_shared_fork_server(monkeypatch)  # the product's way: each daemon starts its own
    ws = make_workspace(tmp_path / "ws", {**SETTINGS, "checkpoint": {"every_steps": 5}, "eval": {"gate": "off"}}, model_dir=tiny_model_dir)
    drop(ws, "data.jsonl", demo_lines(200, seed=4))  # 25 steps
    proc = start_daemon(ws, fake=False, hooks={"step_sleep_seconds": 0.05})
    job = "00001-data"
    wait_for(lambda: len(checkpoint_steps(ws, job)) >= 1, timeout=120, what="a checkpoint")
    worker = json.loads(ws.worker_record.read_text())["pid"]
    server = parent_of(worker)
    assert "engine.worker.forkserver" in cmdline(server) and parent_of(server) == proc.pid
    # kill -9 of the daemon: its server has SIGTERM from the kernel, and the worker from the server's death, as a
    # worker the daemon started itself would: it checkpoints and leaves.
    proc.kill()
    proc.wait()
    wait_for(lambda: gone(worker) and gone(server), timeout=60,
             what="the server and the worker to go with the daemon")
    saved = max(checkpoint_steps(ws, job))
    proc = start_daemon(ws, fake=False)
    try:
        wait_for(lambda: len(starts(ws, job)) == 2, timeout=120, what="the resumed attempt")
        assert starts(ws, job)[1]["resumed_from_step"] >= saved
        wait_for(lambda: files_in(ws, "done"), timeout=240, what="the file to finish")
        # The new daemon's server dies: said once, and the next file trains in a worker of its own.
        worker, server = wait_for(lambda: _warm_worker(ws), timeout=120, what="a warm worker")
        assert "engine.worker.forkserver" in cmdline(server)
        os.kill(server, signal.SIGKILL)
        wait_for(lambda: any(e["kind"] == "worker_start_failed" for e in events(ws)), timeout=60,
                 what="the server's death said")
        warm, parent = wait_for(lambda: (found := _warm_worker(ws)) and found[0] != worker and found, timeout=120,
                                what="a new warm worker")
        assert parent == proc.pid
        drop(ws, "later.jsonl", demo_lines(40, seed=5))
        wait_for(lambda: len(files_in(ws, "done")) == 2, timeout=240, what="the next file to finish")
        said = [e for e in events(ws) if e["kind"] == "worker_start_failed"]
        assert len(said) == 1 and said[0]["level"] == "warning" and "fork server: it exited" in said[0]["message"]
    finally:
        assert stop_daemon(proc) == 0


def _warm_worker(ws: Workspace) -> tuple[int, int] | None:
    """The warm worker the status names and its parent, while it lives (a status is a moment's: the worker it
    names may have been replaced since)."""
    status = json.loads(ws.status_path.read_text()) if ws.status_path.exists() else {}
    daemon = status.get("daemon", {})
    pid = daemon.get("worker_pid") if daemon.get("warm_worker") else None
    try:
        return (pid, parent_of(pid)) if pid and not gone(pid) else None
    except FileNotFoundError:
        return None
