"""The `traind` command: the engine's command line, plus the UI where no command is given.

`traind` alone opens the UI on the workspace (starting a daemon unless
`--no-start`, which also makes it read-only), on a terminal only, and `traind demo` opens it on the demo workspace when standard
output is a terminal. Every other command is engine.cli's, unchanged: the
engine never imports the UI, the UI builds on the engine.
"""

from __future__ import annotations

import sys

from engine import cli as engine_cli
from engine.cli import workspace as workspace_commands
from engine.store.workspace import Workspace, resolve_root


def main(argv: list[str] | None = None) -> int:
    parser = engine_cli.build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        return engine_cli.run_command(parser, _with(args, "ui", open_ui))
    if args.func is workspace_commands.cmd_demo and not args.headless and sys.stdout.isatty():
        return engine_cli.run_command(parser, _with(args, "demo", demo_in_ui))
    return engine_cli.run_command(parser, args)


def _with(args, command: str, func):
    args.command, args.func = command, func
    return args


NOT_A_TERMINAL = "not a terminal: use 'traind status' or 'traind daemon'"


def open_ui(args) -> int:
    from tui.app import run

    if not (sys.stdin.isatty() and sys.stdout.isatty()):  # a UI drawn into a file or a pipe never ends
        print(f"traind: {NOT_A_TERMINAL}", file=sys.stderr)
        return 2
    return run(Workspace.at(resolve_root(args.workspace)).require(), start_daemon=not args.no_start)


def demo_in_ui(args) -> int:
    from tui.app import run

    ws = workspace_commands.prepare_demo(args)
    return ws if isinstance(ws, int) else run(ws, start_daemon=True)


if __name__ == "__main__":
    sys.exit(main())
