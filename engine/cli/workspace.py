"""`traind init`, `traind demo`: making a workspace, and the demo's.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from engine.core.config import QLORA_NEEDS_CUDA, Config, cuda_gpu, from_dict, render_template
from engine.store.workspace import Workspace, resolve_root


# What `traind init` puts in a folder: one that already holds any of these is refused.
LAYOUT_NAMES = ("traind.toml", "inbox", "queue", "runs", "models", "snapshots", "state", "eval", "replay")


def createworkspace(ws: Workspace, config: Config) -> int:
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
    return createworkspace(ws, from_dict({"model": {"source": args.model}, "adapter": {"method": args.adapter}}))


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
    if not ws.exists() and (code := createworkspace(ws, from_dict(DEMO_SETTINGS))) != 0:
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


def add_init(sub, common) -> None:
    p = sub.add_parser("init", parents=[common], help="create a workspace")
    p.add_argument("dir", nargs="?", help="folder to create (default: the workspace)")
    p.add_argument("--model", default="tiny", help="'tiny' (built offline), a Hugging Face model directory, or a hub id")
    p.add_argument("--adapter", default="full", choices=("full", "lora", "qlora"),
                   help="what each file trains: the whole model (full), or a LoRA adapter on the frozen base "
                   "(lora; qlora: the base in 4-bit on a CUDA GPU)")
    p.set_defaults(func=cmd_init)


def add_demo(sub, common) -> None:
    p = sub.add_parser("demo", parents=[common], help="tiny offline model + generated data, trained and shown in the UI")
    p.add_argument("dir", nargs="?", default="traind-demo", help="demo workspace (created or reused; default ./traind-demo)")
    p.add_argument("--headless", action="store_true", help="train in the foreground and print progress instead of opening the UI "
                   "(the default when standard output is not a terminal)")
    p.set_defaults(func=cmd_demo)
