"""The `traind` command line. Each verb is a thin layer over one engine module; its family's module
(workspace, files, daemon, models; events and logs in engine/api/watching.py, service in
engine/ops/service.py) defines it and adds it to the parser.

Exit codes: 0 success, 1 refused or invalid (a second daemon, an invalid file),
2 usage or an unreadable input (a bad config, a missing file).
"""

from __future__ import annotations

import argparse
import os
import sys

from engine import __version__
from engine.api import watching
from engine.api.control import NoReply
from engine.cli import daemon, files, models, workspace
from engine.cli.common import workspace as named_workspace
from engine.core.atomic import WriteFailed
from engine.core.config import ConfigError
from engine.ops import service
from engine.store.workspace import WorkspaceError


class _Parser(argparse.ArgumentParser):
    """An unknown option is reported with the usage of the command it was given to (`traind status --bogus`
    shows status's usage), not the top-level one."""

    commands: dict[str, argparse.ArgumentParser] = {}

    def parse_args(self, args=None, namespace=None):
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            owner = self.commands.get(getattr(parsed, "command", None) or "", self)
            owner.error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="traind", description="Keep a language model fine-tuning on a stream of JSONL files.")
    parser.add_argument("--version", action="version", version=f"traind {__version__}")
    workspace_help = "workspace folder (default: $TRAIND_HOME, else the current directory)"
    parser.add_argument("-w", "--workspace", help=workspace_help)
    parser.add_argument("--no-start", action="store_true", help="with no command: open the UI read-only, without starting a daemon")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-w", "--workspace", default=argparse.SUPPRESS, help=workspace_help)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    workspace.add_init(sub, common)
    files.add_commands(sub, common)
    daemon.add_commands(sub, common)
    models.add_commands(sub, common)
    watching.add_commands(sub, common, named_workspace)
    service.add_command(sub, common, named_workspace)
    workspace.add_demo(sub, common)
    parser.commands = dict(sub.choices)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    return run_command(parser, parser.parse_args(argv))


def run_command(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except (ConfigError, WorkspaceError) as e:
        print(f"traind {args.command}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except NoReply as e:
        print(f"traind {args.command}: {e}", file=sys.stderr)
        return 1
    except WriteFailed as e:  # with no daemon, the command wrote itself: what was written stays whole
        print(f"traind {args.command}: not done: {e.problem}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `traind status | head`: the reader left, nothing to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
