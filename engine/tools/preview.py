"""`traind preview`: a file's first examples as the model sees them, trained tokens marked, and its counts.

The files are validated here first (engine/data/validate.py: no tokenizer); the
tokenizing is done by `python -m engine.worker.preview` with the training
worker's own encoders, the workspace's current model's tokenizer and its
`training.max_seq_length`. `traind validate` asks the same process for the
share of examples cut at `max_seq_length` (`cut_shares`). Both say how many
optimizer steps a file will train for, and how many of them warm up.

This module reads the workspace and the files only: it never touches the
queue, takes no lock and writes nothing. It never imports torch or
transformers.
"""

from __future__ import annotations

import json
import math
import sys
from typing import Any

from engine.data import validate
from engine.ops import forkserver
from engine.store import models, statefiles
from engine.core.config import ConfigError, TrainingConfig
from engine.store.workspace import Workspace

SCHEMA = 1
OPEN, CLOSE = "[[", "]]"  # trained text without a terminal
_ON, _OFF = "\x1b[1;30;42m", "\x1b[0m"  # on a terminal: black on green
_DIM, _CUT = "\x1b[2m", "[... cut at max_seq_length]"


class PreviewError(Exception):
    pass


def tokenizer_source(ws: Workspace) -> str:
    """The current model's folder (or hub id): its tokenizer is the one training uses."""
    try:
        return models.current_source(ws)
    except FileNotFoundError:
        raise PreviewError(f"{ws.current_model_pointer}: no current model, so no tokenizer") from None
    except statefiles.Damaged as e:
        raise PreviewError(str(e)) from None


def measure(ws: Workspace, files: list[tuple[str, str, list[int]]], n: int) -> dict[str, Any]:
    """The worker's document for [(path, format, the bad lines validation skipped)]; PreviewError with its
    error line when it fails."""
    from engine.ops.worker_process import worker_env

    t = ws.load_section("training")
    spec = {"model": tokenizer_source(ws), "max_seq_length": t.max_seq_length, "n": n,
            "files": [{"path": path, "format": fmt, "skip_lines": skip} for path, fmt, skip in files],
            "training": {"packing": t.packing, "packing_cross_document": t.packing_cross_document, "seed": t.seed}}
    proc = forkserver.run_python(["-m", "engine.worker.preview"], worker_env(), forkserver.server_for(ws.fork_socket),
                                 input=json.dumps(spec) + "\n")
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        errors = [line.removeprefix("error: ") for line in lines if line.startswith("error: ")]
        raise PreviewError(errors[-1] if errors else f"the preview process exited {proc.returncode}: "
                           + " | ".join(lines[-5:]))
    doc = json.loads(proc.stdout.strip().splitlines()[-1])
    warmup_done = models.chain_steps(spec["model"])
    for f in doc["files"]:
        f["training"] = training_plan(t, f["counts"]["rows"], warmup_done)
    return doc


def optimizer_steps(rows: int, t: TrainingConfig) -> int:
    """The optimizer steps `rows` training rows make, as the Trainer counts them: the rows shared among the
    processes, micro-batches of batch_size, gradient_accumulation_steps of them a step, epochs_per_file."""
    batches = math.ceil(math.ceil(rows / t.processes) / t.batch_size)
    per_epoch = max(1, math.ceil(batches / t.gradient_accumulation_steps))
    return math.ceil(per_epoch * t.epochs_per_file)


def training_plan(t: TrainingConfig, rows: int, chain_steps: int) -> dict[str, Any]:
    """A file's rows, optimizer steps and warm-up steps, before the held-out lines leave it and replay joins."""
    steps = optimizer_steps(rows, t)
    warmup = 0 if t.lr_scheduler == "constant" else t.warmup_steps
    left = warmup if t.warmup_per_file else max(0, warmup - chain_steps)
    return {"rows": rows, "optimizer_steps": steps, "warmup_steps": min(left, steps)}


def marked(example: dict[str, Any], colour: bool) -> str:
    """The example's text with its trained character spans marked."""
    text, out, at = example["text"], [], 0
    for span in example["spans"]:
        a, b = span["chars"]
        out.append(text[at:a])
        out.append(f"{_ON}{text[a:b]}{_OFF}" if colour else f"{OPEN}{text[a:b]}{CLOSE}")
        at = b
    out.append(text[at:])
    if example["cut"]:
        out.append(f"{_DIM}{_CUT}{_OFF}" if colour else _CUT)
    return "".join(out)


def _share(part: int, whole: int) -> str:
    return f"{part / whole:.1%}" if whole else "-"


def render(doc: dict[str, Any], colour: bool) -> str:
    lines = []
    for f in doc["files"]:
        c = f["counts"]
        for ex in f["examples"]:
            what = f"{ex['tokens']} tokens, {ex['trained_tokens']} trained" + (", cut" if ex["cut"] else "") \
                + (", nothing to train" if ex["nothing_to_train"] else "")
            lines += [f"--- {f['path']}:{ex['line']} ({what})", marked(ex, colour), ""]
        key = "trained text highlighted" if colour else f"trained text between {OPEN} and {CLOSE}"
        cut = "packed into blocks, none cut" if f["packed"] else \
            f"{c['cut']:,} cut at max_seq_length {f['max_seq_length']} ({_share(c['cut'], c['examples'])})"
        lines.append(f"{f['path']}: {f['format']}, {c['examples']:,} examples, {c['tokens']:,} tokens, "
                     f"{c['trained_tokens']:,} trained ({_share(c['trained_tokens'], c['tokens'])}); {cut}; "
                     f"{c['nothing_to_train']:,} with nothing to train ({key})")
        lines.append(f"{f['path']}: trains in {validate.describe_plan(f['training'])}")
    return "\n".join(lines)


def preview_main(ws: Workspace, paths: list[str], n: int, as_json: bool, out=None, err=None) -> int:
    """`traind preview FILE...`: 0 shown, 1 a file is invalid or cannot be tokenized, 2 unreadable."""
    out, err = out or sys.stdout, err or sys.stderr
    config = ws.load_config()
    files, code = [], 0
    for path in paths:
        try:
            report = validate.validate_file(path, config.validation, config.inbox.skip_up_to())
        except validate.UnreadableFile as e:
            print(f"{path}: cannot read: {e.reason}", file=err)
            return 2
        if not report.ok:
            print(report.format_text(), file=err)
            code = 1
            continue
        files.append((path, report.format, report.skipped_lines))
    if not files:
        return code or 1
    try:
        doc = measure(ws, files, n)
    except PreviewError as e:
        print(f"traind preview: {e}", file=err)
        return 1
    if as_json:
        out.write(json.dumps(doc, indent=2) + "\n")
    else:
        print(render(doc, colour=out.isatty()), file=out)
    return code


def cut_shares(ws: Workspace | None, reports: list) -> tuple[dict[str, dict[str, Any]], str | None]:
    """For `traind validate`: each valid file's examples cut at max_seq_length ({path: {...}}), or a note
    saying why it was not measured."""
    valid = [(r.path, r.format, r.skipped_lines) for r in reports if r.ok]
    if not valid:
        return {}, None
    if ws is None:
        return {}, "cut at max_seq_length: not measured (not in a workspace; give -w WORKSPACE to measure it)"
    try:
        doc = measure(ws, valid, 0)
    except (PreviewError, ConfigError) as e:  # the files' own validity does not depend on either
        return {}, f"cut at max_seq_length: not measured: {e}"
    shares = {}
    for f in doc["files"]:
        c = f["counts"]
        shares[f["path"]] = {"max_seq_length": f["max_seq_length"], "examples": c["examples"],
                             "cut": 0 if f["packed"] else c["cut"],
                             "share": 0.0 if f["packed"] or not c["examples"] else round(c["cut"] / c["examples"], 4),
                             "training": f["training"]}
    return shares, None
