"""The `traind` command line. Each verb is a thin layer over one engine module.

Exit codes: 0 success, 1 refused or invalid (a second daemon, an invalid file),
2 usage or an unreadable input (a bad config, a missing file).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from engine import __version__
from engine.config import Config, ConfigError, from_dict, render_template
from engine.workspace import Workspace, WorkspaceError, resolve_root


def _workspace(args: argparse.Namespace) -> Workspace:
    return Workspace.at(resolve_root(args.workspace)).require()


def create_workspace(ws: Workspace, config: Config) -> int:
    from engine import models
    from engine.atomic import write_bytes_atomic

    if ws.exists():
        print(f"{ws.root}: already a traind workspace", file=sys.stderr)
        return 1
    source = config.model.source
    ws.create_folders()
    print(f"building the tiny model..." if source == "tiny" else f"using model {source}", file=sys.stderr)
    try:
        models.init_base(ws, source)
    except models.ModelError as e:
        print(f"traind init: {e}", file=sys.stderr)
        return 2
    # The config goes last: a folder counts as a workspace only once it is complete.
    write_bytes_atomic(ws.config_path, render_template(config).encode())
    print(f"created workspace {ws.root}\n  drop *.jsonl files into {ws.inbox} (or 'traind add FILE -w {ws.root}')\n"
          f"  then run 'traind daemon -w {ws.root}'")
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    ws = Workspace.at(args.dir or resolve_root(args.workspace))
    return create_workspace(ws, from_dict({"model": {"source": args.model}}))


def _limits(args: argparse.Namespace):
    root = resolve_root(args.workspace)
    ws = Workspace.at(root)
    return ws.load_config().validation if ws.exists() else Config().validation


def cmd_validate(args: argparse.Namespace) -> int:
    from engine import validate

    return validate.validate_paths_main(args.files, _limits(args), args.json)


def cmd_add(args: argparse.Namespace) -> int:
    from engine import intake

    ws = _workspace(args)
    return intake.add_files(args.files, ws.inbox, ws.load_config().validation)


def cmd_daemon(args: argparse.Namespace) -> int:
    from engine import daemon
    from engine.lock import AlreadyRunning

    ws = _workspace(args)
    try:
        return daemon.run(ws, once=args.once)
    except AlreadyRunning as e:
        print(f"traind daemon: {e}", file=sys.stderr)
        return 1


def cmd_control(args: argparse.Namespace) -> int:
    from engine import control

    ws = _workspace(args)
    try:
        answer = control.request(ws.control_socket, args.command)
    except control.NotRunning as e:
        print(f"traind {args.command}: {e}; start one with 'traind daemon -w {ws.root}'", file=sys.stderr)
        return 1
    print(answer["message"], file=sys.stdout if answer["ok"] else sys.stderr)
    return 0 if answer["ok"] else 1


def cmd_status(args: argparse.Namespace) -> int:
    from engine import status

    return status.main(_workspace(args), args.json)


# The demo's settings: a higher learning rate and shorter blocks, so the tiny model visibly learns in a minute.
DEMO_SETTINGS = {"training": {"learning_rate": 2e-3, "max_seq_length": 128}, "checkpoint": {"every_steps": 50}}
DEMO_FILES = (("text", 3000), ("prompt_completion", 4000), ("messages", 1500))


def cmd_demo(args: argparse.Namespace) -> int:
    from engine import daemon, demo_data, intake

    ws = Workspace.at(args.dir)
    if not ws.exists() and (code := create_workspace(ws, from_dict(DEMO_SETTINGS))) != 0:
        return code
    config = ws.load_config()
    round_no = 1 + sum(1 for _ in ws.runs.iterdir())
    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for fmt, n in DEMO_FILES:
            path = Path(tmp) / f"demo-{fmt.replace('_', '-')}-{round_no}.jsonl"
            demo_data.write_demo_file(path, n, fmt, seed=round_no)
            files.append(str(path))
        if (code := intake.add_files(files, ws.inbox, config.validation)) != 0:
            return code
    print(f"training on the demo files; 'traind status -w {ws.root}' works from another shell", file=sys.stderr)
    started = time.time()
    code = daemon.run(ws, once=True)
    print(demo_summary(ws, since=started))
    return code


def demo_summary(ws: Workspace, since: float) -> str:
    from engine.atomic import read_json_lines

    lines = ["", "what the model learned (mean loss over the first and the last tenth of each file's steps):"]
    for run in sorted(ws.runs.iterdir()):
        steps = [e for e in read_json_lines(run / "metrics.jsonl") if e.get("event") == "step" and e["time"] >= since]
        losses = [e["loss"] for e in steps if e["loss"] is not None]
        if losses:
            tenth = max(1, len(losses) // 10)
            first, last = sum(losses[:tenth]) / tenth, sum(losses[-tenth:]) / tenth
            seconds = steps[-1]["time"] - steps[0]["time"]
            lines.append(f"  {run.name:<32} {first:.3f} -> {last:.3f}  ({steps[-1]['step']} steps, {seconds:.0f}s)")
    lines.append(f"the current model is in {ws.models}; run 'make demo' again to train it on fresh files")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="traind", description="Keep a language model fine-tuning on a stream of JSONL files.")
    parser.add_argument("--version", action="version", version=f"traind {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-w", "--workspace", help="workspace folder (default: $TRAIND_HOME, else the current directory)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("init", parents=[common], help="create a workspace")
    p.add_argument("dir", nargs="?", help="folder to create (default: the workspace)")
    p.add_argument("--model", default="tiny", help="'tiny' (built offline), a Hugging Face model directory, or a hub id")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("add", parents=[common], help="validate files, then copy them atomically into the inbox")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.set_defaults(func=cmd_add)

    p = sub.add_parser("validate", parents=[common], help="check files against the limits and formats; exit 0 ok, 1 invalid, 2 unreadable")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("--json", action="store_true", help="one JSON document (schema in docs/formats.md)")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("daemon", parents=[common], help="run the supervisor in the foreground")
    p.add_argument("--once", action="store_true", help="exit when the queue is empty")
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

    p = sub.add_parser("demo", parents=[common], help="tiny offline model + generated data, trained in the foreground")
    p.add_argument("dir", nargs="?", default="traind-demo", help="demo workspace (created or reused; default ./traind-demo)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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


if __name__ == "__main__":
    sys.exit(main())
