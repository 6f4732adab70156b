"""The `traind` command: the engine's command line, plus the UI where no command is given.

`traind` alone opens the UI on the workspace (starting a daemon unless
`--no-start`), and `traind demo` opens it on the demo workspace when standard
output is a terminal. Every other command is engine.cli's, unchanged: the
engine never imports the UI, the UI builds on the engine.
"""

from __future__ import annotations

import sys

from engine import cli as engine_cli
from engine.workspace import Workspace, resolve_root


def main(argv: list[str] | None = None) -> int:
    parser = engine_cli.build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        return engine_cli.run_command(parser, _with(args, "ui", open_ui))
    if args.func is engine_cli.cmd_demo and not args.headless and sys.stdout.isatty():
        return engine_cli.run_command(parser, _with(args, "demo", demo_in_ui))
    return engine_cli.run_command(parser, args)


def _with(args, command: str, func):
    args.command, args.func = command, func
    return args


def open_ui(args) -> int:
    from tui.app import run

    return run(Workspace.at(resolve_root(args.workspace)).require(), start_daemon=not args.no_start)


def demo_in_ui(args) -> int:
    from tui.app import run

    ws = engine_cli.prepare_demo(args)
    return ws if isinstance(ws, int) else run(ws, start_daemon=True)


if __name__ == "__main__":
    sys.exit(main())
