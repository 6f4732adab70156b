"""`traind eval`: any model version, snapshot or the current model measured on the current eval suite.

The target is resolved as `traind export` resolves its source (engine/tools/export.py:
the current model, `models/NAME`, `snapshots/NAME` or a bare name that is one
of them; a corrupt snapshot is refused), and must be complete: every file its
marker or manifest records, with its size, and what loading needs
(engine/core/model_check.py); an adapter's pinned base must still be the one it was
trained on. The suite is today's (engine/quality/suite.py: every trained file's
held-out lines and every valid file in eval/, each with its share of lines).

The measuring is done by `python -m engine.worker.evaluate`, with the training
worker's own code, so a version's figures on the sources it was evaluated on
when it was trained are the ones its marker recorded; each is set beside that
record. The tokenized suite goes into `state/.eval.tmp-PID/`, removed on the
way out (SIGINT, SIGTERM and SIGHUP too); one left by a killed eval is removed
by the next.

This module reads the workspace and writes nothing into it but that temp
folder: no lock is taken, the queue is not touched, and a running daemon need
not be asked (on a GPU the evaluation takes memory beside a running job's).
It never imports torch, transformers or peft.
"""

from __future__ import annotations

import collections
import json
import re
import shutil
import signal
import time
from pathlib import Path
from typing import Any, Callable

from engine.core import atomic, model_check
from engine.ops import forkserver
from engine.quality import suite
from engine.store import models, statefiles
from engine.tools import export
from engine.core.config import Config
from engine.quality.gate import change
from engine.quality.gate import percent
from engine.core.protocol import MODEL_MARKER
from engine.store.workspace import Workspace

SCHEMA = 1
EMPTY = "the eval suite is empty: no trained file held lines out and eval/ has no valid file"
RESULT = "result.json"  # engine/worker/evaluate.py writes it into the temp folder
PROGRESS = "traind-worker: "  # the worker's progress lines start with it
LOG_LINES = 15  # of the worker's output, shown when it fails
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class EvalError(Exception):
    pass


def target(ws: Workspace, name: str | None) -> export.Source:
    """What is measured; EvalError naming it when it is unknown, incomplete or cannot be loaded."""
    try:
        pointer = export.current_pointer(ws) if name is None else None
        if pointer and pointer["kind"] == "hub":
            return export.Source("hub", pointer["path"], Path(pointer["path"]), {})
        source = export.resolve(ws, name)
    except export.ExportError as e:
        raise EvalError(str(e)) from None
    _check_complete(ws, source)
    if source.is_adapter:
        try:
            export.check_base(ws, source, export.base_of(source), merge=False)
        except export.ExportError as e:
            raise EvalError(str(e)) from None
    return source


def _check_complete(ws: Workspace, source: export.Source) -> None:
    if source.kind == "version" and not source.marker and ws.run_dir(source.name).is_dir():
        raise EvalError(f"{source.label} is incomplete: it has no {MODEL_MARKER} (its job's model was not "
                        "saved completely)")
    for rel, size in sorted(source.files.items()):
        try:
            actual = (source.path / rel).stat().st_size
        except FileNotFoundError:
            raise EvalError(f"{source.label} is incomplete: {rel} is missing") from None
        if actual != size:
            raise EvalError(f"{source.label} is incomplete: {rel} is {actual:,} bytes, {size:,} recorded")
    problems = model_check.dir_problems(source.path)
    if problems:
        raise EvalError(f"{source.label} is incomplete or cannot be loaded: {'; '.join(problems)}")


def describe_target(ws: Workspace, source: export.Source) -> dict[str, Any]:
    current = source.kind == "hub"
    if not current:
        try:
            current = Path(models.current_source(ws)).resolve() == source.path.resolve()
        except (FileNotFoundError, statefiles.Damaged):
            pass
    base = export.base_of(source) if source.is_adapter else None
    return {"kind": source.kind, "name": source.name, "path": str(source.path), "current": current,
            "job_id": source.marker.get("job_id"), "step": source.marker.get("step"),
            "type": "adapter" if source.is_adapter else "model", "base": base}


def recorded(source: export.Source) -> dict[str, dict]:
    """The target's own figures per source, as its marker recorded them when it was trained ("after")."""
    evaluated = source.marker.get("eval")
    sources = evaluated.get("sources") if isinstance(evaluated, dict) else None
    out = {}
    for name, figures in (sources if isinstance(sources, dict) else {}).items():
        after = figures.get("after") if isinstance(figures, dict) else None
        if isinstance(after, dict) and isinstance(after.get("loss"), (int, float)):
            out[name] = {k: after.get(k) for k in ("loss", "lines", "tokens")}
    return out


def run(ws: Workspace, name: str | None, progress: Callable[[str], None] = lambda _m: None) -> dict[str, Any]:
    """Measure the target on the current suite; the `traind eval --json` document. EvalError when it cannot."""
    started = time.time()
    config = ws.load_config()
    source = target(ws, name)
    found, problems = suite.sources(ws, config)
    for problem in problems:
        progress(f"warning: {problem}")
    if not found:
        raise EvalError(EMPTY)
    progress(f"evaluating {source.label if source.kind != 'hub' else source.name} on {len(found)} sources "
             "(starting the worker)")
    with export.signals_interrupt():
        measured = _measure(ws, config, source, found, progress)
    mine = recorded(source)
    rows = []
    for entry in found:
        figures = measured["sources"].get(entry["name"])
        if figures is None:
            continue
        then, loss = mine.get(entry["name"]), figures["loss"]
        rows.append({"name": entry["name"], "lines": figures["lines"], "tokens": figures["tokens"], "loss": loss,
                     "recorded": then,
                     "change": change(then["loss"], loss) if then and then["loss"] and loss is not None else None})
    left_out = [e["name"] for e in found if e["name"] not in measured["sources"]]
    warnings = problems + [f"{n}: left out (it could not be tokenized; see the progress lines)" for n in left_out]
    return {"schema": SCHEMA, "target": describe_target(ws, source), "sources": rows, "warnings": warnings,
            "precision": measured.get("precision"), "device": measured.get("device"), "time": time.time(),
            "seconds": round(time.time() - started, 3)}


def _measure(ws: Workspace, config: Config, source: export.Source, found: list[dict],
             progress: Callable[[str], None]) -> dict[str, Any]:
    from engine.ops.worker_process import worker_env

    out = ws.state / "eval"  # the temp folder is state/.eval.tmp-PID, export's naming for a folder being made
    export.remove_stale_temps(out)
    tmp = export.temp_dir(out)
    with atomic.writing(tmp):
        tmp.mkdir()
    adapter = None
    if source.is_adapter:
        recorded_adapter = source.marker.get("adapter") if isinstance(source.marker.get("adapter"), dict) else {}
        adapter = {"method": "lora", **recorded_adapter,
                   "base": {**(recorded_adapter.get("base") or {}), "path": export.base_of(source)}}
    spec = {"model": source.name if source.kind == "hub" else str(source.path), "adapter": adapter,
            "training": config.to_dict()["training"], "sources": found,
            "batch_size": config.eval.batch_size, "tmp": str(tmp)}
    tail: collections.deque[str] = collections.deque(maxlen=LOG_LINES)
    proc = None
    try:
        proc = forkserver.stream_python(["-m", "engine.worker.evaluate"], worker_env(),
                                        forkserver.server_for(ws.fork_socket), input=json.dumps(spec) + "\n")
        for raw in proc.stdout:
            line = _ANSI.sub("", raw).rstrip()
            if not line.strip():
                continue
            tail.append(line)
            if line.startswith(PROGRESS):
                progress(line.removeprefix(PROGRESS))
        code = proc.wait()
        if code != 0:
            raise EvalError(_failure(code, list(tail)))
        try:
            return atomic.read_json(tmp / RESULT)
        except (OSError, ValueError):
            raise EvalError("the evaluation worker exited without its result") from None
    finally:
        if proc is not None and proc.poll() is None:
            proc.terminate()
            proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)


def _failure(code: int, lines: list[str]) -> str:
    errors = [line for line in lines if line.startswith("error: ")]
    if errors:
        why = errors[-1].removeprefix("error: ")
    elif code < 0:
        why = f"it was killed by {signal.Signals(-code).name}"
    else:
        why = f"it exited {code}"
    shown = "".join(f"\n    {line}" for line in lines if not line.startswith("error: "))
    return f"the evaluation worker failed: {why}" + (f"; its last lines:{shown}" if shown else "")


def render(doc: dict[str, Any]) -> str:
    """The table: each source's figures now, beside the version's own record for it."""
    t = doc["target"]
    what = {"version": f"models/{t['name']}", "snapshot": f"snapshot {t['name']}"}.get(t["kind"], t["name"])
    head = f"{what}{' (current)' if t['current'] else ''}" + (f", adapter on {t['base']}" if t["base"] else "")
    width = max(len("source"), *(len(r["name"]) for r in doc["sources"])) + 2
    lines = [head, "source".ljust(width) + f"{'lines':>7}{'tokens':>9}{'loss':>9}{'recorded':>10}{'change':>9}"]
    other_lines = False
    for row in doc["sources"]:
        rec = row["recorded"]
        loss = "-" if row["loss"] is None else f"{row['loss']:.4f}"
        then = "-" if rec is None else f"{rec['loss']:.4f}"
        if rec is not None and rec.get("lines") != row["lines"]:
            then, other_lines = then + "~", True
        moved = "-" if row["change"] is None else percent(row["change"])
        lines.append(row["name"].ljust(width) + f"{row['lines']:>7}{row['tokens']:>9}{loss:>9}{then:>10}{moved:>9}")
    lines.append("eval loss on the current suite; recorded: this version's own evaluation when it was trained"
                 + ("; ~ recorded on another number of lines" if other_lines else ""))
    return "\n".join(lines)
