"""`traind rebase`: the current model becomes a new base, so [adapter] may change (full -> lora, a new rank).

An adapter version is merged into its base (export --merged, in a worker-side
process) and the result is a whole model; a full fine-tune is already one, and
its files are hard-linked (versions are immutable). Either way it becomes
`models/rebase-STAMP/`, built as `models/.partial-rebase-STAMP/` with its marker
last (`rebased_from`: the version it came from, with the files' hashes), then
renamed and made current. The next job starts a fresh chain on it with whatever
[adapter] says. The old chain stays: its versions and snapshots, and the base
they pin, are restorable as before.

Files in queue/active/ were being trained on the old model: like a rollback,
their checkpoints are moved aside and they start again on the new base.

The CLI runs this holding the workspace lock: never while a daemon runs.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

from engine.core import atomic, hashing
from engine.store import bases, jobs, models, restore, snapshots
from engine.tools import export
from engine.core.protocol import MODEL_MARKER
from engine.store.workspace import Workspace

PREFIX = "rebase-"
STAGING = ".rebase-"  # state/.rebase-NAME-PID: the merged model before it moves into models/


class RebaseError(Exception):
    pass


def rebase(ws: Workspace, reserve: int = 0, now: float | None = None) -> dict[str, Any]:
    """Make the current model a new base version and current; returns its marker."""
    now = time.time() if now is None else now
    try:
        source = export.resolve(ws, None)
    except export.ExportError as e:
        raise RebaseError(str(e)) from None
    if source.kind != "version":
        raise RebaseError(f"the current model is {source.path}, not a version trained here: it is a base already "
                          "(any [adapter] method starts on it)")
    name = f"{PREFIX}{time.strftime('%Y%m%dT%H%M%S', time.gmtime(now))}"
    final, partial = ws.models / name, models.partial_dir(ws, name)
    if final.exists():
        raise RebaseError(f"{final}: exists; try again in a second")
    if partial.exists():
        shutil.rmtree(partial)
    adapter = bases.adapter_of(source.path)
    if adapter is not None:
        staging = ws.state / f"{STAGING}{name}-{os.getpid()}"  # export refuses to write into models/ itself
        try:
            record = export.run(ws, staging, None, merged=True, reserve=reserve)
        except export.ExportError as e:
            raise RebaseError(str(e)) from None
        (staging / export.RECORD).unlink()
        files = {rel: info["size"] for rel, info in record["files"].items() if rel != export.RECORD}
        hashes = {rel: info["hash"] for rel, info in record["files"].items() if rel != export.RECORD}
        algorithm = record["hash_algorithm"]
        atomic.durable_rename(staging, partial)
    else:
        partial.mkdir()
        marker = bases.marker_of(source.path)
        files = {rel: size for rel, size in source.files.items()  # the model, not its optimizer state
                 if rel != MODEL_MARKER and not rel.startswith(snapshots.OPTIMIZER_PREFIXES)}
        algorithm = marker.get("hash_algorithm") or hashing.algorithm()
        known = marker.get("hashes") if isinstance(marker.get("hashes"), dict) else {}
        for rel in files:
            os.link(source.path / rel, partial / rel)
        hashes = {rel: known.get(rel) or hashing.hash_file(partial / rel, algorithm) for rel in files}
    marker = {"rebased_from": source.name, "merged": adapter is not None, "time": now, "files": files,
              "hash_algorithm": algorithm, "hashes": hashes,
              **({"adapter_merged": adapter} if adapter else {})}
    atomic.write_json_atomic(partial / MODEL_MARKER, marker)
    atomic.fsync_dir(partial)
    atomic.durable_rename(partial, final)
    # The active files' checkpoints go aside first (repeatable): a crash before the switch loses their progress,
    # never resumes the old chain's checkpoints on the new base.
    marker["restarted"] = restart_active(ws, name, now)
    models.set_current(ws, "local", f"models/{name}", name, rebased_from=source.name)
    marker["version"] = name
    return marker


def clean(ws: Workspace) -> list[Path]:
    """What a rebase killed midway left: its staging folders in state/ and a partial version. Under the lock."""
    found = [p for p in ws.state.glob(f"{STAGING}*") if p.is_dir()]
    found += [p for p in ws.state.glob(f".{STAGING}*") if p.is_dir()]  # export's own temp beside the staging folder
    found += [p for p in ws.models.glob(f"{models.PARTIAL_PREFIX}{PREFIX}*") if p.is_dir()]
    for path in found:
        shutil.rmtree(path, ignore_errors=True)
    return found


def restart_active(ws: Workspace, name: str, now: float) -> list[str]:
    """Files being trained on the old model start again on the new base (their checkpoints kept aside)."""
    active = jobs.active_jobs(ws, "active")
    restore.set_aside_checkpoints(active, now, restarted_after_rebase=name)
    return [job.id for job in active]


def describe(marker: dict[str, Any]) -> str:
    how = "merged its adapter into the base" if marker["merged"] else "its files linked"
    line = (f"rebased: models/{marker['version']} ({how}) is the current model and a new base; "
            f"the next file starts a fresh chain on it with [adapter] as traind.toml says")
    if marker["restarted"]:
        line += f"; {', '.join(marker['restarted'])} start again on it"
    return line
