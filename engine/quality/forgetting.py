"""The forgetting matrix: every evaluated model version against every source of the eval suite.

Rows are the versions under models/ whose marker holds an evaluation
(engine/worker/evaluation.py), oldest first; columns are the sources, in the
order they joined the suite; a cell is the version's eval loss on that source,
with its relative change against the row before that measured it (a rise is
forgetting, a fall is learning). A held version (queue/held/) is marked, and
so is the current one. `traind quality [--json]` prints it at the terminal's
width, each source under its whole name, changes written as the gate writes
them (`gate.percent`); no model is run.
"""

from __future__ import annotations

import shutil
import textwrap
from typing import Any

from engine.core import reading
from engine.store import jobs, snapshots, statefiles
from engine.quality.gate import change, percent
from engine.core.protocol import MODEL_MARKER
from engine.store.workspace import Workspace

SCHEMA = 1


def matrix(ws: Workspace) -> dict[str, Any]:
    markers = [(version, statefiles.read_or_none(ws.models / version / MODEL_MARKER, statefiles.MODEL_MARKER) or {})
               for version in snapshots.model_versions(ws)]
    held = {reading.stem(name) for name in jobs.listing(ws, "held")}
    return build(markers, snapshots.current_version(ws), held)


def build(markers: list[tuple[str, dict[str, Any]]], current: str | None, held: set[str]) -> dict[str, Any]:
    """The matrix from (version, marker) pairs, oldest first: the part of `matrix` that reads no file."""
    sources: list[str] = []
    rows = []
    last: dict[str, float] = {}
    for version, marker in markers:
        evaluated = marker.get("eval")
        if not isinstance(evaluated, dict) or not isinstance(evaluated.get("sources"), dict):
            continue
        losses, changes, befores = {}, {}, {}
        for name, figures in evaluated["sources"].items():
            loss = (figures.get("after") or {}).get("loss") if isinstance(figures, dict) else None
            if not isinstance(loss, (int, float)):
                continue
            if name not in sources:
                sources.append(name)
            losses[name] = loss
            started = (figures.get("before") or {}).get("loss")
            if isinstance(started, (int, float)):
                befores[name] = started  # the starting model's figure: what the gate judged against
            before = last.get(name, started)
            changes[name] = change(before, loss) if before else None
        if version not in held:  # a held model never became the model later ones grew from
            last.update(losses)
        rows.append({"version": version, "job_id": marker.get("job_id"), "own": evaluated.get("own"),
                     "current": version == current, "held": version in held, "step": evaluated.get("step"),
                     "losses": losses, "changes": changes, "before": befores})
    return {"schema": SCHEMA, "sources": sources, "versions": rows}


GAP = 2  # spaces before each column
MIN_COLUMN = 6


def render(doc: dict[str, Any], width: int | None = None) -> str:
    """The matrix as text at most `width` columns wide (default: the terminal's). A column is as wide as
    its cells, and wider, up to its source's whole name, while the line has room; a name longer than its
    column is wrapped onto more header lines, never cut. Columns that do not fit go on in a further block
    below, each block led by the versions."""
    if not doc["versions"]:
        return "no evaluated model version yet (every trained file is evaluated once eval.holdout_fraction > 0)"
    width = width or shutil.get_terminal_size().columns
    rows = doc["versions"]
    names = [("*" if r["current"] else "H" if r["held"] else " ") + r["version"] for r in rows]
    name_width = max(len("version"), *(len(n) for n in names))
    cells = {s: [_cell(r, s) for r in rows] for s in doc["sources"]}
    narrow = {s: max(MIN_COLUMN, *(len(c) for c in column)) for s, column in cells.items()}
    blocks: list[list[str]] = [[]]
    used = name_width
    for s in doc["sources"]:
        if blocks[-1] and used + GAP + narrow[s] > width:
            blocks.append([])
            used = name_width
        blocks[-1].append(s)
        used += GAP + narrow[s]
    out: list[str] = []
    for block in blocks:
        spare = width - name_width - sum(GAP + narrow[s] for s in block)
        widths = {}
        for s in block:  # widen towards the whole name, left to right, while the line has room
            grow = max(0, min(len(s) - narrow[s], spare))
            widths[s], spare = narrow[s] + grow, spare - grow
        heads = {s: textwrap.wrap(s, widths[s]) or [""] for s in block}
        depth = max((len(h) for h in heads.values()), default=1)
        if out:
            out.append("")
        for i in range(depth):  # the header's lines, its last one level with "version"
            label = "version" if i == depth - 1 else ""
            parts = [h[i - depth + len(h)] if i >= depth - len(h) else "" for h in heads.values()]
            out.append((label.ljust(name_width) + "".join(" " * GAP + p.rjust(widths[s])
                                                        for s, p in zip(block, parts))).rstrip())
        for n, name in enumerate(names):
            out.append(name.ljust(name_width) + "".join(" " * GAP + cells[s][n].rjust(widths[s]) for s in block))
    out += textwrap.wrap("eval loss per source, and its change against the version before (a rise is forgetting); "
                         "* current, H held by the quality gate", max(width, 40))
    return "\n".join(out)


def _cell(row: dict[str, Any], source: str) -> str:
    loss, moved = row["losses"].get(source), row["changes"].get(source)
    return "-" if loss is None else f"{loss:.3f} {percent(moved)}".rstrip()
