"""Model versions and the current-model pointer.

`models/current.json` names the model the next job starts from: a version
under models/ (a finished job's output, or the tiny base model), a local
directory outside the workspace, or a hub id. A finished job's model is saved
by the worker into `models/.partial-JOB_ID/` with its marker written last; the
daemon publishes it by renaming it to `models/JOB_ID/` and then replacing
current.json atomically, so a crash leaves the old model or the new one current,
never a half-written one.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from engine.core import crashpoints, model_check
from engine.store import statefiles
from engine.core.atomic import durable_rename, write_json_atomic
from engine.core.protocol import MODEL_MARKER
from engine.store.workspace import Workspace

PARTIAL_PREFIX = ".partial-"
TINY_BASE = "base-tiny"


class ModelError(Exception):
    pass


def partial_dir(ws: Workspace, job_id: str) -> Path:
    return ws.models / f"{PARTIAL_PREFIX}{job_id}"


def is_complete(model_dir: Path) -> bool:
    return (model_dir / MODEL_MARKER).is_file()


def current(ws: Workspace) -> dict[str, Any]:
    """models/current.json; FileNotFoundError if there is none, statefiles.Damaged if it is damaged."""
    pointer = statefiles.read(ws.current_model_pointer, statefiles.CURRENT_MODEL)
    if pointer is None:
        raise FileNotFoundError(f"{ws.current_model_pointer}: no current model")
    return pointer


def current_source(ws: Workspace) -> str:
    """What the worker loads: an absolute directory, or a hub id."""
    pointer = current(ws)
    if pointer["kind"] == "hub":
        return pointer["path"]
    path = Path(pointer["path"])
    return str(path if path.is_absolute() else ws.root / path)


def set_current(ws: Workspace, kind: str, path: str, version: str | None, **origin: Any) -> None:
    write_json_atomic(ws.current_model_pointer, {"kind": kind, "path": path, "version": version,
                                                 "switched_at": time.time(), **origin})


def publish(ws: Workspace, job_id: str, make_current: bool = True, **origin: Any) -> Path:
    """Make a finished job's model a version (`models/JOB_ID/`) and, unless held by the gate, the current one.
    Repeatable: recovery may call it again."""
    final = ws.models / job_id
    partial = partial_dir(ws, job_id)
    if not final.exists():
        if not is_complete(partial):
            raise ModelError(f"{partial}: no {MODEL_MARKER}; the model was not saved completely")
        durable_rename(partial, final)
        crashpoints.reached("publish")
    if make_current:
        set_current(ws, "local", f"models/{job_id}", job_id, job_id=job_id, **origin)
    return final


def saved_marker(ws: Workspace, job_id: str) -> dict[str, Any]:
    """A finished job's model marker, published or not yet."""
    for folder in (ws.models / job_id, partial_dir(ws, job_id)):
        marker = statefiles.read_or_none(folder / MODEL_MARKER, statefiles.MODEL_MARKER)
        if marker is not None:
            return marker
    return {}


def chain_steps(source: str) -> int:
    """The optimizer steps a model's chain has taken, from its marker: 0 for a base, a user's directory or a hub
    id; a version saved before the count was recorded counts its own job's steps."""
    marker = statefiles.read_or_none(Path(source) / MODEL_MARKER, statefiles.MODEL_MARKER) or {}
    steps = marker.get("chain_steps", marker.get("step", 0))
    return steps if isinstance(steps, int) and steps >= 0 else 0


def rebuild_current(ws: Workspace, source: str) -> str | None:
    """After current.json was lost or damaged: point it at the newest complete version, else at the base
    model the config names (`model.source`) if it is there. Returns what it points at now, or None."""
    versions = [d for d in ws.models.iterdir()
                if d.is_dir() and not d.name.startswith(".") and is_complete(d)]
    if versions:
        newest = max(versions, key=lambda d: (d / MODEL_MARKER).stat().st_mtime_ns)
        set_current(ws, "local", f"models/{newest.name}", newest.name, rebuilt=True)
        return f"models/{newest.name} (the newest complete version)"
    if source == "tiny":
        if (ws.models / TINY_BASE / "config.json").is_file():
            set_current(ws, "local", f"models/{TINY_BASE}", TINY_BASE, origin="tiny", rebuilt=True)
            return f"models/{TINY_BASE} (the base model)"
        return None
    path = Path(source).expanduser()
    if (path / "config.json").is_file():
        set_current(ws, "local", str(path.absolute()), None, origin=str(path.absolute()), rebuilt=True)
        return f"{path.absolute()} (the base model in traind.toml)"
    if path.exists() or source.startswith((".", "/", "~")):
        return None
    set_current(ws, "hub", source, None, origin=source, rebuilt=True)
    return f"{source} (the hub model in traind.toml)"


def remove_incomplete_partials(ws: Workspace) -> list[Path]:
    """Half-saved models from an interrupted finish: worthless, and never the current model."""
    removed = []
    for entry in ws.models.iterdir():
        if entry.name.startswith(PARTIAL_PREFIX) and entry.is_dir() and not is_complete(entry):
            shutil.rmtree(entry)
            removed.append(entry)
    return removed


def init_base(ws: Workspace, source: str) -> str | None:
    """Point a new workspace at its base model: build the tiny one, or refer to a directory or hub id.

    ModelError for a directory that cannot be loaded (model_check names what is missing); a warning,
    returned, for a hub id that is not in the local cache (the worker will try to download it).
    """
    if source == "tiny":
        target = ws.models / TINY_BASE
        if not target.exists():
            # The builder imports torch and transformers: it runs in a worker-side subprocess.
            result = subprocess.run([sys.executable, "-m", "engine.worker.tiny_model", str(target)],
                                    capture_output=True, text=True)
            if result.returncode != 0:
                raise ModelError(f"building the tiny model failed:\n{result.stderr[-2000:]}")
        set_current(ws, "local", f"models/{TINY_BASE}", TINY_BASE, origin="tiny")
        return None
    path = Path(source).expanduser()
    if path.exists() or model_check.looks_like_path(source):
        if not path.exists():
            raise ModelError(f"{source}: no such model directory")
        if (problem := model_check.dir_problem(path.absolute())) is not None:
            raise ModelError(f"{problem}: not a loadable Hugging Face model directory")
        set_current(ws, "local", str(path.absolute()), None, origin=str(path.absolute()))
        return None
    set_current(ws, "hub", source, None, origin=source)
    if model_check.hub_cached(source):
        return None
    return (f"model {source} is not in the local Hugging Face cache and this machine may be offline; "
            "the worker will try to download it")
