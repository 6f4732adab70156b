"""`traind add`, `traind validate`, `traind preview`: input files checked, shown, and handed to the inbox.
"""

from __future__ import annotations

import argparse
import sys

from engine.cli.common import workspace
from engine.core.config import Config
from engine.store.workspace import Workspace, resolve_root


def _limits(args: argparse.Namespace):
    root = resolve_root(args.workspace)
    ws = Workspace.at(root)
    return ws.load_section("validation") if ws.exists() else Config().validation


def _skip_up_to(ws: Workspace | None) -> int | None:
    """The bad lines the workspace's daemon would skip in a file (`[inbox] bad_lines`), as it would."""
    return ws.load_section("inbox").skip_up_to() if ws is not None and ws.exists() else None


def cmd_validate(args: argparse.Namespace) -> int:
    from engine.data import validate
    from engine.tools import preview

    ws = Workspace.at(resolve_root(args.workspace))
    ws = ws if ws.exists() else None
    return validate.validate_paths_main(args.files, _limits(args), args.json,
                                        measure=lambda reports: preview.cut_shares(ws, reports),
                                        skip_up_to=_skip_up_to(ws))


def cmd_preview(args: argparse.Namespace) -> int:
    from engine.tools import preview

    if args.n < 0:
        print("traind preview: -n must be 0 or more", file=sys.stderr)
        return 2
    return preview.preview_main(workspace(args), args.files, args.n, args.json)


def cmd_add(args: argparse.Namespace) -> int:
    from engine.data import duplicates, intake

    ws = workspace(args)
    return intake.add_files(args.files, ws.inbox, ws.load_section("validation"), known=duplicates.Known(ws),
                            again=args.again, skip_up_to=_skip_up_to(ws))


def add_commands(sub, common) -> None:
    p = sub.add_parser("add", parents=[common], help="validate files, then copy them atomically into the inbox")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("--again", action="store_true", help="train a file again whose content was trained before "
                   "(without it, such a file is refused with the job that has it)")
    p.set_defaults(func=cmd_add)

    p = sub.add_parser("validate", parents=[common], help="check files against the limits and formats; exit 0 ok, 1 invalid, 2 unreadable")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("--json", action="store_true", help="one JSON document (schema in docs/formats.md)")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("preview", parents=[common], help="the first examples as the model sees them (chat template "
                       "applied, trained tokens marked) and the file's token counts; reads the workspace only")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("-n", type=int, default=3, help="examples to show per file (default 3; 0: the counts only)")
    p.add_argument("--json", action="store_true", help="one JSON document: spans as token and character offsets")
    p.set_defaults(func=cmd_preview)
