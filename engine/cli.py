"""The `traind` command line. Each verb is a thin layer over one engine module.

Exit codes: 0 success, 1 refused or invalid (a second daemon, an invalid file),
2 usage or an unreadable input (a bad config, a missing file).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from engine import __version__
from engine.api import watching
from engine.ops import service
from engine.core.config import QLORA_NEEDS_CUDA, Config, ConfigError, cuda_gpu, from_dict, render_template
from engine.api.control import NoReply
from engine.store.workspace import Workspace, WorkspaceError, resolve_root


# What `traind init` puts in a folder: one that already holds any of these is refused.
LAYOUT_NAMES = ("traind.toml", "inbox", "queue", "runs", "models", "snapshots", "state", "eval", "replay")
CONTROL_TIMEOUT = 120.0  # past the daemon's own waits (pause, checkpoint); a reply later than this is said in one line


def _workspace(args: argparse.Namespace) -> Workspace:
    return Workspace.at(resolve_root(getattr(args, "workspace", None))).require()


def create_workspace(ws: Workspace, config: Config) -> int:
    """Build the workspace in a hidden folder beside it, then rename it into place: a refused model or an
    interrupted build leaves nothing behind. Into a folder that exists (the current one), the built entries
    are moved in, the config last: a folder counts as a workspace only once it is complete."""
    import shutil

    from engine.store import models
    from engine.core.atomic import durable_rename, write_bytes_atomic, write_json_atomic

    if ws.exists():
        print(f"{ws.root}: already a traind workspace", file=sys.stderr)
        return 1
    if ws.root.exists() and (taken := sorted(n for n in os.listdir(ws.root) if n in LAYOUT_NAMES)):
        print(f"traind init: {ws.root} already has {', '.join(taken)}: choose an empty or new folder", file=sys.stderr)
        return 1
    source = config.model.source
    ws.root.parent.mkdir(parents=True, exist_ok=True)
    build = Workspace.at(tempfile.mkdtemp(prefix=f".{ws.root.name}.init-", dir=ws.root.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(build.root, 0o777 & ~umask)  # as mkdir would have made it, not mkdtemp's 0700
    try:
        build.create_folders()
        print("building the tiny model..." if source == "tiny" else f"using model {source}", file=sys.stderr)
        try:
            warning = models.init_base(build, source)
        except models.ModelError as e:
            print(f"traind init: {e}", file=sys.stderr)
            return 2
        if warning:
            print(f"traind init: warning: {warning}", file=sys.stderr)
        write_json_atomic(build.init_record, {"model_source": source, "created_at": time.time()})
        write_bytes_atomic(build.config_path, render_template(config).encode())
        if not ws.root.exists():
            durable_rename(build.root, ws.root)
        else:
            entries = sorted(build.root.iterdir(), key=lambda p: p == build.config_path)  # the config last
            for entry in entries:
                durable_rename(entry, ws.root / entry.name)
    finally:
        shutil.rmtree(build.root, ignore_errors=True)
    print(f"created workspace {ws.root}\n  drop *.jsonl files into {ws.inbox} (or 'traind add FILE -w {ws.root}')\n"
          f"  then run 'traind daemon -w {ws.root}'")
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    ws = Workspace.at(args.dir or resolve_root(args.workspace))
    if args.adapter == "qlora" and not cuda_gpu():
        print(f"traind init: --adapter qlora: {QLORA_NEEDS_CUDA}", file=sys.stderr)
        return 2
    return create_workspace(ws, from_dict({"model": {"source": args.model}, "adapter": {"method": args.adapter}}))


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
    return preview.preview_main(_workspace(args), args.files, args.n, args.json)


def cmd_add(args: argparse.Namespace) -> int:
    from engine.data import duplicates, intake

    ws = _workspace(args)
    return intake.add_files(args.files, ws.inbox, ws.load_section("validation"), known=duplicates.Known(ws),
                            again=args.again, skip_up_to=_skip_up_to(ws))


def cmd_daemon(args: argparse.Namespace) -> int:
    """`traind daemon`, and `traind node`: this machine's part in jobs a head daemon runs on several."""
    from engine.cluster import follower
    from engine.supervisor import daemon
    from engine.store.lock import AlreadyRunning

    ws = _workspace(args)
    try:
        return follower.run(ws, args.name) if args.command == "node" else daemon.run(ws, once=args.once)
    except AlreadyRunning as e:
        print(f"traind {args.command}: {e}", file=sys.stderr)
        return 1


def cmd_control(args: argparse.Namespace) -> int:
    from engine.api import control

    ws = _workspace(args)
    try:
        answer = control.request(ws.control_socket, args.command, timeout=CONTROL_TIMEOUT)
    except control.NotRunning as e:
        print(f"traind {args.command}: {e}; start one with 'traind daemon -w {ws.root}'", file=sys.stderr)
        return 1
    print(answer["message"], file=sys.stdout if answer["ok"] else sys.stderr)
    return 0 if answer["ok"] else 1


def _ask_daemon(ws: Workspace, cmd: str, **fields):
    """The daemon's reply, or None when no daemon runs (the caller then works under the lock itself)."""
    from engine.api import control

    try:
        return control.request(ws.control_socket, cmd, timeout=3600, **fields)
    except control.NotRunning:
        return None


def _without_daemon(ws: Workspace, work, running: str = "try again") -> int:
    """Run `work()` holding the workspace lock, as the daemon would; refused (saying `running`) if a daemon runs."""
    from engine.store import snapshots
    from engine.tools import rebase
    from engine.store.lock import AlreadyRunning, DaemonLock

    lock = DaemonLock(ws.lock_path, ws.root)
    try:
        lock.acquire()
    except AlreadyRunning as e:
        print(f"traind: {e}; {running}", file=sys.stderr)
        return 1
    try:
        snapshots.clean_temp(ws)
        rebase.clean(ws)
        return work()
    finally:
        lock.release()


def _answer(answer) -> int:
    print(answer["message"], file=sys.stdout if answer["ok"] else sys.stderr)
    return 0 if answer["ok"] else 1


def cmd_snapshot(args: argparse.Namespace) -> int:
    from engine.quality import gate
    from engine.store import snapshots, verification

    ws = _workspace(args)
    if args.remove:
        if (answer := _ask_daemon(ws, "remove_snapshot", name=args.remove)) is not None:
            return _answer(answer)

        def remove() -> int:
            snapshots.remove(ws, args.remove)
            print(_logged(ws, "snapshot_removed", f"snapshot {args.remove} removed", name=args.remove))
            return 0
        return _snapshot_errors(lambda: _without_daemon(ws, remove))
    if (answer := _ask_daemon(ws, "snapshot", name=args.name)) is not None:
        return _answer(answer)

    def take() -> int:  # only what a snapshot needs is read from traind.toml: a mistake elsewhere does not stop it
        snap = snapshots.create(ws, "manual", args.name, reserve=ws.load_section("disk").reserve,
                                include_optimizer=ws.load_section("snapshots").include_optimizer,
                                eval_summary=gate.summary)
        result = verification.verify(ws, snap.name)
        if not result["ok"]:
            print(_logged(ws, "snapshot_corrupt", f"snapshot {snap.name} taken but CORRUPT: "
                          f"{verification.describe_problems(result)}", "error", name=snap.name), file=sys.stderr)
            return 1
        print(_logged(ws, "snapshot", f"snapshot {snap.name} taken and verified", name=snap.name))
        return 0
    return _snapshot_errors(lambda: _without_daemon(ws, take))


def _logged(ws: Workspace, kind: str, message: str, level: str = "info", **fields) -> str:
    """A change made with no daemon, in the event log as the daemon would have put it; returns the message."""
    from engine.store.eventlog import log_offline

    log_offline(ws, kind, message, level, **fields)
    return message


def _snapshot_errors(work) -> int:
    from engine.store import restore, snapshots

    try:
        return work()
    except (snapshots.SnapshotError, restore.RollbackRefused) as e:
        print(f"traind: {e}", file=sys.stderr)
        return 1


def cmd_snapshots(args: argparse.Namespace) -> int:
    from engine.store import snapshots, verification
    from engine.core.atomic import dumps

    ws = _workspace(args)
    answer = _ask_daemon(ws, "snapshots", verify=args.verify)
    if answer is not None:
        listed = answer["snapshots"]
    else:
        def collect() -> int:
            if args.verify:
                for snap in snapshots.list_snapshots(ws):
                    verification.verify(ws, snap.name)
            return 0
        if args.verify and _without_daemon(ws, collect) != 0:
            return 1
        listed = [s.to_json() for s in snapshots.list_snapshots(ws)]
    if args.json:
        print(dumps({"schema": 1, "snapshots": listed}, indent=2))
    else:
        print(snapshots.format_table(snapshots.list_snapshots(ws)))
        if (origin := snapshots.current_source_snapshot(ws)):
            print(f"the current model was restored from {origin}")
    return 1 if any(s["verification"]["state"] == "corrupt" for s in listed) else 0


def cmd_verify(args: argparse.Namespace) -> int:
    from engine.store import snapshots, verification

    ws = _workspace(args)
    if (answer := _ask_daemon(ws, "verify", name=args.name)) is not None:
        return _answer(answer)

    def check() -> int:
        names = [args.name] if args.name else [s.name for s in snapshots.list_snapshots(ws)]
        bad = 0
        for name in names:
            result = verification.verify(ws, name)
            if result["ok"]:
                print(f"{name}: ok ({result['seconds']:.2f}s)")
            else:
                bad += 1
                print(f"{name}: CORRUPT: {verification.describe_problems(result)}", file=sys.stderr)
        return 1 if bad else 0
    return _snapshot_errors(lambda: _without_daemon(ws, check))


def cmd_rollback(args: argparse.Namespace) -> int:
    from engine.store import restore, retention

    ws = _workspace(args)
    if (answer := _ask_daemon(ws, "rollback", name=args.name)) is not None:
        return _answer(answer)
    reserve = ws.load_section("disk").reserve

    def roll() -> int:
        journal = restore.begin(ws, args.name)
        try:
            restore.verify_target(ws, journal)  # refused before anything is made
            pre = restore.pre_snapshot(ws, journal, reserve)
            version = restore.restore(ws, journal, reserve)
            restore.switch(ws, journal)
        except BaseException:
            if journal.get("phase") != "switched":
                restore.finish(ws)
            raise
        requeued = restore.requeue(ws, journal)
        again = restore.restarted_text(requeued)
        print(_logged(ws, "rolled_back_model", f"rolled back to {args.name} (now models/{version}); the previous "
                      f"model is snapshot {pre.name}{again}", "warning", name=args.name))
        for name in restore.prune_pre_rollback(ws):
            print(_logged(ws, "snapshot_removed", f"snapshot {name} removed by retention (the newest "
                          f"{retention.PRE_ROLLBACK_KEPT} pre-rollback snapshots are kept)", name=name))
        return 0
    return _snapshot_errors(lambda: _without_daemon(ws, roll))


def cmd_export(args: argparse.Namespace) -> int:
    from engine.tools import export

    ws = _workspace(args)
    try:
        record = export.run(ws, args.out_dir, args.source, merged=args.merged, reserve=ws.load_section("disk").reserve)
    except export.ExportError as e:
        print(f"traind export: {e}", file=sys.stderr)
        return 1
    print(export.describe(record, Path(args.out_dir).absolute()))
    return 0


def cmd_quality(args: argparse.Namespace) -> int:
    from engine.quality import forgetting
    from engine.core.atomic import dumps

    doc = forgetting.matrix(_workspace(args))
    print(dumps(doc, indent=2) if args.json else forgetting.render(doc))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from engine.tools import evaluate
    from engine.core.atomic import dumps

    ws = _workspace(args)
    try:
        doc = evaluate.run(ws, args.target, progress=lambda message: print(f"traind eval: {message}", file=sys.stderr,
                                                                           flush=True))
    except evaluate.EvalError as e:
        print(f"traind eval: {e}", file=sys.stderr)
        return 1
    print(dumps(doc, indent=2) if args.json else evaluate.render(doc))
    return 0


def cmd_held(args: argparse.Namespace) -> int:
    """promote / requeue a held job: through the daemon when one runs, else under the lock."""
    from engine.quality import held

    ws = _workspace(args)
    force = {"force": True} if getattr(args, "force", False) else {}
    if (answer := _ask_daemon(ws, args.command, job=args.job, **force)) is not None:
        return _answer(answer)

    def work() -> int:
        try:
            if args.command == "promote":
                print(_logged(ws, "promoted", held.promote(ws, args.job, force=args.force), job_id=args.job))
            else:
                print(_logged(ws, "requeued", held.requeue(ws, args.job), job_id=args.job))
        except held.HeldError as e:
            print(f"traind {args.command}: {e}", file=sys.stderr)
            return 1
        return 0
    return _without_daemon(ws, work)


def cmd_rebase(args: argparse.Namespace) -> int:
    from engine.tools import rebase

    ws = _workspace(args)
    reserve = ws.load_config().disk.reserve

    def work() -> int:
        try:
            print(_logged(ws, "rebased", rebase.describe(rebase.rebase(ws, reserve))))
        except rebase.RebaseError as e:
            print(f"traind rebase: {e}", file=sys.stderr)
            return 1
        return 0
    return _without_daemon(ws, work, f"stop it first ('traind shutdown -w {ws.root}'): rebase changes the current "
                                     "model and the daemon owns it while it runs")


def cmd_status(args: argparse.Namespace) -> int:
    from engine.api import status

    return status.main(_workspace(args), args.json)


# The demo's settings: a higher learning rate and shorter blocks, so the tiny model visibly learns in a minute.
# The demo's three files are three formats: the tiny model forgets one for the next, so the gate warns rather
# than holds (the events say what it would have held).
DEMO_SETTINGS = {"training": {"learning_rate": 2e-3, "max_seq_length": 128}, "checkpoint": {"every_steps": 50},
                 "eval": {"gate": "warn"}}
DEMO_FILES = (("text", 3000), ("prompt_completion", 4000), ("messages", 1500))


def prepare_demo(args: argparse.Namespace) -> Workspace | int:
    """The demo workspace (created or reused) with fresh demo files in its inbox, or an exit code."""
    from engine.data import demo_data, intake

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
    return ws


def cmd_demo(args: argparse.Namespace) -> int:
    """Headless: train the demo files in the foreground and say what the model learned (the UI is tui.cli's)."""
    from engine.supervisor import daemon

    ws = prepare_demo(args)
    if isinstance(ws, int):
        return ws
    print(f"training on the demo files; 'traind status -w {ws.root}' works from another shell", file=sys.stderr)
    started = time.time()
    code = daemon.run(ws, once=True)
    print(demo_summary(ws, since=started))
    return code


def demo_summary(ws: Workspace, since: float) -> str:
    from engine.core.atomic import read_json_lines

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
    # SUPPRESS: a subcommand without -w keeps the value given before it (`traind -w ws status`).
    common.add_argument("-w", "--workspace", default=argparse.SUPPRESS, help=workspace_help)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("init", parents=[common], help="create a workspace")
    p.add_argument("dir", nargs="?", help="folder to create (default: the workspace)")
    p.add_argument("--model", default="tiny", help="'tiny' (built offline), a Hugging Face model directory, or a hub id")
    p.add_argument("--adapter", default="full", choices=("full", "lora", "qlora"),
                   help="what each file trains: the whole model (full), or a LoRA adapter on the frozen base "
                   "(lora; qlora: the base in 4-bit on a CUDA GPU)")
    p.set_defaults(func=cmd_init)

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

    p = sub.add_parser("snapshot", parents=[common], help="snapshot the current model now (or --remove one)")
    p.add_argument("--name", help="the snapshot's name (default manual-TIME)")
    p.add_argument("--remove", metavar="NAME", help="remove a snapshot (refused for the current model's source and the newest verified)")
    p.set_defaults(func=cmd_snapshot)

    p = sub.add_parser("snapshots", parents=[common], help="list snapshots: time, size, source, verification, age")
    p.add_argument("--verify", action="store_true", help="verify every snapshot first")
    p.add_argument("--json", action="store_true", help="the list as JSON (schema in docs/snapshots.md)")
    p.set_defaults(func=cmd_snapshots)

    p = sub.add_parser("verify", parents=[common], help="re-hash and check a snapshot (default: all); exit 1 if any is corrupt")
    p.add_argument("name", nargs="?")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("rollback", parents=[common], help="make a verified snapshot the current model (the current one is snapshotted first)")
    p.add_argument("name")
    p.set_defaults(func=cmd_rollback)

    p = sub.add_parser("export", parents=[common], help="write a model as a plain Hugging Face folder (an adapter alone, or --merged)")
    p.add_argument("out_dir", metavar="OUT_DIR", help="the folder to create (it must not exist, or be empty)")
    p.add_argument("--from", dest="source", metavar="VERSION|SNAPSHOT",
                   help="a model version (models/NAME) or a snapshot (snapshots/NAME); default: the current model")
    p.add_argument("--merged", action="store_true", help="an adapter merged into its base: one full model "
                   "(needs torch and peft; a full model is exported as it is)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("quality", parents=[common], help="the forgetting matrix: each version's eval loss on every "
                       "source of the eval suite, and its change")
    p.add_argument("--json", action="store_true", help="the matrix as JSON (schema in docs/continual.md)")
    p.set_defaults(func=cmd_quality)

    p = sub.add_parser("eval", parents=[common], help="measure a model version, a snapshot or the current model on "
                       "the current eval suite (a worker process; the queue is not touched)")
    p.add_argument("target", nargs="?", metavar="VERSION|SNAPSHOT",
                   help="a model version (JOB or models/JOB) or a snapshot (NAME or snapshots/NAME); default: the "
                   "current model")
    p.add_argument("--json", action="store_true", help="the figures as JSON (schema in docs/continual.md)")
    p.set_defaults(func=cmd_eval)

    for verb, text in (("promote", "make a held job's model the current one anyway (its file moves to queue/done/)"),
                       ("requeue", "send a held job's file back to the inbox, to be trained again")):
        p = sub.add_parser(verb, parents=[common], help=text)
        p.add_argument("job", help="the job id, e.g. 00003-support-chats (see queue/held/)")
        if verb == "promote":
            p.add_argument("--force", action="store_true",
                           help="even if files were accepted after the held model's start: their training is "
                           "dropped from the current model (without it, such a promote is refused, naming them)")
        p.set_defaults(func=cmd_held)

    p = sub.add_parser("rebase", parents=[common], help="make the current model a new base (an adapter merged into "
                       "it), so [adapter] may change; with the daemon stopped")
    p.set_defaults(func=cmd_rebase)

    watching.add_commands(sub, common, _workspace)
    service.add_command(sub, common, _workspace)

    p = sub.add_parser("demo", parents=[common], help="tiny offline model + generated data, trained and shown in the UI")
    p.add_argument("dir", nargs="?", default="traind-demo", help="demo workspace (created or reused; default ./traind-demo)")
    p.add_argument("--headless", action="store_true", help="train in the foreground and print progress instead of opening the UI "
                   "(the default when standard output is not a terminal)")
    p.set_defaults(func=cmd_demo)
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
    except BrokenPipeError:  # `traind status | head`: the reader left, nothing to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
