"""The forgetting matrix: every evaluated model version against every source of the eval suite.

Rows are the versions under models/ whose marker holds an evaluation
(engine/worker/evaluation.py), oldest first; columns are the sources, in the
order they joined the suite; a cell is the version's eval loss on that source,
with its relative change against the row before that measured it (a rise is
forgetting, a fall is learning). A held version (queue/held/) is marked, and
so is the current one. `traind quality [--json]` prints it; no model is run.
"""

from __future__ import annotations

from typing import Any

from engine import jobs, reading, snapshots, statefiles
from engine.gate import change
from engine.protocol import MODEL_MARKER
from engine.workspace import Workspace

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


def render(doc: dict[str, Any], width: int = 12) -> str:
    if not doc["versions"]:
        return "no evaluated model version yet (every trained file is evaluated once eval.holdout_fraction > 0)"
    sources = doc["sources"]
    name_width = max(len("version"), *(len(r["version"]) for r in doc["versions"])) + 2
    head = "version".ljust(name_width) + "".join(s[-width:].rjust(width + 8) for s in sources)
    lines = [head]
    for row in doc["versions"]:
        mark = "*" if row["current"] else "H" if row["held"] else " "
        cells = []
        for s in sources:
            loss, moved = row["losses"].get(s), row["changes"].get(s)
            cell = "-" if loss is None else f"{loss:.3f}" + (f" {moved:+.0%}" if moved is not None else "")
            cells.append(cell.rjust(width + 8))
        lines.append(f"{mark}{row['version']}".ljust(name_width) + "".join(cells))
    lines.append("eval loss per source, and its change against the version before (a rise is forgetting); "
                 "* current, H held by the quality gate")
    return "\n".join(lines)
