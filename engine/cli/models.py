"""The model's commands: snapshots (take, list, verify, remove), rollback, export, quality, eval, promote and
requeue of a held file, rebase. Each asks the running daemon where one runs, else works under the lock.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from engine.cli.common import answered, ask_daemon, logged, without_daemon, workspace


def cmd_snapshot(args: argparse.Namespace) -> int:
    from engine.quality import gate
    from engine.store import snapshots, verification

    ws = workspace(args)
    if args.remove:
        if (answer := ask_daemon(ws, "remove_snapshot", name=args.remove)) is not None:
            return answered(answer)

        def remove() -> int:
            snapshots.remove(ws, args.remove)
            print(logged(ws, "snapshot_removed", f"snapshot {args.remove} removed", name=args.remove))
            return 0
        return _snapshot_errors(lambda: without_daemon(ws, remove))
    if (answer := ask_daemon(ws, "snapshot", name=args.name)) is not None:
        return answered(answer)

    def take() -> int:  # only what a snapshot needs is read from traind.toml: a mistake elsewhere does not stop it
        snap = snapshots.create(ws, "manual", args.name, reserve=ws.load_section("disk").reserve,
                                include_optimizer=ws.load_section("snapshots").include_optimizer,
                                eval_summary=gate.summary)
        result = verification.verify(ws, snap.name)
        if not result["ok"]:
            print(logged(ws, "snapshot_corrupt", f"snapshot {snap.name} taken but CORRUPT: "
                          f"{verification.describe_problems(result)}", "error", name=snap.name), file=sys.stderr)
            return 1
        print(logged(ws, "snapshot", f"snapshot {snap.name} taken and verified", name=snap.name))
        return 0
    return _snapshot_errors(lambda: without_daemon(ws, take))


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

    ws = workspace(args)
    answer = ask_daemon(ws, "snapshots", verify=args.verify)
    if answer is not None:
        listed = answer["snapshots"]
    else:
        def collect() -> int:
            if args.verify:
                for snap in snapshots.list_snapshots(ws):
                    verification.verify(ws, snap.name)
            return 0
        if args.verify and without_daemon(ws, collect) != 0:
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

    ws = workspace(args)
    if (answer := ask_daemon(ws, "verify", name=args.name)) is not None:
        return answered(answer)

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
    return _snapshot_errors(lambda: without_daemon(ws, check))


def cmd_rollback(args: argparse.Namespace) -> int:
    from engine.store import restore, retention

    ws = workspace(args)
    if (answer := ask_daemon(ws, "rollback", name=args.name)) is not None:
        return answered(answer)
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
        print(logged(ws, "rolled_back_model", f"rolled back to {args.name} (now models/{version}); the previous "
                      f"model is snapshot {pre.name}{again}", "warning", name=args.name))
        for name in restore.prune_pre_rollback(ws):
            print(logged(ws, "snapshot_removed", f"snapshot {name} removed by retention (the newest "
                          f"{retention.PRE_ROLLBACK_KEPT} pre-rollback snapshots are kept)", name=name))
        return 0
    return _snapshot_errors(lambda: without_daemon(ws, roll))


def cmd_export(args: argparse.Namespace) -> int:
    from engine.tools import export

    ws = workspace(args)
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

    doc = forgetting.matrix(workspace(args))
    print(dumps(doc, indent=2) if args.json else forgetting.render(doc))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from engine.tools import evaluate
    from engine.core.atomic import dumps

    ws = workspace(args)
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

    ws = workspace(args)
    force = {"force": True} if getattr(args, "force", False) else {}
    if (answer := ask_daemon(ws, args.command, job=args.job, **force)) is not None:
        return answered(answer)

    def work() -> int:
        try:
            if args.command == "promote":
                print(logged(ws, "promoted", held.promote(ws, args.job, force=args.force), job_id=args.job))
            else:
                print(logged(ws, "requeued", held.requeue(ws, args.job), job_id=args.job))
        except held.HeldError as e:
            print(f"traind {args.command}: {e}", file=sys.stderr)
            return 1
        return 0
    return without_daemon(ws, work)


def cmd_rebase(args: argparse.Namespace) -> int:
    from engine.tools import rebase

    ws = workspace(args)
    reserve = ws.load_config().disk.reserve

    def work() -> int:
        try:
            print(logged(ws, "rebased", rebase.describe(rebase.rebase(ws, reserve))))
        except rebase.RebaseError as e:
            print(f"traind rebase: {e}", file=sys.stderr)
            return 1
        return 0
    return without_daemon(ws, work, f"stop it first ('traind shutdown -w {ws.root}'): rebase changes the current "
                                     "model and the daemon owns it while it runs")


def add_commands(sub, common) -> None:
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
