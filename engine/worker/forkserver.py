"""The fork server: `python -m engine.worker.forkserver --socket PATH`.

Importing torch, transformers and the Trainer takes 6-9 s of CPU. This process
pays it once: it imports everything a worker imports before its `ready` event,
runs no computation, starts no thread, and then forks one worker per request,
so a new worker is ready in a fraction of a second and is still a fresh process
(its own memory, CUDA context and session) for every attempt.

A request is one connection on the socket: the daemon sends the worker's
command line (`-m MODULE ARGS…`, as it would run `python -m MODULE ARGS…`), its
environment and working directory, and with them (SCM_RIGHTS) the descriptors
that become the worker's stdin, stdout and stderr, and those it keeps at their
numbers (`pass_fds`, as subprocess has it). The server answers `{"pid": N}` once
the worker runs and `{"exit": CODE}` when it has exited (minus the signal that
killed it, as subprocess reports it), then closes the connection.

Forking is only safe from a process with one thread, no OpenMP pool and no
CUDA driver: the server checks all three before each fork and refuses (`{"error":
…}`, the daemon then starts the worker as a plain process) rather than hand on a
state a worker could deadlock or fail in. Importing torch starts OpenMP's pool
(a thread a core) unless OMP_NUM_THREADS is 1, so the server imports with it at
1, and each worker sets the threads it asked for, or the one a core a new
python's torch would take. Each worker asks for SIGTERM when the
server dies, as a spawned worker does when the daemon dies, and the server asks
for SIGTERM when the daemon that started it dies: the chain ends the same way.
"""

from __future__ import annotations

import argparse
import array
import atexit
import contextlib
import gc
import json
import os
import runpy
import selectors
import signal
import socket
import sys
import traceback

from engine.worker.control import die_with_parent

MAX_FDS = 8
REQUEST_LIMIT = 1 << 20


def preload() -> None:
    """What a worker imports before `ready` (engine/worker/__main__.py), and nothing that runs."""
    import torch  # noqa: F401
    import transformers  # noqa: F401

    from engine.store import storage  # noqa: F401
    import torch.distributed.launcher.api  # noqa: F401  (the elastic agent, for several ranks)

    from engine.worker import control, errors, link, train  # noqa: F401  (engine.worker.__main__ runs in each worker)


# What torch, transformers and the hub read from the environment as they are imported: a worker forked from
# here has the server's values. A request whose values differ is refused, and that worker is a new python.
# OMP_NUM_THREADS is the exception: each worker sets its own (become_worker).
IMPORT_TIME_PREFIXES = ("HF_", "HUGGINGFACE_", "TRANSFORMERS_", "TORCH", "PYTORCH_", "CUDA_", "OMP_", "MKL_", "KMP_",
                        "TOKENIZERS_")
PER_WORKER = frozenset({"OMP_NUM_THREADS"})
# The environment this process was started with. The imports change it (torch sets TORCHINDUCTOR_CACHE_DIR to
# its default): a request may have a value from before them (a daemon never imports torch) or from after (a
# process that did), and both are the environment a new python would have imported torch under.
STARTED_WITH = dict(os.environ)


def differing_environment(env: dict[str, str]) -> list[str]:
    """The variables read at import that the request has other than this process (set, unset or changed)."""
    names = {k for k in (*env, *STARTED_WITH, *os.environ) if k.startswith(IMPORT_TIME_PREFIXES)
             and k not in PER_WORKER}
    return sorted(k for k in names if env.get(k) not in (STARTED_WITH.get(k), os.environ.get(k)))


def worker_threads(env: dict[str, str]) -> int:
    """The threads torch would take in a new python with this environment: OMP_NUM_THREADS, else one for each
    physical core this process may run on (torch's default, cpuinfo's count of cores, which heeds affinity)."""
    if env.get("OMP_NUM_THREADS", "").isdigit() and int(env["OMP_NUM_THREADS"]) > 0:
        return int(env["OMP_NUM_THREADS"])
    cores = set()
    for cpu in os.sched_getaffinity(0):
        topology = f"/sys/devices/system/cpu/cpu{cpu}/topology"
        try:
            with open(f"{topology}/physical_package_id") as package, open(f"{topology}/core_id") as core:
                cores.add((package.read().strip(), core.read().strip()))
        except OSError:
            cores.add(("cpu", str(cpu)))
    return max(1, len(cores))


def unsafe_to_fork() -> str | None:
    """Why a fork now would hand the worker a broken state, or None."""
    threads = len(os.listdir("/proc/self/task"))
    if threads != 1:
        return f"the fork server has {threads} threads (a fork keeps only the caller's: locks others held stay held)"
    with open("/proc/self/maps") as maps:
        if "libcuda.so" in maps.read():
            return "the CUDA driver is loaded in the fork server (a forked process cannot use it)"
    return None


def receive_request(conn: socket.socket) -> tuple[dict, list[int]]:
    """The request's JSON and the descriptors that came with it."""
    fds = array.array("i")
    data, ancillary, _, _ = conn.recvmsg(REQUEST_LIMIT, socket.CMSG_LEN(MAX_FDS * fds.itemsize))
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
    while data and not data.endswith(b"\n"):
        more = conn.recv(REQUEST_LIMIT)
        if not more:
            break
        data += more
    return json.loads(data), list(fds)


def become_worker(request: dict, fds: list[int], keep_closed: list[int], in_session: int) -> None:
    """In the forked child: the worker's session, descriptors, environment and program; never returns. Closing
    `in_session` tells the server the session is made (it gives out the pid only then)."""
    code = 1
    try:
        try:
            os.setsid()
        finally:
            os.close(in_session)
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # as a fresh python has them
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for fd in keep_closed:
            os.close(fd)
        # Every received descriptor goes above the highest target first, so no target overwrites one still needed.
        targets = [0, 1, 2, *request.get("pass_fds", [])]
        high = max(targets + fds) + 1
        moved = [os.dup2(fd, high + i) for i, fd in enumerate(fds)]
        for fd in fds:
            os.close(fd)
        for target, fd in zip(targets, moved):
            os.dup2(fd, target)
        for fd in moved:
            os.close(fd)
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        import torch

        torch.set_num_threads(worker_threads(os.environ))  # OpenMP read OMP_NUM_THREADS as it loaded: in the server
        if not die_with_parent():
            os._exit(75)
        argv = request["argv"]
        if len(argv) < 2 or argv[0] != "-m":
            raise ValueError(f"expected -m MODULE ARGS…, got {argv!r}")
        sys.argv = [argv[1], *argv[2:]]
        try:
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if not isinstance(e.code, (int, type(None))):
                print(e.code, file=sys.stderr)
        atexit._run_exitfuncs()
    except BaseException:
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def exit_code(status: int) -> int:
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def send(conn: socket.socket, message: dict) -> None:
    try:
        conn.sendall((json.dumps(message) + "\n").encode())
    except OSError:
        pass  # the daemon went away: its worker runs on (it reads EOF on stdin) and is still reaped here


def serve(path: str) -> int:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    os.chmod(path, 0o600)
    listener.listen(16)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    os.set_blocking(wake_r, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # a handler, so the wakeup fd hears of each exit
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ, "listen")
    selector.register(wake_r, selectors.EVENT_READ, "child")
    waiting: dict[int, socket.socket] = {}  # worker pid -> the connection its exit code goes to
    print(f"traind-forkserver: pid {os.getpid()} serving on {path}", flush=True)
    while True:
        for key, _ in selector.select():
            if key.data == "child":
                with contextlib.suppress(BlockingIOError):
                    while os.read(wake_r, 512):
                        pass
                reap(waiting)
                continue
            conn, _ = listener.accept()
            conn.settimeout(10.0)  # a request comes whole at once: a stuck client must not stall the server
            with_fds: list[int] = []
            try:
                request, with_fds = receive_request(conn)
                if differ := differing_environment(request["env"]):
                    send(conn, {"error": f"its environment differs from the fork server's in {', '.join(differ)}, "
                                         "read as torch and transformers are imported", "expected": True})
                    conn.close()
                    continue
                if problem := unsafe_to_fork():
                    send(conn, {"error": problem})
                    conn.close()
                    continue
                sys.stdout.flush()
                sys.stderr.flush()
                gc.collect()
                in_session_r, in_session_w = os.pipe()
                pid = os.fork()
                if pid == 0:
                    become_worker(request, with_fds,
                                  [listener.fileno(), wake_r, wake_w, selector.fileno(), in_session_r]
                                  + [c.fileno() for c in (conn, *waiting.values())], in_session_w)
                os.close(in_session_w)
                os.read(in_session_r, 1)  # EOF once the worker leads its own group: a killpg of its pid reaches it
                os.close(in_session_r)
                waiting[pid] = conn
                send(conn, {"pid": pid})
            except (OSError, ValueError) as e:
                send(conn, {"error": f"{type(e).__name__}: {e}"})
                conn.close()
            finally:
                for fd in with_fds:
                    os.close(fd)
            reap(waiting)


def reap(waiting: dict[int, socket.socket]) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        if (conn := waiting.pop(pid, None)) is not None:
            send(conn, {"exit": exit_code(status)})
            conn.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.worker.forkserver", description=__doc__.splitlines()[0])
    parser.add_argument("--socket", required=True, help="the unix socket to serve on")
    args = parser.parse_args(argv)
    if not die_with_parent():
        return 75
    os.environ["OMP_NUM_THREADS"] = "1"  # no OpenMP pool as torch loads: a fork keeps only the calling thread
    preload()
    gc.freeze()  # what is imported stays shared with every worker, not copied as the collector touches it
    if problem := unsafe_to_fork():
        print(f"traind-forkserver: {problem}: not serving", file=sys.stderr, flush=True)
        return 1
    try:
        return serve(args.socket)
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
