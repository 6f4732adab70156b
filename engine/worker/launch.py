"""Several training processes: `python -m engine.worker.launch --processes N [--channel SOCKET] [machines]`.

A thin wrapper over PyTorch's elastic agent (`torch.distributed.launcher.api`,
what `torchrun` runs): the c10d rendezvous (`standalone` on one machine, the
head's `--rdzv-endpoint` across several), `max_restarts = 0` (the daemon, not
the agent, decides between rollback, resume and failure), the ranks started as
functions from multiprocessing's fork server (forked from this process where
it can be: fork_rank_server), so they stay in this process's group and the
daemon's one `killpg` reaches them all. Rank 0 reaches the daemon on `--channel`
(engine/worker/link.py); the other ranks read the job spec from the agent's
store. With several machines `--node-rank` (the daemon's order, the head
first) numbers the ranks, whatever order the rendezvous gave the machines:
rank 0 is on the head, where the daemon is.

The exit code is the first failing rank's, read from the agent's failure
record (75-79 carry the outcome); a rank killed by a signal makes this process
die of the same signal. A SIGTERM that reaches this process alone (its parent
died) is passed on to its group. When one rank fails the others get
`FAILED_RANK_GRACE` seconds to leave before the agent kills them: a rank
waiting in a collective for a dead peer would otherwise wait for the backend's
timeout.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import traceback
import uuid

from engine.core import protocol
from engine.worker.control import die_with_parent
from engine.worker.events import EventSink

FAILED_RANK_GRACE = 10


def rank_main(channel: str | None, node_rank: int) -> int:
    """One rank, in a process the agent spawned: the worker's own main, under the agent's environment."""
    if int(os.environ.get("GROUP_WORLD_SIZE", "1")) > 1:
        head_first(node_rank)
    from engine.worker.__main__ import main

    argv = ["--channel", channel] if channel and os.environ["RANK"] == "0" else []
    code = main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    if code:
        os._exit(code)  # the agent reads the process's exit code; a reader thread must not hold shutdown up
    return code


def head_first(node_rank: int) -> None:
    """Number the ranks by the daemon's order of machines (the head's first), not the rendezvous's order."""
    rank = node_rank * int(os.environ["LOCAL_WORLD_SIZE"]) + int(os.environ["LOCAL_RANK"])
    os.environ.update(RANK=str(rank), GROUP_RANK=str(node_rank), ROLE_RANK=str(rank))


def launch_config(args: argparse.Namespace):
    import multiprocessing

    from torch.distributed.launcher.api import LaunchConfig

    multiprocessing.set_forkserver_preload(["engine.worker.rank_server"])
    fork_rank_server()

    several = args.nodes > 1
    return LaunchConfig(
        min_nodes=args.nodes, max_nodes=args.nodes, nproc_per_node=args.processes,
        run_id=args.run_id or uuid.uuid4().hex, rdzv_backend="c10d",
        rdzv_endpoint=args.rdzv_endpoint if several else "localhost:0",
        rdzv_configs={"join_timeout": args.join_timeout, "is_host": args.node_rank == 0} if several
        else {"join_timeout": args.join_timeout},
        max_restarts=0, monitor_interval=0.1, start_method="forkserver",
        # SIGTERM and SIGINT are a stop the ranks honour themselves (a checkpoint first): not the agent's to act on.
        signals_to_handle="SIGHUP,SIGQUIT", shutdown_timeout=FAILED_RANK_GRACE,
        local_addr=args.local_addr)


def fork_rank_server() -> bool:
    """Start multiprocessing's fork server for the ranks by forking this process, not as a new python.

    Forked by traind's fork server, this process has torch, transformers and the Trainer imported already, and
    so has the child: the ranks' server is ready at once instead of importing them again (seconds). Only while
    this process has one thread (no OpenMP pool: OMP_NUM_THREADS=1, as several ranks a machine get by default),
    and only for the protocol of the multiprocessing this was written against; otherwise False, and
    multiprocessing starts its server as usual when the first rank starts."""
    from multiprocessing import connection, forkserver, resource_tracker

    server = forkserver._forkserver
    if (not all(hasattr(server, name) for name in ("_forkserver_address", "_forkserver_alive_fd",
                                                   "_forkserver_pid", "_lock"))
            or hasattr(server, "_forkserver_authkey") or server._forkserver_pid is not None
            or len(os.listdir("/proc/self/task")) != 1):
        return False
    with server._lock:
        resource_tracker.ensure_running()  # as multiprocessing does first: the ranks share its tracker
        listener = socket.socket(socket.AF_UNIX)
        address = connection.arbitrary_address("AF_UNIX")
        listener.bind(address)
        os.chmod(address, 0o600)
        listener.listen()
        alive_r, alive_w = os.pipe()  # the server leaves when this process's end closes (it exits, or dies)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.close(alive_w)
                from engine.worker import rank_server  # noqa: F401  (it ignores SIGTERM, as the server must)

                forkserver.main(listener.fileno(), alive_r, ["engine.worker.rank_server"])
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        listener.close()
        os.close(alive_r)
        server._forkserver_address, server._forkserver_alive_fd, server._forkserver_pid = address, alive_w, pid
    return True


def run(args: argparse.Namespace) -> int:
    """The agent's outcome: 0, the first failing rank's exit code, or minus the signal that killed it."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous import RendezvousError
    from torch.distributed.launcher.api import elastic_launch

    try:
        elastic_launch(launch_config(args), rank_main)(args.channel, args.node_rank)
    except ChildFailedError as e:
        _, failure = e.get_first_failure()
        return failure.exitcode
    except RendezvousError as e:  # no rank ran: the agent says why, in the daemon's words
        where = f"at {args.rdzv_endpoint} " if args.nodes > 1 else ""
        report(args.channel, f"the {args.nodes} machine(s) did not all join the rendezvous {where}within "
                             f"{args.join_timeout}s ({type(e).__name__}: {e}); see docs/distributed.md")
        return protocol.EXIT_FAILED
    return 0


def report(channel: str | None, message: str) -> None:
    """An error event to the daemon (in rank 0's place, as none started), and to the log."""
    print(f"traind-worker: {message}", file=sys.stderr, flush=True)
    if channel is None:
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(channel)
        except OSError:
            return  # the daemon is gone: the log has it
        EventSink(sock.fileno()).emit("error", message=message)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.worker.launch", description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, required=True, help="ranks on this machine")
    parser.add_argument("--channel", help="the daemon's socket (the head machine, where rank 0 runs)")
    parser.add_argument("--nodes", type=int, default=1, help="machines in the job")
    parser.add_argument("--rdzv-endpoint", help="HOST:PORT of the head's rendezvous (several machines)")
    parser.add_argument("--run-id", help="the attempt's rendezvous id (the same on every machine)")
    parser.add_argument("--join-timeout", type=int, default=600, help="seconds to wait for every machine to join")
    parser.add_argument("--node-rank", type=int, default=0, help="this machine's place in the job (the head is 0)")
    parser.add_argument("--local-addr", help="this machine's address as the others reach it")
    args = parser.parse_args(argv)
    if not die_with_parent():
        return protocol.EXIT_INTERRUPTED
    forwarded = False

    def forward(signum, _frame) -> None:  # the ranks may have had it from the group already: a stop is idempotent
        nonlocal forwarded
        if not forwarded:
            forwarded = True
            os.killpg(os.getpgrp(), signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    logging.getLogger("torch.distributed.elastic").setLevel(logging.WARNING)
    code = run(args)
    if code < 0:  # die of the same signal, so the daemon reads "killed by SIGKILL" (an OOM kill, say)
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    return code


if __name__ == "__main__":
    sys.exit(main())
