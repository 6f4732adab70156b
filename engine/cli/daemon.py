"""`traind daemon`, `traind node`, `traind status`, and the commands a running daemon obeys (pause, resume,
stop, start, checkpoint, skip, shutdown).
"""

from __future__ import annotations

import argparse
import sys

from engine.cli.common import answered, workspace

CONTROL_TIMEOUT = 120.0  # past the daemon's own waits (pause, checkpoint); a reply later than this is said in one line


def cmd_daemon(args: argparse.Namespace) -> int:
    """`traind daemon`, and `traind node`: this machine's part in jobs a head daemon runs on several."""
    from engine.cluster import follower
    from engine.supervisor import daemon
    from engine.store.lock import AlreadyRunning

    ws = workspace(args)
    try:
        return follower.run(ws, args.name) if args.command == "node" else daemon.run(ws, once=args.once)
    except AlreadyRunning as e:
        print(f"traind {args.command}: {e}", file=sys.stderr)
        return 1


def cmd_control(args: argparse.Namespace) -> int:
    from engine.api import control

    ws = workspace(args)
    try:
        answer = control.request(ws.control_socket, args.command, timeout=CONTROL_TIMEOUT)
    except control.NotRunning as e:
        print(f"traind {args.command}: {e}; start one with 'traind daemon -w {ws.root}'", file=sys.stderr)
        return 1
    return answered(answer)


def cmd_status(args: argparse.Namespace) -> int:
    from engine.api import status

    return status.main(workspace(args), args.json)


def add_commands(sub, common) -> None:
    p = sub.add_parser("daemon", parents=[common], help="run the supervisor in the foreground")
    p.add_argument("--once", action="store_true", help="exit when the queue is empty")
    p.set_defaults(func=cmd_daemon)

    p = sub.add_parser("node", parents=[common], help="join the jobs of a daemon on another machine that runs them "
                       "on several ([distributed] nodes; the workspace shared at the same path)")
    p.add_argument("--name", help="this node's name (default: the hostname)")
    p.set_defaults(func=cmd_daemon)

    p = sub.add_parser("status", parents=[common], help="one-shot status; works with no daemon running")
    p.add_argument("--json", action="store_true", help="the status document (schema in docs/status.md)")
    p.set_defaults(func=cmd_status)

    for verb, text in (("pause", "hold training at the next step boundary, model in memory"),
                       ("resume", "continue a paused job from the same step"),
                       ("stop", "checkpoint, end the worker (releasing the GPU) and hold the queue"),
                       ("start", "release a stopped queue; the active file resumes from its checkpoint"),
                       ("checkpoint", "save a checkpoint now; training goes on"),
                       ("skip", "end the active file's job; it moves to queue/failed/"),
                       ("shutdown", "as SIGTERM: checkpoint, then the daemon exits")):
        p = sub.add_parser(verb, parents=[common], help=text)
        p.set_defaults(func=cmd_control)
