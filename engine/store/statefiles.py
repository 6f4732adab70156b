"""One validating reader for every state file, and the quarantine for damaged ones.

A state file (job.json, daemon.json, worker.json, current.json, rollback.json,
checkpoint and model markers, snapshot manifests and verify.json, the token
cache's meta.json) is read only through `read`, with its expected shape. It
returns the object if the file is whole and of that shape, None if the file
is missing, and raises `Damaged` (naming the file and what is wrong) if it is
empty, torn, not JSON or of the wrong shape.

In the daemon, the single writer of the workspace, `Damaged` is raised only
after the file has been moved to `state/quarantine/` (never deleted) and the
damage reported through the hook the daemon installs with `set_quarantine`;
the caller then rebuilds what it can from the other files. Anywhere else (the
CLI, the worker, the UI) nothing is moved: only the daemon writes.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

QUARANTINE = "quarantine"
MAX_STATE_FILE = 64 << 20  # no state file is this large; a larger one is not read into memory

Type = type | tuple[type, ...]
OPTIONAL_STR = (str, type(None))
OPTIONAL_INT = (int, type(None))
OPTIONAL_DICT = (dict, type(None))
NUMBER = (int, float)


class Damaged(ValueError):
    """A state file exists but cannot be used; `why` says what is wrong with it."""

    def __init__(self, path: Path, why: str, moved_to: Path | None = None):
        self.path, self.why, self.moved_to = Path(path), why, moved_to
        where = f" (moved to {moved_to})" if moved_to else ""
        super().__init__(f"{path}: {why}{where}")


@dataclass(frozen=True)
class Shape:
    """The fields a state file must have (name -> type) and those it may have, with their types."""
    name: str
    required: dict[str, Type]
    optional: dict[str, Type] = field(default_factory=dict)
    items: dict[str, Type] = field(default_factory=dict)  # list fields: the type of each item
    check: Callable[[dict[str, Any]], str | None] | None = None  # further rules: a reason, or None

    def problem(self, doc: Any) -> str | None:
        if not isinstance(doc, dict):
            return f"expected a JSON object, found {type(doc).__name__}"
        for key, kind in self.required.items():
            if key not in doc:
                return f"no {key!r}"
            if not _is(doc[key], kind):
                return f"{key!r} is {_name(doc[key])}, expected {_name_of(kind)}"
        for key, kind in self.optional.items():
            if key in doc and not _is(doc[key], kind):
                return f"{key!r} is {_name(doc[key])}, expected {_name_of(kind)}"
        for key, kind in self.items.items():
            for i, item in enumerate(doc.get(key) or []):
                if not _is(item, kind):
                    return f"{key!r}[{i}] is {_name(item)}, expected {_name_of(kind)}"
        return self.check(doc) if self.check else None


def _is(value: Any, kind: Type) -> bool:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:
        return False  # JSON true is not a number here
    return isinstance(value, kinds)


def _name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _name_of(kind: Type) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join("null" if k is type(None) else k.__name__ for k in kinds)


FINAL_STATES = ("done", "held", "failed", "rejected")  # a job in one of these has left the queue
JOB_STATES = ("queued", "validating", "training", *FINAL_STATES, "requeued")  # requeued: a held file sent back


def _job_check(doc: dict[str, Any]) -> str | None:
    if doc["state"] not in JOB_STATES:
        return f"'state' is {doc['state']!r}, expected one of {', '.join(JOB_STATES)}"
    return None


def _pointer_check(doc: dict[str, Any]) -> str | None:
    if doc["kind"] not in ("local", "hub"):
        return f"'kind' is {doc['kind']!r}, expected 'local' or 'hub'"
    return None if doc["path"] else "'path' is empty"


JOB = Shape("job record", {"id": str, "original_name": str, "state": str, "attempts": list},
            {"format": OPTIONAL_STR, "reason": OPTIONAL_DICT, "rollbacks": list, "batch": OPTIONAL_DICT,
             "pending_rollback": OPTIONAL_DICT, "replay": OPTIONAL_DICT, "examples": OPTIONAL_INT, "claimed_at": NUMBER,
             "claimed_file": OPTIONAL_DICT, "validated_at": NUMBER, "file_suffix": OPTIONAL_STR,
             "content_hash": OPTIONAL_STR, "again": bool, "skipped_lines": list, "skipped": list},
            items={"attempts": dict, "rollbacks": dict, "skipped_lines": int, "skipped": dict}, check=_job_check)
DAEMON = Shape("daemon record", {"held": bool})
INIT = Shape("workspace record", {"model_source": str}, {"created_at": NUMBER})
WORKER = Shape("worker record", {"pid": int, "pgid": int}, {"start_ticks": OPTIONAL_INT})
CURRENT_MODEL = Shape("current-model pointer", {"kind": str, "path": str}, {"version": OPTIONAL_STR},
                      check=_pointer_check)
ROLLBACK = Shape("rollback journal", {"target": str, "phase": str}, {"active_jobs": list, "pre_snapshot": str})
CHECKPOINT_MARKER = Shape("checkpoint marker", {"step": int, "files": dict})
MODEL_MARKER = Shape("model marker", {}, {"adapter": OPTIONAL_DICT})
BASE_RECORD = Shape("base record", {"path": str, "content_hash": str, "hash_algorithm": str, "hashes": dict,
                                    "signature": dict})
MANIFEST = Shape("snapshot manifest", {"name": str, "files": dict})
VERIFICATION = Shape("verification result", {"ok": bool})
EVAL_RESULT = Shape("evaluation result", {"sources": dict})
TOKEN_CACHE = Shape("token cache meta", {"key": dict, "examples": int, "tokens": int})
ROW_PLAN = Shape("packing row plan", {"key": dict, "rows": int, "tokens": int})
REPLAY_SAMPLE = Shape("replay sample meta", {"examples": int, "tokens": int, "tokenizer": str, "max_seq_length": int})

# -- the quarantine (the daemon's) ------------------------------------------------------

_quarantine: tuple[Path, Path, Callable[[Path, Path, str], None]] | None = None
_lock = threading.Lock()


def set_quarantine(root: Path, report: Callable[[Path, Path, str], None] | None) -> None:
    """In the daemon: move damaged files under ROOT/state/quarantine/ and call report(path, moved_to, why)."""
    global _quarantine
    _quarantine = (Path(root), Path(root) / "state" / QUARANTINE, report) if report else None


def quarantine(path: Path, why: str) -> Path | None:
    """Move a damaged file aside (never delete it); where it went, or None outside the daemon."""
    if _quarantine is None:
        return None
    root, folder, report = _quarantine
    path = Path(path)
    try:
        rel = path.absolute().relative_to(root)
    except ValueError:
        rel = Path(path.name)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    with _lock:
        folder.mkdir(parents=True, exist_ok=True)
        dst = folder / f"{stamp}-{'~'.join(rel.parts)}"
        n = 1
        while os.path.lexists(dst):
            n += 1
            dst = folder / f"{stamp}-{n}-{'~'.join(rel.parts)}"
        try:
            os.rename(path, dst)
        except FileNotFoundError:
            return None
        except OSError:
            dst = None  # a read-only snapshot folder: leave it where it is, still reported
    report(path, dst, why)
    return dst


def read(path: str | os.PathLike, shape: Shape) -> dict[str, Any] | None:
    """The file's object if whole and of `shape`; None if missing; Damaged (quarantined in the daemon) if not."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_STATE_FILE + 1)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except IsADirectoryError:
        why = "is a folder, not a file"
    else:
        why = _problem(data, shape)
    if why is None:
        return json.loads(data)
    raise Damaged(path, f"damaged {shape.name}: {why}", quarantine(path, f"damaged {shape.name}: {why}"))


def _problem(data: bytes, shape: Shape) -> str | None:
    if not data.strip():
        return "empty"
    if len(data) > MAX_STATE_FILE:
        return f"over {MAX_STATE_FILE >> 20} MiB"
    try:
        doc = json.loads(data, parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:
        return f"not JSON ({str(e)[:120]})"
    return shape.problem(doc)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number a state file holds")


def read_or_none(path: str | os.PathLike, shape: Shape) -> dict[str, Any] | None:
    """For files whose damage simply means "not there" (markers, verification): None either way."""
    try:
        return read(path, shape)
    except Damaged:
        return None
